"""Image inputs, equivalent to Hugging Face's PIL-backend image processors: one pipeline, one config per family.

Every processor: convert to RGB (alpha composited onto white), resize, (crop), rescale by ``rescale_factor`` and
normalize with the mean/std of ``preprocessor_config.json``; the result is float32 [C, H, W]. What differs is
the geometry: ``ClipImageConfig`` (``CLIPImageProcessor``: shortest edge, bicubic, center crop) and
``VitImageConfig`` (``ViTImageProcessor``: exactly {height, width}, bilinear, no crop). One deliberate difference
from HF: when ``do_convert_rgb`` is unset, HF passes greyscale/RGBA images through and then fails on the
3-channel mean; we convert them to RGB.

Rescale and normalize map each (uint8 value, channel) to one float, so they are a [256, C] table
(``normalize_table``, built by HF's own arithmetic: the same bits). ``image_batch`` gives the uint8 crops, which
the served paths send to MLX and look up there (``_served.PixelTable``); ``preprocess_images`` looks them up here.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from mlxd_daemon.archs._config import known_kwargs
from mlxd_daemon.errors import InvalidArgument

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
T = TypeVar("T")
CHANNELS = 3  # what every processor gives (see the module docstring)


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

    def _resize(self, image: Image.Image) -> np.ndarray:
        """The resized (and cropped) image as uint8 [H, W, channels]."""
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

    def _resize(self, image: Image.Image) -> np.ndarray:
        if self.do_resize:
            image = _resize_shortest(image, self.shortest_edge, self.resample)
        arr = _hwc(image)
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

    def _resize(self, image: Image.Image) -> np.ndarray:
        if self.do_resize:
            image = _resize_to(image, (self.width, self.height), self.resample)
        return _hwc(image)

    @property
    def output_size(self) -> tuple[int, int]:
        return self.height, self.width


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency is composited onto white as HF's convert_to_rgb does. An RGB image is returned as is."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _hwc(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _resize_to(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    # PIL returns a copy when the size is unchanged; skip even that.
    return image if image.size == size else image.resize(size, resample=resample)


def _resize_shortest(image: Image.Image, edge: int, resample: int) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    # int() truncation, not rounding: this is what HF's get_resize_output_image_size does.
    new_short, new_long = edge, int(edge * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    return _resize_to(image, (new_w, new_h), resample)


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


@functools.cache
def normalize_table(cfg: ImageConfig) -> np.ndarray:
    """float32 [256, 3]: ``rescale_normalize`` of each uint8 value in each channel. Elementwise IEEE arithmetic
    gives the same bits whatever the array, so looking a crop up here equals running ``rescale_normalize`` on it."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, CHANNELS))
    table = np.ascontiguousarray(rescale_normalize(values, cfg)[:, :, 0].T)
    table.flags.writeable = False  # shared by every caller (cached)
    return table


def look_up(crops: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32, each value replaced by its channel's entry of ``table`` [256, C]."""
    out = np.empty(crops.shape, np.float32)
    columns = [np.ascontiguousarray(table[:, c]) for c in range(crops.shape[-1])]
    # Image by image: a whole batch's strided writes run at half the speed (cache misses).
    for image, dest in zip(crops.reshape(-1, *crops.shape[-3:]), out.reshape(-1, *crops.shape[-3:]), strict=True):
        for c, column in enumerate(columns):
            np.take(column, image[..., c], out=dest[..., c], mode="clip")  # clip: unbuffered, and never out of range
    return out


def _crop(image: Image.Image, cfg: ImageConfig, index: int) -> np.ndarray:
    """One image -> uint8 [H, W, 3]: RGB, resized, cropped; not yet rescaled or normalized."""
    if not isinstance(image, Image.Image):
        msg = f"expected a PIL.Image, got {type(image).__name__}"
        raise InvalidArgument(msg, reason="BAD_IMAGE")
    arr = cfg._resize(to_rgb(image) if cfg.do_convert_rgb else image)
    if arr.dtype != np.uint8 or arr.shape[2] not in (1, CHANNELS):
        msg = f"image {index} has mode {image.mode}: set do_convert_rgb in preprocessor_config.json to convert it"
        raise InvalidArgument(msg, reason="BAD_IMAGE", index=index)
    return arr


def image_batch(images: list[Image.Image], cfg: ImageConfig) -> np.ndarray:
    """Images -> uint8 [n, H, W, 3] crops (greyscale ones, unconverted, repeat their channel); ``look_up`` in
    ``normalize_table(cfg)`` and transposed to NCHW, what ``preprocess_images`` returns."""
    out = np.empty((len(images), *cfg.output_size, CHANNELS), np.uint8)

    def one(i: int) -> None:
        crop = _crop(images[i], cfg, i)
        if crop.shape[:2] != out.shape[1:3]:
            msg = f"image {i} came out {crop.shape[:2]}, not {cfg.output_size}: check preprocessor_config.json"
            raise InvalidArgument(msg, reason="BAD_IMAGE_SIZE", index=i)
        out[i] = crop

    map_images(one, len(images))
    return out


def map_images(fn: Callable[[int], T], n: int) -> list[T]:
    """``[fn(0), ..., fn(n - 1)]`` on a thread per core: PIL's decoding and resampling and numpy's copies release
    the GIL. The first failure, in index order, is raised; one image runs on the calling thread."""
    if n <= 1:
        return [fn(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, range(n)))


def preprocess_images(images: list[Image.Image], cfg: ImageConfig) -> np.ndarray:
    """Batch of images -> float32 [n, 3, H, W], what HF's PIL-backend image processor of ``cfg``'s family returns;
    an empty list gives shape [0, 3, *cfg.output_size]."""
    pixels = look_up(image_batch(images, cfg), normalize_table(cfg))
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
