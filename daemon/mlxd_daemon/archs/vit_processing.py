"""ViT input processing, equivalent to Hugging Face ``ViTImageProcessor`` (its PIL backend).

Convert to RGB (alpha composited onto white), resize to exactly ``size`` {height, width} with the configured
resampling (bilinear by default, no aspect-ratio keeping, no crop), rescale by 1/255 and normalize with the
mean/std of ``preprocessor_config.json``. One deliberate difference: when the config leaves ``do_convert_rgb``
unset, HF passes greyscale/RGBA images through and then fails on the 3-channel mean; we convert them to RGB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlxd_daemon.archs.clip_processing import rescale_normalize
from mlxd_daemon.errors import InvalidArgument

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageConfig:
    """The subset of ``preprocessor_config.json`` that ViT's image processor uses."""

    height: int = 224
    width: int = 224
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    resample: int = 2  # PIL.Image.BILINEAR
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageConfig:
        """Parse both the old (``size: 224``) and new (``size: {"height": .., "width": ..}``) spellings."""
        known = {f.name for f in fields(cls)}
        # None means "HF's default" for every flag; do_convert_rgb's None is our RGB conversion (module doc).
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known and v is not None}
        size = d.get("size")
        if isinstance(size, dict):
            if "height" not in size or "width" not in size:
                msg = f"preprocessor size {size} is not supported: ViT resizes to {{height, width}}"
                raise InvalidArgument(msg, reason="BAD_PREPROCESSOR_CONFIG")
            kw["height"], kw["width"] = int(size["height"]), int(size["width"])
        elif size is not None:
            kw["height"] = kw["width"] = int(size)  # ViT's default_to_square=True
        for key in ("image_mean", "image_std"):
            value = kw.get(key)
            if isinstance(value, (int, float)):
                kw[key] = (float(value),) * 3
            elif value is not None:
                kw[key] = tuple(float(x) for x in value)
        return cls(**kw)

    @classmethod
    def load(cls, model_dir: Path, image_size: tuple[int, int]) -> ImageConfig:
        """From ``preprocessor_config.json``, or ViT defaults sized to the model when the file is absent."""
        path = Path(model_dir) / "preprocessor_config.json"
        if path.exists():
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        return cls(height=image_size[0], width=image_size[1])


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3]; transparency is composited onto white as HF's convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def preprocess_image(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """One image -> float32 [C, H, W], what HF's PIL-backend ViTImageProcessor returns."""
    if not isinstance(image, Image.Image):
        msg = f"expected a PIL.Image, got {type(image).__name__}"
        raise InvalidArgument(msg, reason="BAD_IMAGE")
    arr = _to_rgb(image) if cfg.do_convert_rgb else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if cfg.do_resize:
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        arr = np.asarray(pil.resize((cfg.width, cfg.height), resample=cfg.resample)).reshape(
            cfg.height, cfg.width, arr.shape[2]
        )
    return rescale_normalize(arr, cfg)


def preprocess_images(images: list[Image.Image], cfg: ImageConfig) -> np.ndarray:
    """Batch of images -> float32 [n, 3, H, W]; an empty list gives shape [0, 3, height, width]."""
    if not images:
        return np.zeros((0, 3, cfg.height, cfg.width), np.float32)
    return np.stack([preprocess_image(im, cfg) for im in images])
