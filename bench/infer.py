"""Inference benchmark, all measured in this run on the same inputs and thread count:

- CLIP ViT-B/32 image+text features, batch 1 and 8: mlxd's MLX model (in process) vs transformers on PyTorch.
- The same through the daemon (Infer over a unix socket), warm; and a cold process that loads and infers once.
- RPC overhead: unary round trip (ListModels) p50/p99.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, base_clip, machine, timeit

THREADS = os.cpu_count() or 1
TEXTS = [f"a photo of object number {i}" for i in range(8)]


def torch_baseline() -> dict[int, float]:
    """transformers CLIP (processor + text and image features) timed in a clean subprocess.

    Separate process: OpenBLAS preloaded for MLX would otherwise take over torch's BLAS calls and
    oversubscribe the cores (measured 30x slower torch).
    """
    out = subprocess.run([sys.executable, __file__, "--torch"], check=True, capture_output=True, text=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def torch_main() -> None:
    import torch
    from mlxd_daemon.fixtures import golden_images
    from transformers import CLIPModel, CLIPProcessor

    torch.set_num_threads(THREADS)
    src = base_clip()
    model = CLIPModel.from_pretrained(src).eval()
    processor = CLIPProcessor.from_pretrained(src)
    images = golden_images(8, size=224)

    def embed(n: int) -> None:
        inputs = processor(text=TEXTS[:n], images=images[:n], padding=True, return_tensors="pt")
        with torch.no_grad():
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            model.get_image_features(pixel_values=inputs["pixel_values"])

    print(json.dumps({n: timeit(lambda n=n: embed(n), repeat=5) for n in (1, 8)}))


def main() -> None:
    from mlxd_daemon.blas import preload

    blas = preload()
    from mlxd_client import Client
    from mlxd_daemon.archs import clip
    from mlxd_daemon.convert import convert
    from mlxd_daemon.fixtures import golden_images

    src = base_clip()
    mlx_dir = CACHE / "bench-mlx-clip"
    if not (mlx_dir / "config.json").exists():
        convert(src, mlx_dir, dtype="float32")
    images = golden_images(8, size=224)
    print(f"infer benchmark: ViT-B/32 CLIP float32, {machine()}, {THREADS} threads, BLAS {blas}")
    torch_times = torch_baseline()
    bundle = clip.load(mlx_dir)

    print(f"{'':<36} {'torch':>9} {'mlxd':>9} {'ratio':>7}")
    for n in (1, 8):
        t_torch = torch_times[n]
        t_mlx = timeit(lambda n=n: bundle.embed(TEXTS[:n], images[:n]), repeat=5)
        print(
            f"{f'CLIP text+image batch {n} (in process)':<36} {t_torch * 1e3:7.1f}ms {t_mlx * 1e3:7.1f}ms "
            f"{t_mlx / t_torch:6.2f}x"
        )

    with tempfile.TemporaryDirectory(prefix="mlxd-bench-") as run:
        address = f"unix://{run}/mlxd.sock"
        pngs = []
        for i, image in enumerate(images):
            pngs.append(Path(run) / f"{i}.png")
            image.save(pngs[-1])
        env = {**os.environ, "MLXD_ADDRESS": address}
        subprocess.run(
            [sys.executable, "-m", "mlxd_client.cli", "daemon", "start"],
            env=env,
            check=True,
            capture_output=True,
        )
        try:
            with Client(address, autostart=False) as c:
                c.infer(mlx_dir, texts=TEXTS[:1])  # load once: the daemon keeps it resident
                for n in (1, 8):
                    t_rpc = timeit(lambda n=n: c.infer(mlx_dir, texts=TEXTS[:n], images=pngs[:n]), repeat=5)
                    t_torch = torch_times[n]
                    print(
                        f"{f'CLIP batch {n} via daemon (warm)':<36} {t_torch * 1e3:7.1f}ms {t_rpc * 1e3:7.1f}ms "
                        f"{t_rpc / t_torch:6.2f}x"
                    )
                rtts = []
                for _ in range(300):
                    start = time.perf_counter()
                    c.list_models()
                    rtts.append(time.perf_counter() - start)
                rtts.sort()
                print(
                    f"unary RPC round trip (ListModels): p50 {statistics.median(rtts) * 1e3:.2f} ms, "
                    f"p99 {rtts[int(len(rtts) * 0.99)] * 1e3:.2f} ms"
                )
                warm = timeit(lambda: c.infer(mlx_dir, texts=TEXTS[:1], images=pngs[:1]), repeat=5)
            cold_code = (
                "from mlxd_daemon.blas import preload; preload(); from pathlib import Path; "
                "from PIL import Image; from mlxd_daemon.archs import clip; "
                f"b = clip.load(Path({str(mlx_dir)!r})); "
                f"b.embed([{TEXTS[0]!r}], [Image.open({str(pngs[0])!r}).convert('RGB')])"
            )
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", cold_code], check=True)
            cold = time.perf_counter() - start
            print(
                f"batch 1: cold load-and-infer process {cold:.2f} s vs warm daemon {warm * 1e3:.1f} ms: "
                f"warm is {cold / warm:.0f}x faster"
            )
        finally:
            subprocess.run([sys.executable, "-m", "mlxd_client.cli", "daemon", "stop"], env=env, capture_output=True)


if __name__ == "__main__":
    torch_main() if "--torch" in sys.argv else main()
