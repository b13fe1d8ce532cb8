"""Stable Diffusion benchmark: seconds per denoising step and per image, mlxd (MLX) vs diffusers (PyTorch) on
the same machine, same pipeline (random weights), same prompt, guidance 7.5 (two UNet rows per step), 20 steps.

- mlxd: the converted pipeline in process, the UNet step eager and compiled (``mx.compile``, what the daemon runs).
- diffusers: ``StableDiffusionPipeline`` in its own process (MLX preloads an OpenBLAS that would otherwise take
  over PyTorch's BLAS calls), on CUDA in ``--dtype`` when PyTorch sees a GPU, else float32 on the CPU.
Sizes: tiny (32 px), small (256 px, CPU-sized), sd15 (SD-1.5's shapes, 512 px: for a GPU).
Run `python bench/sd.py [--sizes tiny,small] [--steps 20] [--dtype float32|float16] [--json]`;
`--parity` instead prints the agreement with diffusers (per scheduler, per component, fp16) on the tiny pipeline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, machine

PROMPT = "a photo of a cat sitting on a wooden bench"


def pipeline(size: str) -> Path:
    """The random-weight diffusers pipeline of ``size``, built once into .demo/."""
    from mlxd_daemon.fixtures.sd import make_sd

    path = CACHE / f"hf-sd-{size}"
    if not (path / "model_index.json").exists():
        make_sd(path, size=size, seed=0)
    return path


def converted(size: str, dtype: str) -> Path:
    from mlxd_daemon.pipelines.convert import convert_pipeline

    path = CACHE / f"mlx-sd-{size}-{dtype}"
    if not (path / "model_index.json").exists():
        convert_pipeline(pipeline(size), path, dtype=dtype)
    return path


def diffusers_run(size: str, steps: int, dtype: str) -> dict[str, Any]:
    """Child process: diffusers' seconds per image and per step (second run; the first warms up)."""
    import torch
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Half precision on a GPU as users run it (the VAE upcast is diffusers' own); PyTorch's CPU path is float32.
    torch_dtype = getattr(torch, dtype) if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline(size)), safety_checker=None, dtype=torch_dtype,
                                                   requires_safety_checker=False).to(device)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    marks: list[float] = []

    def on_step(p: object, i: int, t: object, kwargs: dict[str, object]) -> dict[str, object]:
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return kwargs

    result = {}
    for _ in range(2):
        marks.clear()
        start = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, callback_on_step_end=on_step,
             generator=torch.Generator().manual_seed(0))  # fmt: skip
        result = {"image": time.perf_counter() - start, "step": (marks[-1] - marks[0]) / max(len(marks) - 1, 1)}
    return {**result, "device": device, "dtype": str(torch_dtype).removeprefix("torch.")}


def mlx_run(size: str, steps: int, dtype: str) -> dict[str, dict[str, float]]:
    from mlxd_daemon import blas

    blas.preload()
    import mlx.core as mx
    from mlxd_daemon.pipelines import sd
    from mlxd_daemon.residency import configure_mlx_for_inference

    configure_mlx_for_inference()
    bundle = sd.load(converted(size, dtype))
    out = {}
    for mode in ("eager", "compiled"):
        bundle._step = bundle.unet if mode == "eager" else mx.compile(bundle.unet)
        for _ in range(2):  # the first run traces/compiles and warms the caches
            r = bundle.generate_image(sd.Request(PROMPT, steps=steps, guidance=7.5, seed=0))
        out[mode] = {"image": r["seconds"], "step": r["loop_seconds"] / steps}
    return out


def parity(size: str = "tiny") -> None:
    """PSNR of mlxd's image against diffusers' (same latents, 4 steps, guidance 7.5) per scheduler and dtype, and
    the per-component errors of Validate."""
    from mlxd_daemon import blas

    blas.preload()
    import numpy as np
    from mlxd_daemon.pipelines import sd
    from mlxd_daemon.pipelines.schedulers import SCHEDULERS
    from mlxd_daemon.pipelines.validate import load_reference, psnr, reference_images, validate_pipeline

    report = validate_pipeline(pipeline(size), converted(size, "float32"))
    print(f"validate ({size}, float32): passed={report['passed']}, image PSNR {report['end_to_end']['psnr_db']}")
    for o in report["outputs"]:
        print(f"  {o['name']:<32} max abs {o['max_abs']:.2e}  cosine {o['cosine']:.9f}")
    worst = max(report["layers"], key=lambda layer: layer["rel_error"])
    print(f"  {len(report['layers'])} layers, worst {worst['name']} rel error {worst['rel_error']:.2e}")
    ref = load_reference(pipeline(size))
    latents = np.random.default_rng(5).standard_normal((1, 4, 16, 16)).astype(np.float32)
    bundles = {dtype: sd.load(converted(size, dtype)) for dtype in ("float32", "float16", "bfloat16")}
    print(f"{'scheduler':<22} " + " ".join(f"{d + ' dB':>14}" for d in bundles))
    for name in SCHEDULERS:
        want = reference_images(ref, latents, scheduler=name)
        row = []
        for bundle in bundles.values():
            got = bundle.generate_image(sd.Request("a photo of a cat", steps=4, latents=latents, scheduler=name))
            row.append(psnr(want, got["images"]))
        print(f"{name:<22} " + " ".join(f"{x:>14.1f}" for x in row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--parity", action="store_true", help="agreement with diffusers instead of speed")
    p.add_argument("--diffusers-child", metavar="SIZE", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.parity:
        parity()
        return
    if a.diffusers_child:
        print(json.dumps(diffusers_run(a.diffusers_child, a.steps, a.dtype)))
        return
    rows = []
    for size in a.sizes.split(","):
        pipeline(size)
        child = subprocess.run([sys.executable, __file__, "--diffusers-child", size, "--steps", str(a.steps),
                                "--dtype", a.dtype],
                               check=True, capture_output=True, text=True)  # fmt: skip
        ref = json.loads(child.stdout.strip().splitlines()[-1])
        mine = mlx_run(size, a.steps, a.dtype)
        rows.append({"size": size, "steps": a.steps, "dtype": a.dtype, "diffusers": ref, **mine})
    if a.json:
        print(json.dumps({"machine": machine(), "rows": rows}))
        return
    print(f"Stable Diffusion, {a.steps} steps, guidance 7.5, {machine()}")
    print(f"{'pipeline':<8} {'':<24} {'s/step':>8} {'s/image':>8} {'vs diffusers':>13}")
    for r in rows:
        ref = r["diffusers"]
        label = f"diffusers ({ref['device']}, {ref['dtype']})"
        print(f"{r['size']:<8} {label:<24} {ref['step']:>8.4f} {ref['image']:>8.3f}")
        for mode in ("eager", "compiled"):
            m = r[mode]
            label = f"mlxd {mode} ({r['dtype']})"
            print(f"{'':<8} {label:<24} {m['step']:>8.4f} {m['image']:>8.3f} {ref['image'] / m['image']:>12.2f}x")


if __name__ == "__main__":
    main()
