"""Image inputs, equivalent to Hugging Face's PIL-backend image processors: one pipeline, one config per family.

Every processor: convert to RGB (alpha composited onto white), resize, (crop), rescale by ``rescale_factor`` and
normalize with the mean/std of ``preprocessor_config.json``; the result is float32 [C, H, W]. What differs is
the geometry: ``ClipImageConfig`` (``CLIPImageProcessor``: shortest edge, bicubic, center crop) and
``VitImageConfig`` (``ViTImageProcessor``: exactly {height, width}, bilinear, no crop). One deliberate difference
from HF: when ``do_convert_rgb`` is unset, HF passes greyscale/RGBA images through and then fails on the
3-channel mean; we convert them to RGB.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlxd_daemon.archs._config import known_kwargs
from mlxd_daemon.errors import InvalidArgument

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageConfig:
    """The fields every HF image processor shares; subclasses add the geometry (``_geometry``, ``_resize``)."""

    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    resample: int = 3
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Parse ``preprocessor_config.json`` (old and new spellings of ``size``/``crop_size``); None = default."""
        kw = {**known_kwargs(cls, d), **cls._geometry(d)}
        for key in ("image_mean", "image_std"):
            value = kw.get(key)
            if isinstance(value, (int, float)):
                kw[key] = (float(value),) * 3
            elif value is not None:
                kw[key] = tuple(float(x) for x in value)
        return cls(**kw)

    @classmethod
    def _geometry(cls, d: dict[str, Any]) -> dict[str, int]:
        return {}

    def _resize(self, arr: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of a processed image."""
        raise NotImplementedError


@dataclass(frozen=True)
class ClipImageConfig(ImageConfig):
    """``CLIPImageProcessor``: resize the shortest edge (bicubic), then center crop."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    do_center_crop: bool = True

    @classmethod
    def _geometry(cls, d: dict[str, Any]) -> dict[str, int]:
        kw: dict[str, int] = {}
        size, crop = d.get("size"), d.get("crop_size")
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                msg = f"preprocessor size {size} is not supported: CLIP resizes by shortest_edge"
                raise InvalidArgument(msg, reason="BAD_PREPROCESSOR_CONFIG")
            kw["shortest_edge"] = int(size["shortest_edge"])
        elif size is not None:
            kw["shortest_edge"] = int(size)
        if isinstance(crop, dict):
            kw["crop_height"], kw["crop_width"] = int(crop["height"]), int(crop["width"])
        elif crop is not None:
            kw["crop_height"] = kw["crop_width"] = int(crop)
        return kw

    @classmethod
    def load(cls, model_dir: Path, image_size: int) -> ClipImageConfig:
        """From ``preprocessor_config.json``, or CLIP defaults sized to the model when the file is absent."""
        path = Path(model_dir) / PREPROCESSOR_CONFIG
        if path.exists():
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)

    def _resize(self, arr: np.ndarray) -> np.ndarray:
        if self.do_resize:
            arr = _resize_shortest(arr, self.shortest_edge, self.resample)
        if self.do_center_crop:
            arr = _center_crop(arr, self.crop_height, self.crop_width)
        return arr

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop_height, self.crop_width


@dataclass(frozen=True)
class VitImageConfig(ImageConfig):
    """``ViTImageProcessor``: resize to exactly {height, width} (bilinear), no aspect ratio kept, no crop."""

    height: int = 224
    width: int = 224
    resample: int = 2  # PIL.Image.BILINEAR
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD

    @classmethod
    def _geometry(cls, d: dict[str, Any]) -> dict[str, int]:
        size = d.get("size")
        if isinstance(size, dict):
            if "height" not in size or "width" not in size:
                msg = f"preprocessor size {size} is not supported: ViT resizes to {{height, width}}"
                raise InvalidArgument(msg, reason="BAD_PREPROCESSOR_CONFIG")
            return {"height": int(size["height"]), "width": int(size["width"])}
        if size is not None:
            return {"height": int(size), "width": int(size)}  # ViT's default_to_square=True
        return {}

    @classmethod
    def load(cls, model_dir: Path, image_size: tuple[int, int]) -> VitImageConfig:
        """From ``preprocessor_config.json``, or ViT defaults sized to the model when the file is absent."""
        path = Path(model_dir) / PREPROCESSOR_CONFIG
        if path.exists():
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        return cls(height=image_size[0], width=image_size[1])

    def _resize(self, arr: np.ndarray) -> np.ndarray:
        if not self.do_resize:
            return arr
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        resized = np.asarray(pil.resize((self.width, self.height), resample=self.resample))
        return resized.reshape(self.height, self.width, arr.shape[2])

    @property
    def output_size(self) -> tuple[int, int]:
        return self.height, self.width


def to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3]; transparency is composited onto white as HF's convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _resize_shortest(image: np.ndarray, edge: int, resample: int) -> np.ndarray:
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    # int() truncation, not rounding: this is what HF's get_resize_output_image_size does.
    new_short, new_long = edge, int(edge * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=resample))


def _center_crop(image: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < ch or w < cw:
        # Too small: zero-pad to at least the crop size, centred (ceil on the leading side), then crop.
        nh, nw = max(h, ch), max(w, cw)
        top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)
        padded = np.zeros((nh, nw, *image.shape[2:]), image.dtype)
        padded[top_pad : top_pad + h, left_pad : left_pad + w] = image
        image, h, w = padded, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]


def rescale_normalize(arr: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """uint8 HWC -> float32 CHW with HF's ``do_rescale``/``rescale_factor`` and ``do_normalize``/mean/std."""
    out = arr.astype(np.float32)
    if cfg.do_rescale:
        # HF multiplies in float64 and then rounds to float32; doing the same keeps us bit-exact.
        out = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, np.float32)
        std = np.asarray(cfg.image_std, np.float32)
        out = (out - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def preprocess_image(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """One image -> float32 [C, H, W], what HF's PIL-backend image processor of ``cfg``'s family returns."""
    if not isinstance(image, Image.Image):
        msg = f"expected a PIL.Image, got {type(image).__name__}"
        raise InvalidArgument(msg, reason="BAD_IMAGE")
    arr = to_rgb(image) if cfg.do_convert_rgb else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return rescale_normalize(cfg._resize(arr), cfg)


def preprocess_images(images: list[Image.Image], cfg: ImageConfig) -> np.ndarray:
    """Batch of images -> float32 [n, 3, H, W]; an empty list gives shape [0, 3, *cfg.output_size]."""
    if not images:
        return np.zeros((0, 3, *cfg.output_size), np.float32)
    if len(images) == 1:
        return preprocess_image(images[0], cfg)[None]
    # PIL's resampling and numpy's arithmetic release the GIL: a batch uses every core (5 ms an image on one).
    with ThreadPoolExecutor(max_workers=min(len(images), os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(lambda im: preprocess_image(im, cfg), images)))
