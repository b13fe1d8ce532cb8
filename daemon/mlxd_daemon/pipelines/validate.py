"""Validate a converted Stable Diffusion pipeline against diffusers / transformers, component by component,
layer by layer, and end to end.

Fixed inputs (seeded): golden prompts through the text encoder (last hidden state); a latent, timestep 500 and
random conditioning through the UNet (noise prediction: the UNet alone, not the text encoder's error); a latent
through the VAE decoder and an image through its encoder (posterior mean). Each component is judged by the
tolerance band of how it is stored (``validate.band_name``), each tapped layer by ``LAYER_REL_TOL``. End to end:
the same initial latents, prompt, guidance 7.5 and 4 steps of the pipeline's scheduler through
``diffusers.StableDiffusionPipeline`` and through ``sd.StableDiffusion.generate_image``; images compared by PSNR.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlxd_daemon.errors import InvalidArgument, MlxdError
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.taps import hook_modules, mlx_taps
from mlxd_daemon.validate import (
    LAYER_REL_TOL,
    TOLERANCES,
    OutputReport,
    _summarise_in_manifest,
    band_name,
    compare,
    compare_layers,
    metrics,
    tolerance_for,
)

# Minimum PSNR of the end-to-end image by band. float32: same weights and math on both sides (the tests measure
# 70+ dB on the tiny pipeline); the GPU's TF32 matmuls cost more. Other bands are reported, not gated: their
# per-component tolerances already judge them and 4 guided steps amplify rounding differently per seed.
IMAGE_MIN_PSNR = {"float32": 40.0, "float32_gpu": 30.0}
E2E_STEPS, E2E_GUIDANCE, E2E_PROMPT = 4, 7.5, "a photo of a cat"
TIMESTEP = 500.0


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _nhwc_to_nchw(layers: dict[str, Any], prefix: str) -> dict[str, np.ndarray]:
    import mlx.core as mx

    out = {}
    for name, x in layers.items():
        a = np.array(x.astype(mx.float32))
        out[prefix + name] = a.transpose(0, 3, 1, 2) if a.ndim == 4 else a
    return out


def _band(folder: Path, dtype: str) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization") or {}
    return band_name(dtype, quant.get("bits"), config.get("dtype") or config.get("torch_dtype"),
                     quant.get("mode", "affine"))  # fmt: skip


def golden_inputs(bundle: Any) -> dict[str, np.ndarray]:
    """Seeded arrays for each component (NCHW as diffusers takes them), small enough for a CPU."""
    rng = np.random.default_rng(0)
    cfg = bundle.unet.cfg
    unit = 2 ** (len(cfg.block_out_channels) - 1)
    side = max(unit, min(cfg.sample_size, 32) // unit * unit)
    f = bundle.vae_scale_factor
    return {
        "unet_sample": rng.standard_normal((2, cfg.in_channels, side, side)).astype(np.float32),
        "unet_context": rng.standard_normal((2, bundle.max_length, cfg.cross_attention_dim[0])).astype(np.float32),
        "vae_latents": rng.standard_normal((1, bundle.vae_config.latent_channels, side, side)).astype(np.float32),
        "vae_image": rng.uniform(-1, 1, (1, 3, side * f, side * f)).astype(np.float32),
        "e2e_latents": rng.standard_normal((1, cfg.in_channels, side, side)).astype(np.float32),
    }


def _run_mlx(bundle: Any, x: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    import mlx.core as mx

    from mlxd_daemon import golden

    outs: dict[str, np.ndarray] = {}
    layers: dict[str, np.ndarray] = {}
    with mlx_taps() as tapped:
        hidden, _ = bundle.encode_text(list(golden.GOLDEN_TEXTS[:3]))
        outs["text_encoder.last_hidden_state"] = np.array(hidden.astype(mx.float32))
    layers.update(_nhwc_to_nchw(tapped, "text_encoder."))
    with mlx_taps() as tapped:
        t = mx.full((2,), TIMESTEP, dtype=mx.float32)
        noise = bundle.unet(mx.array(x["unet_sample"].transpose(0, 2, 3, 1)), t, mx.array(x["unet_context"]))
        outs["unet.noise_pred"] = np.array(noise).transpose(0, 3, 1, 2)
        mx.eval(list(tapped.values()))
    layers.update(_nhwc_to_nchw(tapped, "unet."))
    with mlx_taps() as tapped:
        image = bundle.vae.decode(mx.array(x["vae_latents"].transpose(0, 2, 3, 1)))
        outs["vae.decoded"] = np.array(image).transpose(0, 3, 1, 2)
        mean, _ = bundle.vae.encode(mx.array(x["vae_image"].transpose(0, 2, 3, 1)))
        outs["vae.latent_mean"] = np.array(mean).transpose(0, 3, 1, 2)
    layers.update(_nhwc_to_nchw(tapped, "vae."))
    return outs, layers


def _run_reference(pipe: Any, x: dict[str, np.ndarray], names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from mlxd_daemon import golden

    captured: dict[str, np.ndarray] = {}
    handles = []
    for component in ("text_encoder", "unet", "vae"):
        model, prefix = getattr(pipe, component), component + "."
        wanted = {n.removeprefix(prefix) for n in names if n.startswith(prefix)}
        if component == "text_encoder" and not hasattr(model, "text_model"):
            # transformers 5's CLIPTextModel has no text_model level; MLX keeps transformers 4's names.
            prefix += "text_model."
            wanted = {n.removeprefix("text_model.") for n in wanted}
        handles += hook_modules(model, wanted, captured, prefix=prefix)
    outs = {}
    try:
        with torch.no_grad():
            ids = pipe.tokenizer(list(golden.GOLDEN_TEXTS[:3]), padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
            outs["text_encoder.last_hidden_state"] = pipe.text_encoder(ids)[0].numpy()
            outs["unet.noise_pred"] = pipe.unet(torch.from_numpy(x["unet_sample"]), TIMESTEP,
                                                torch.from_numpy(x["unet_context"])).sample.numpy()  # fmt: skip
            outs["vae.decoded"] = pipe.vae.decode(torch.from_numpy(x["vae_latents"])).sample.numpy()
            outs["vae.latent_mean"] = pipe.vae.encode(torch.from_numpy(x["vae_image"])).latent_dist.mean.numpy()
    finally:
        for h in handles:
            h.remove()
    return outs, captured


def load_reference(src: Path) -> Any:
    """diffusers' StableDiffusionPipeline in float32 on the CPU (no safety checker)."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(src), dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(
    pipe: Any,
    latents: np.ndarray,
    *,
    prompt: str = E2E_PROMPT,
    steps: int = E2E_STEPS,
    guidance: float = E2E_GUIDANCE,
    scheduler: str = "",
    seed: int = 0,
    negative: str = "",
) -> np.ndarray:
    """diffusers' images (uint8 NHWC) for given initial latents, as ``generate_image`` computes them."""
    import torch

    from mlxd_daemon.pipelines.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(dict(pipe.scheduler.config), scheduler)
    f = pipe.vae_scale_factor
    out = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
               latents=torch.from_numpy(latents), output_type="np", generator=torch.Generator().manual_seed(seed),
               height=latents.shape[2] * f, width=latents.shape[3] * f)  # fmt: skip
    return (np.asarray(out.images) * 255).round().astype(np.uint8)


def validate_pipeline(src: Path, mlx_dir: Path, *, reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """Compare the MLX pipeline ``mlx_dir`` with the diffusers pipeline ``src``; write ``validation.json``.

    Returns ``validate_model``'s keys (passed, layers, first_divergent_layer, outputs, band, ...) plus
    ``components`` (band per component) and ``end_to_end`` (psnr_db, min_psnr_db, scheduler, steps)."""
    from mlxd_daemon.pipelines import sd

    start = time.perf_counter()
    src, mlx_dir = Path(src), Path(mlx_dir)
    if not sd.is_pipeline(src):
        msg = f"reference {src} is not a diffusers pipeline directory (no model_index.json): pass the source pipeline"
        raise InvalidArgument(msg, reason="MODEL_TYPE_MISMATCH", source=str(src))
    reporter.begin("mlx", total_items=1, message=f"MLX on {mlx_dir}")
    bundle = sd.load(mlx_dir)
    inputs = golden_inputs(bundle)
    candidate, mlx_layers = _run_mlx(bundle, inputs)
    reporter.report(1)
    reporter.begin("reference", total_items=1, message=f"diffusers on {src}")
    try:
        pipe = load_reference(src)
        reference, ref_layers = _run_reference(pipe, inputs, list(mlx_layers))
    except MlxdError:
        raise
    except Exception as e:  # diffusers/transformers raise many types for a broken pipeline
        msg = f"the diffusers reference could not run on {src}: {e}"
        raise InvalidArgument(msg, reason="REFERENCE_FAILED", path=str(src)) from e
    reporter.report(1)
    bands = {c: _band(mlx_dir / c, bundle.component_dtypes[c]) for c in ("text_encoder", "unet", "vae")}
    tolerances = {name: tolerance_for(name, TOLERANCES[bands[name.split(".")[0]]]) for name in reference}
    reports = [r.to_dict() for r in compare(reference, candidate, tolerances)]
    layers = []
    for component, band in bands.items():
        mine = {k: v for k, v in mlx_layers.items() if k.startswith(component + ".")}
        layers += compare_layers(ref_layers, mine, LAYER_REL_TOL[band])

    reporter.begin("end_to_end", total_items=1, message=f"{E2E_STEPS} steps, guidance {E2E_GUIDANCE}")
    latents = inputs["e2e_latents"]
    want = reference_images(pipe, latents)
    got = bundle.generate_image(sd.Request(E2E_PROMPT, steps=E2E_STEPS, guidance=E2E_GUIDANCE, latents=latents))[
        "images"
    ]
    e2e_band = bands["unet"]
    db = psnr(want, got)
    floor = IMAGE_MIN_PSNR.get(e2e_band)
    passed = floor is None or db >= floor
    e2e = {"psnr_db": db if math.isfinite(db) else None, "min_psnr_db": floor, "steps": E2E_STEPS,
           "guidance": E2E_GUIDANCE, "scheduler": type(pipe.scheduler).__name__,
           "passed": passed, "finite": bool(np.isfinite(got).all())}  # fmt: skip
    shown = "identical pixels" if not math.isfinite(db) else f"PSNR {db:.1f} dB"
    gate = f" (>= {floor:g} required)" if floor is not None else " (reported, not gated in this band)"
    note = f"{shown}{gate}, {E2E_STEPS} steps of {e2e['scheduler']}"
    image = OutputReport("pipeline.image", **metrics(want, got), atol=0.0, rtol=0.0, min_cosine=0.0,
                         passed=passed, note=note)  # fmt: skip
    reports.append(image.to_dict())
    reporter.report(1)
    reporter.end()
    first_bad = next((layer["name"] for layer in layers if not layer["passed"]), "")
    result = {
        "passed": all(r["passed"] for r in reports) and not first_bad and e2e["passed"],
        "layers": layers,
        "first_divergent_layer": first_bad,
        "model_type": "stable_diffusion",
        "dtype": bundle.dtype,
        "quantization_bits": None,
        "band": bands["unet"],
        "components": bands,
        "outputs": reports,
        "end_to_end": e2e,
        "matching_agreement": None,  # nothing is matched in a pipeline: not measured, so unset
        "num_texts": 3,
        "num_images": 1,
        "seconds": round(time.perf_counter() - start, 3),
    }
    (mlx_dir / "validation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    _summarise_in_manifest(mlx_dir, result)
    return result
