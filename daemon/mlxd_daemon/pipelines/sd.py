"""A converted Stable Diffusion pipeline in MLX: components, loading, and txt2img / img2img.

The loop is diffusers' ``StableDiffusionPipeline.__call__`` (and the img2img pipeline's): CLIP text embeddings
(negative first for classifier-free guidance), the scheduler from ``schedulers.py`` (diffusers' own), the UNet
step in MLX (compiled with ``mx.compile``), then the VAE decode. Initial latents and ancestral noise come from
a ``torch.Generator`` seeded like diffusers', so the same seed gives diffusers' image; or pass ``latents``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxd_daemon.archs._loading import fill_model, read_json, read_safetensors, require_dir, storage_dtype
from mlxd_daemon.archs.clip_model import CLIPTextTransformer, TextConfig
from mlxd_daemon.archs.clip_processing import load_tokenizer
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.pipelines.schedulers import make_scheduler, step_kwargs
from mlxd_daemon.pipelines.unet import UNet2DConditionModel, UNetConfig
from mlxd_daemon.pipelines.vae import AutoencoderKL, VAEConfig

CONV_LAYOUT = "pytorch_conv2d_OIHW"
MAX_STEPS, MAX_IMAGES, MAX_SIDE = 1000, 16, 2048


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel: the project's CLIP text tower under ``text_model``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)

    def __call__(self, input_ids: np.ndarray) -> mx.array:
        """last_hidden_state [B, L, D] (what SD conditions on); no padding mask, as the SD pipeline calls it."""
        return self.text_model(input_ids, np.ones_like(input_ids))[1]


def parse_component_config(name: str, config: dict[str, Any]) -> Any:
    """The component's config dataclass; ``Unsupported`` for what mlxd does not map."""
    if name == "unet":
        return UNetConfig.from_dict(config)
    if name == "vae":
        return VAEConfig.from_dict(config)
    if config.get("model_type") != "clip_text_model":
        msg = f"text_encoder is model_type {config.get('model_type')!r}; mlxd maps CLIPTextModel (clip_text_model)"
        raise Unsupported(msg, reason="UNSUPPORTED_PIPELINE", component="text_encoder")
    return TextConfig.from_dict(config)


def build_component(name: str, config: dict[str, Any]) -> nn.Module:
    """An MLX module with random (lazy, never evaluated) parameters for the component's config."""
    cfg = parse_component_config(name, config)
    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[name](cfg)


def load_component(model_dir: Path, name: str) -> tuple[nn.Module, dict[str, Any], str, str, int]:
    """(module, config, stored dtype, compute policy, resident bytes) of one converted component."""
    folder = model_dir / name
    config = read_json(folder / "config.json", f"Stable Diffusion {name}")
    module = build_component(name, config)
    weights, layout = read_safetensors(folder)
    dtype = storage_dtype(weights)
    for key, how in (layout or {}).items():
        if how == CONV_LAYOUT and key in weights:
            weights[key] = weights[key].transpose(0, 2, 3, 1)  # PyTorch conv2d [O, I, kH, kW] -> MLX [O, kH, kW, I]
    compute, nbytes = fill_model(module, weights, config.get("quantization"), folder, f"Stable Diffusion {name}")
    return module, config, dtype, compute, nbytes


def is_pipeline(path: str | Path) -> bool:
    """A diffusers (or converted) pipeline directory: it has model_index.json."""
    return (Path(path) / "model_index.json").is_file()


@dataclass
class Request:
    """One txt2img / img2img request (see ``StableDiffusion.generate_image``)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    width: int = 0
    height: int = 0
    num_images: int = 1
    latents: np.ndarray | None = None
    scheduler: str = ""
    image: Any = None  # a PIL image for img2img
    strength: float = 0.8


@dataclass
class StableDiffusion:
    """A loaded pipeline: text encoder, UNet, VAE (MLX), tokenizer, scheduler config; sizes for residency."""

    model_dir: Path
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: Any
    max_length: int
    scheduler_config: dict[str, Any]
    vae_config: VAEConfig
    dtype: str
    compute_dtype: str
    nbytes: int
    component_dtypes: dict[str, str] = field(default_factory=dict)
    _step: Callable[..., mx.array] | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, np.ndarray]:
        """Infer does not apply to a diffusion pipeline: say which RPC does."""
        msg = "a Stable Diffusion pipeline generates images: use GenerateImage (mlxctl txt2img), not Infer"
        raise InvalidArgument(msg, reason="USE_GENERATE_IMAGE")

    def encode_text(self, texts: list[str]) -> tuple[mx.array, list[str]]:
        """Hidden states [n, max_length, D] of texts padded to the tokenizer's max length (as diffusers does),
        and the part of each text that truncation cut off ("" when none)."""
        encs = self.tokenizer.encode_batch(texts)
        cut = []
        for enc in encs:
            over = [i for chunk in enc.overflowing for i in chunk.ids]
            text = self.tokenizer.decode(over, skip_special_tokens=True) if over else ""
            # CLIP BPE marks word ends with </w>; a tokenizer.json with a byte-level decoder leaves them in.
            cut.append(" ".join(text.replace("</w>", " ").split()))
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        return self.text_encoder(ids), cut

    def unet_step(self, x: mx.array, t: mx.array, context: mx.array) -> mx.array:
        """One noise prediction (NHWC), through ``mx.compile`` (traced once per input shape)."""
        if self._step is None:
            self._step = mx.compile(self.unet)
        return self._step(x, t, context)

    def generate_image(self, req: Request, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """diffusers' txt2img (or img2img with ``req.image``): returns ``images`` (uint8 [N, H, W, 3]), timing and
        ``truncated`` (the prompt text cut at the tokenizer's limit, "" when none). ``on_step(done, total)`` runs
        after every step (a cancel raises there)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        start = time.perf_counter()
        _check_request(req)
        scheduler = make_scheduler(self.scheduler_config, req.scheduler)
        generator = torch.Generator("cpu").manual_seed(int(req.seed))
        n = req.num_images
        cfg = req.guidance > 1.0
        texts = [req.prompt] + ([req.negative_prompt] if cfg else [])
        hidden, cut = self.encode_text(texts)
        cond = mx.repeat(hidden[:1], n, axis=0)
        context = mx.concatenate([mx.repeat(hidden[1:2], n, axis=0), cond]) if cfg else cond
        scheduler.set_timesteps(req.steps, device="cpu")
        timesteps = scheduler.timesteps
        f = self.vae_scale_factor
        steps = req.steps  # diffusers' num_inference_steps (PNDM runs one UNet call more than that)
        if req.image is not None:
            image = _image_tensor(req.image, req.width, req.height, f)
            height, width = image.shape[1:3]
            init_step = min(int(req.steps * req.strength), req.steps)
            t_start = max(req.steps - init_step, 0)
            timesteps = timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            steps = req.steps - t_start
            if len(timesteps) == 0:
                msg = f"strength {req.strength} with {req.steps} steps leaves no denoising step: raise either"
                raise InvalidArgument(msg, reason="BAD_STRENGTH")
            mean, std = self.vae.encode(mx.array(np.repeat(image, n, axis=0)))
            mean_t, std_t = _nchw(mean), _nchw(std)
            init = self.vae_config.scaling_factor * (mean_t + std_t * randn_tensor(mean_t.shape, generator=generator))
            noise = randn_tensor(init.shape, generator=generator)
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(n))
        else:
            height = req.height or self.unet.cfg.sample_size * f
            width = req.width or self.unet.cfg.sample_size * f
            shape = (n, self.unet.cfg.in_channels, height // f, width // f)
            latents = _given_latents(req.latents, shape) if req.latents is not None else randn_tensor(
                shape, generator=generator, dtype=torch.float32)  # fmt: skip
            latents = latents * scheduler.init_noise_sigma
        _check_size(width, height, f, len(self.unet.cfg.block_out_channels))
        extra = step_kwargs(scheduler, generator)
        loop_start = time.perf_counter()
        for i, t in enumerate(timesteps):
            x = torch.cat([latents] * 2) if cfg else latents
            x = scheduler.scale_model_input(x, t)
            tt = mx.full((x.shape[0],), float(t), dtype=mx.float32)
            noise = self.unet_step(mx.array(x.permute(0, 2, 3, 1).numpy()), tt, context)
            noise_t = _nchw(noise)
            if cfg:
                uncond, text = noise_t.chunk(2)
                noise_t = uncond + req.guidance * (text - uncond)
            latents = scheduler.step(noise_t, t, latents, **extra, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        loop_seconds = time.perf_counter() - loop_start
        decoded = self.vae.decode(mx.array((latents / self.vae_config.scaling_factor).permute(0, 2, 3, 1).numpy()))
        pixels = np.clip(np.array(decoded) / 2 + 0.5, 0.0, 1.0)
        return {
            "images": (pixels * 255).round().astype(np.uint8),
            "truncated": cut[0],
            "truncated_negative": cut[1] if cfg else "",
            "width": width,
            "height": height,
            "steps": steps,
            "scheduler": type(scheduler).__name__,
            "seconds": time.perf_counter() - start,
            "loop_seconds": loop_seconds,
        }


def _nchw(a: mx.array) -> Any:
    import torch

    return torch.from_numpy(np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2).copy())


def _given_latents(latents: np.ndarray, shape: tuple[int, ...]) -> Any:
    import torch

    arr = np.asarray(latents, dtype=np.float32)
    if tuple(arr.shape) != shape:
        msg = f"latents have shape {tuple(arr.shape)}, the request needs {shape} (N, C, H/8, W/8 as diffusers')"
        raise InvalidArgument(msg, reason="BAD_LATENTS", shape=str(tuple(arr.shape)))
    return torch.from_numpy(arr.copy())


def _image_tensor(image: Any, width: int, height: int, f: int) -> np.ndarray:
    """diffusers' VaeImageProcessor.preprocess: sizes rounded down to the VAE factor (Lanczos resize when they
    change), [0, 1] → [-1, 1]; NHWC float32 [1, H, W, 3]."""
    from PIL import Image

    w, h = width or image.width, height or image.height
    w, h = w - w % f, h - h % f
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    arr = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    return (2.0 * arr - 1.0)[None]


def _check_size(width: int, height: int, f: int, blocks: int) -> None:
    """Every UNet level halves the latents: sides must divide by the VAE factor times 2^(blocks - 1)."""
    unit = f * 2 ** (blocks - 1)
    if width <= 0 or height <= 0 or width % unit or height % unit or max(width, height) > MAX_SIDE:
        msg = f"image size {width}x{height} must be positive multiples of {unit}, at most {MAX_SIDE}"
        raise InvalidArgument(msg, reason="BAD_SIZE", width=width, height=height)


def _check_request(req: Request) -> None:
    if not 1 <= req.steps <= MAX_STEPS:
        msg = f"steps {req.steps} must be between 1 and {MAX_STEPS}"
        raise InvalidArgument(msg, reason="BAD_STEPS", steps=req.steps)
    if not 1 <= req.num_images <= MAX_IMAGES:
        msg = f"num_images {req.num_images} must be between 1 and {MAX_IMAGES}"
        raise InvalidArgument(msg, reason="BAD_NUM_IMAGES", num_images=req.num_images)
    if req.image is not None and not 0.0 < req.strength <= 1.0:
        msg = f"strength {req.strength} must be in (0, 1]"
        raise InvalidArgument(msg, reason="BAD_STRENGTH", strength=req.strength)
    if not np.isfinite(req.guidance) or req.guidance < 0:
        msg = f"guidance {req.guidance} must be a finite number >= 0"
        raise InvalidArgument(msg, reason="BAD_GUIDANCE")


def load(model_dir: Path) -> StableDiffusion:
    """Load a converted pipeline directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    model_dir = require_dir(model_dir)
    parts = {name: load_component(model_dir, name) for name in ("text_encoder", "unet", "vae")}
    tok_cfg = read_json(model_dir / "tokenizer" / "tokenizer_config.json", "Stable Diffusion tokenizer")
    max_length = int(tok_cfg.get("model_max_length", 77))
    max_length = min(max_length, int(parts["text_encoder"][1].get("max_position_embeddings", 77)))
    tokenizer = load_tokenizer(model_dir / "tokenizer", max_length)
    pad = tokenizer.padding or {}
    # diffusers pads every prompt to the tokenizer's max length (padding="max_length").
    tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "<|endoftext|>"),
                             length=max_length)  # fmt: skip
    return StableDiffusion(
        model_dir=model_dir,
        text_encoder=parts["text_encoder"][0],  # type: ignore[arg-type]
        unet=parts["unet"][0],  # type: ignore[arg-type]
        vae=parts["vae"][0],  # type: ignore[arg-type]
        tokenizer=tokenizer,
        max_length=max_length,
        scheduler_config=read_json(model_dir / "scheduler" / "scheduler_config.json", "Stable Diffusion scheduler"),
        vae_config=VAEConfig.from_dict(parts["vae"][1]),
        dtype=parts["unet"][2],
        compute_dtype=parts["unet"][3],
        nbytes=sum(p[4] for p in parts.values()),
        component_dtypes={name: p[2] for name, p in parts.items()},
    )
