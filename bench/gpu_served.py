"""The served path on a GPU: what Infer runs, beside torch eager and torch.compile on the same inputs (issue 20).

A ViT-B/32-shaped CLIP (seeded random weights, ``fixtures.make_clip``) is converted by mlxd to fp16 and measured
at batch 1 / 8 / 64 (N texts of up to 77 tokens + N 224x224 images -> embeddings + similarities), medians with
p10/p90 over interleaved rounds:

  torch eager     transformers CLIPModel fp16 on CUDA, preprocessed tensors already on the device
  torch e2e       the same from PNG bytes: decode, transformers' CLIPProcessor (tokenizer + image processor),
                  tensors to the device, forward: what a PyTorch server does with the request Infer gets
  torch.compile   the same module under torch.compile (default mode)
  mlxd forward    ``ClipBundle.served`` on preprocessed inputs (token ids, uint8 crops): the compiled towers Infer
                  runs, the pixel normalization among them
  mlxd embed      ``ClipBundle.embed(texts, images)``: the in-process call Infer makes (tokenizing and image
                  preprocessing on the host included)
  gRPC Infer      the daemon over a unix socket (PNG bytes in, embeddings out)
  gRPC tensors    the daemon given the tensors torch eager gets (Infer's ``inputs``: input_ids, attention_mask and
                  fp16 pixel_values), so no host preprocessing on either side
  gRPC pixels     the same with the uint8 crops (``pixels``) instead of pixel_values: a quarter of the bytes, the
                  daemon normalizes them

Also: the first request after LoadModel vs steady state (the warm-up is paid at load). Run where MLX sees a GPU:
``PYTHONPATH=<site>:client:daemon python3 bench/gpu_served.py``.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 8, 64)
ROUNDS, ITERS = 5, 5
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "big",
    "red",
    "house",
    "by",
    "the",
    "river",
    "with",
    "two",
    "dogs",
    "and",
    "a",
    "cat",
    "in",
    "the",
    "snow",
    "at",
    "night",
]


def spread(ms: list[float]) -> str:
    qs = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return f"{statistics.median(ms):7.2f} ({qs[0]:.2f}-{qs[-1]:.2f})"


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(90)) for i in range(n)]  # > 77 tokens: truncated


def main() -> None:
    import mlx.core as mx
    import numpy as np
    import torch
    from mlxd_client import Client
    from mlxd_client.discovery import start_daemon
    from mlxd_daemon.archs import clip
    from mlxd_daemon.convert import convert
    from mlxd_daemon.fixtures import golden_images, make_clip
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    print(f"MLX {mx.__version__} on {mx.default_device()}, torch {torch.__version__} on "
          f"{torch.cuda.get_device_name(0)}", flush=True)  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="mlxd-served-"))
    src = make_clip(root / "hf", size="base", seed=0)
    convert(src, root / "mlx", dtype="float16")
    bundle = clip.load(root / "mlx")
    first = bundle.warm_up()
    tm = CLIPModel.from_pretrained(src, torch_dtype=torch.float16).cuda().eval()
    tc = torch.compile(tm)
    processor = CLIPProcessor.from_pretrained(src)
    images = golden_images(max(BATCHES), size=224)
    pngs = []
    for im in images:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        pngs.append(buf.getvalue())

    def torch_fn(model: Any, inputs: dict[str, Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                t = model.get_text_features(input_ids=inputs["ids"], attention_mask=inputs["mask"])
                i = model.get_image_features(pixel_values=inputs["px"])
                # transformers 5 returns the output object; the projected features are its pooler_output
                t, i = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (t, i))
                t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
                out = i @ t.T
            torch.cuda.synchronize()
            return out

        return run

    def torch_e2e(ts: list[str], blobs: list[bytes]) -> Any:
        decoded = [Image.open(io.BytesIO(b)) for b in blobs]
        batch = processor(text=ts, images=decoded, return_tensors="pt", padding=True, truncation=True)
        inputs = {"ids": batch["input_ids"].cuda(), "mask": batch["attention_mask"].cuda(),
                  "px": batch["pixel_values"].half().cuda()}  # fmt: skip
        return torch_fn(tm, inputs)()

    address = f"unix://{root}/mlxd.sock"
    proc = start_daemon(address, log_path=root / "mlxd.log")
    try:
        with Client(address, autostart=False, timeout=600) as c:
            start = time.perf_counter()
            loaded = c.load_model(root / "mlx").model
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            c.infer(root / "mlx", texts=texts(1), images=pngs[:1])
            first_ms = (time.perf_counter() - start) * 1e3
            print(f"LoadModel {load_s:.1f} s (warm-up {loaded.warmup_seconds:.1f} s in it; in-process warm-up "
                  f"{first:.1f} s); first Infer after load {first_ms:.1f} ms", flush=True)  # fmt: skip
            print("batch | torch eager | torch.compile | torch e2e | mlxd forward | mlxd embed | gRPC Infer "
                  "| gRPC tensors | gRPC pixels (ms, median (p10-p90))")  # fmt: skip
            for n in BATCHES:
                pre = bundle.preprocess(texts(n), images[:n])
                tokens = {"input_ids": pre["input_ids"], "attention_mask": pre["attention_mask"]}
                half = {**tokens, "pixel_values": pre["pixel_values"].astype(np.float16)}
                crops = {**tokens, "pixels": bundle.served.inputs([], images[:n])["pixels"]}
                tin = {"ids": torch.from_numpy(pre["input_ids"]).cuda(),
                       "mask": torch.from_numpy(pre["attention_mask"]).cuda(),
                       "px": torch.from_numpy(pre["pixel_values"]).half().cuda()}  # fmt: skip
                ts, ims = texts(n), images[:n]
                fns = {
                    "torch": torch_fn(tm, tin),
                    "compile": torch_fn(tc, tin),
                    "e2e": lambda ts=ts, n=n: torch_e2e(ts, pngs[:n]),
                    "forward": lambda si=bundle.served.inputs(texts(n), images[:n]): bundle.served.forward(si),
                    "embed": lambda ts=ts, ims=ims: bundle.embed(ts, ims),
                    "grpc": lambda n=n: c.infer(root / "mlx", texts=texts(n), images=pngs[:n]),
                    "tensors": lambda half=half: c.infer(root / "mlx", inputs=half),
                    "pixels": lambda crops=crops: c.infer(root / "mlx", inputs=crops),
                }
                times: dict[str, list[float]] = {k: [] for k in fns}
                for fn in fns.values():
                    fn()
                    fn()  # warm: compile / autotune
                for _ in range(ROUNDS):
                    for k, fn in fns.items():
                        for _ in range(ITERS):
                            t0 = time.perf_counter()
                            fn()
                            times[k].append((time.perf_counter() - t0) * 1e3)
                med = {k: statistics.median(v) for k, v in times.items()}
                ratios = (f"gRPC/torch {med['grpc'] / med['torch']:.2f}, "
                          f"gRPC tensors/torch {med['tensors'] / med['torch']:.2f}, "
                          f"gRPC pixels/torch {med['pixels'] / med['torch']:.2f}, "
                          f"gRPC/torch e2e {med['grpc'] / med['e2e']:.2f}, "
                          f"forward/torch {med['forward'] / med['torch']:.2f}, "
                          f"gRPC/compile {med['grpc'] / med['compile']:.2f}")  # fmt: skip
                print(f"{n:5d} | " + " | ".join(spread(times[k]) for k in fns) + "   " + ratios, flush=True)
            steady = []
            for _ in range(10):
                t0 = time.perf_counter()
                c.infer(root / "mlx", texts=texts(1), images=pngs[:1])
                steady.append((time.perf_counter() - t0) * 1e3)
            ratio = first_ms / statistics.median(steady)
            print(f"first Infer after load / steady state (batch 1): {ratio:.2f}x ({first_ms:.1f} ms first)")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "daemon"))
    main()
