"""ViT (HF ``model_type: vit``) in MLX: ``ViTForImageClassification`` logits and plain ``ViTModel`` embeddings.

Names on disk are the checkpoints' Hugging Face names with the ``vit.`` prefix stripped (as ``bert`` strips
``bert.``), so classifier and ``ViTModel`` checkpoints share one layout: ``embeddings.*``,
``encoder.layer.N.{attention.attention.query|key|value, attention.output.dense, intermediate.dense,
output.dense, layernorm_before, layernorm_after}``, ``layernorm``, ``pooler.dense``, ``classifier``.
transformers >= 5 names the modules ``layers.N.attention.q_proj``/``mlp.fc1``... in memory but still saves the
names above; ``map_weight`` maps the in-memory spelling (a ``torch.save``'d state dict) back to them. The one
layout change is the patch-embedding conv (see ``DISK_LAYOUT``). Inputs come from ``image_processing``
(``VitImageConfig``).

Per-layer taps use transformers' in-memory module paths without ``vit.`` (``embeddings``, ``layers.N``): the
PyTorch hooks match a module named ``layers.N`` (``ViTModel``) or ending in ``.layers.N`` (``vit.layers.N``).

Output keys of ``ViTBundle.forward_outputs``, ``run_mlx`` and ``run_reference``:
  ``last_hidden_state`` [n, 1 + patches, D]: encoder output after the final ``layernorm``;
  ``image_embeds`` [n, D]: the L2-normalised CLS token of ``last_hidden_state`` (what the classifier sees);
  ``logits`` [n, num_labels]: ``classifier(last_hidden_state[:, 0])``, only for ``ViTForImageClassification``;
  ``pooler_output`` [n, P]: ``pooler_act(pooler.dense(CLS))``, only for a ``ViTModel`` with pooler weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from mlxd_daemon.archs import _tensors
from mlxd_daemon.archs._activations import activation
from mlxd_daemon.archs._attention import attention
from mlxd_daemon.archs._config import ClassifierHead, labelled
from mlxd_daemon.archs._loading import fill_model, read_weights, require_dir
from mlxd_daemon.archs._loading import read_config as read_arch_config
from mlxd_daemon.archs.contract import Stored
from mlxd_daemon.archs.image_processing import VitImageConfig, preprocess_images
from mlxd_daemon.archs.vit_served import VitServed
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.taps import tap

PATCH_WEIGHT = "embeddings.patch_embeddings.projection.weight"
# Kept in PyTorch layout on disk, like CLIP's: the loader transposes it as the recorded layout says.
DISK_LAYOUT: dict[str, str] = {PATCH_WEIGHT: "pytorch_conv2d_OIHW"}
_KEEP = ("embeddings.", "encoder.", "layernorm.", "pooler.", "classifier.")
# Only masked-image modeling reads mask_token (ViTForMaskedImageModeling); its decoder.* is dropped too.
_DROP = ("embeddings.mask_token",)
# transformers >= 5 in-memory names -> the names checkpoints are saved with (its conversion_mapping, reversed).
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    )
)
_IMAGE_CLS = "ViTForImageClassification"
_POOLER_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {"tanh": mx.tanh}  # HF's pooler_act default


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            msg = f"vit {name}={value} must be an int or [height, width]"
            raise Unsupported(msg, reason="UNSUPPORTED_CONFIG")
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclass(frozen=True)
class ViTConfig(ClassifierHead):
    HEAD_CLASS = _IMAGE_CLS
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: Any = 224  # int or [h, w]; normalised to (h, w)
    patch_size: Any = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None  # None: hidden_size, as HF's ViTConfig
    pooler_act: str = "tanh"
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        image, patch = _pair(self.image_size, "image_size"), _pair(self.patch_size, "patch_size")
        if image[0] % patch[0] or image[1] % patch[1]:
            msg = f"vit image_size {image} is not a multiple of patch_size {patch}"
            raise Unsupported(msg, reason="UNSUPPORTED_CONFIG")
        object.__setattr__(self, "image_size", image)
        object.__setattr__(self, "patch_size", patch)
        object.__setattr__(self, "pooler_output_size", self.pooler_output_size or self.hidden_size)
        super().__post_init__()

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])


class ViTPatchConv(nn.Module):
    """A stride=kernel conv, done as patchify + matmul; ``weight`` is MLX conv layout [O, kH, kW, I]."""

    def __init__(self, channels: int, dims: int, patch: tuple[int, int]):
        super().__init__()
        self.patch = patch
        self.weight = mx.zeros((dims, patch[0], patch[1], channels))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        p, q = self.patch
        x = x.reshape(b, h // p, p, w // q, q, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * q * c)
        return x @ self.weight.reshape(self.weight.shape[0], -1).T + self.bias


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = ViTPatchConv(cfg.num_channels, cfg.hidden_size, cfg.patch_size)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cls_token = mx.zeros((1, 1, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)
        self.position_embeddings = mx.zeros((1, cfg.num_patches + 1, cfg.hidden_size))

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        patches = self.patch_embeddings.projection(pixels_nhwc)
        cls = mx.broadcast_to(self.cls_token, (patches.shape[0], 1, patches.shape[-1]))
        return mx.concatenate([cls, patches], axis=1) + self.position_embeddings


class ViTSelfAttention(nn.Module):
    def __init__(self, dims: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.query = nn.Linear(dims, dims, bias=bias)
        self.key = nn.Linear(dims, dims, bias=bias)
        self.value = nn.Linear(dims, dims, bias=bias)

    def __call__(self, x: mx.array, keys: mx.array | None = None) -> mx.array:
        """Attention of ``x``'s positions over ``keys``' (default: ``x``'s own)."""
        keys = x if keys is None else keys
        return attention(self.query(x), self.key(keys), self.value(keys), self.heads, self.scale)


class ViTDense(nn.Module):
    """``attention.output``, ``intermediate`` and ``output``: one Linear named ``dense`` (+ activation)."""

    def __init__(self, dims_in: int, dims_out: int, act: Any = None):
        super().__init__()
        self.act = act
        self.dense = nn.Linear(dims_in, dims_out)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.dense(x)
        return self.act(y) if self.act is not None else y


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.qkv_bias)  # sic: HF's
        self.output = ViTDense(cfg.hidden_size, cfg.hidden_size)

    def __call__(self, x: mx.array, keys: mx.array | None = None) -> mx.array:
        return self.output(self.attention(x, keys))


class ViTLayer(nn.Module):
    """Pre-LN: ``x + attention(layernorm_before(x))``, then ``x + output(intermediate(layernorm_after(x)))``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = ViTAttention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = ViTDense(cfg.hidden_size, cfg.intermediate_size, activation(cfg.hidden_act))
        self.output = ViTDense(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.intermediate(self.layernorm_after(x)))

    def cls(self, x: mx.array) -> mx.array:
        """The layer's output at the class token only [B, 1, D]; every position is still a key and value. What
        the embedding and classifier need of the last layer, at a fraction of its cost."""
        h = self.layernorm_before(x)
        x = x[:, :1] + self.attention(h[:, :1], keys=h)
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = [ViTLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for i, layer in enumerate(self.layer):
            # transformers' in-memory module path (see the module docstring), not the on-disk "encoder.layer.i".
            x = tap(f"layers.{i}", layer(x))
        return x


class ViTModel(nn.Module):
    """``ViTModel`` (pooler only when the checkpoint has one) + ``classifier`` when ``num_labels``."""

    def __init__(self, cfg: ViTConfig, *, pooler: bool, num_labels: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if pooler:
            size = cfg.pooler_output_size or cfg.hidden_size
            self.pooler = ViTDense(cfg.hidden_size, size, activation(cfg.pooler_act, _POOLER_ACTIVATIONS))
        if num_labels:
            self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    def __call__(self, pixel_values: np.ndarray) -> mx.array:
        """last_hidden_state [B, 1 + patches, D] from NCHW pixels."""
        self.check(pixel_values)
        return self.encode(mx.array(pixel_values.astype(np.float32)).transpose(0, 2, 3, 1))

    def check(self, pixel_values: np.ndarray) -> None:
        want = (self.cfg.num_channels, *self.cfg.image_size)
        if tuple(pixel_values.shape[1:]) != want:
            msg = f"pixel_values {tuple(pixel_values.shape)} do not match the model's [N, {', '.join(map(str, want))}]"
            raise InvalidArgument(msg, reason="BAD_IMAGE_SIZE")

    def encode(self, pixels_nhwc: mx.array) -> mx.array:
        """last_hidden_state from NHWC pixels (pure MLX, so the served path can compile it)."""
        return self.layernorm(self.encoder(tap("embeddings", self.embeddings(pixels_nhwc))))

    def encode_cls(self, pixels_nhwc: mx.array) -> mx.array:
        """``encode``'s class token alone [B, D]: the last layer runs at that token only (the served path)."""
        x = self.embeddings(pixels_nhwc)
        for layer in self.encoder.layer[:-1]:
            x = layer(x)
        return self.layernorm(self.encoder.layer[-1].cls(x)[:, 0])


def _l2_normalise(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


@dataclass
class ViTBundle(Stored):
    """A loaded ViT: model (compute per the backend's policy) and image settings, plus storage facts."""

    model: ViTModel
    config: ViTConfig
    image_config: VitImageConfig

    @property
    def is_classifier(self) -> bool:
        return "classifier" in self.model

    def forward_outputs(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs (see the module docstring for keys); an empty batch gives empty arrays."""
        m, cfg = self.model, self.config
        pixels = np.asarray(pixel_values)
        out: dict[str, mx.array] = {}
        if len(pixels):
            hidden = m(pixels)
            out["last_hidden_state"] = hidden
            out["image_embeds"] = _l2_normalise(hidden[:, 0])
            if self.is_classifier:
                out["logits"] = m.classifier(hidden[:, 0])
            if "pooler" in m:
                out["pooler_output"] = m.pooler(hidden[:, 0])
        else:
            out["last_hidden_state"] = mx.zeros((0, cfg.num_patches + 1, cfg.hidden_size))
            out["image_embeds"] = mx.zeros((0, cfg.hidden_size))
            if self.is_classifier:
                out["logits"] = mx.zeros((0, len(cfg.labels)))
            if "pooler" in m:
                out["pooler_output"] = mx.zeros((0, cfg.pooler_output_size or cfg.hidden_size))
        mx.eval(out)
        return {k: np.array(v) for k, v in out.items()}

    def embed(self, texts: list[str], images: list[Image.Image]) -> dict[str, Any]:
        """``image_embeds``; classifiers add ``logits`` [n, labels] and ``labels`` (id2label in order): the served
        path (a compiled forward over batch buckets, ``vit_served``)."""
        if texts:
            msg = f"ViT is an image model: {len(texts)} text(s) given, send images only"
            raise InvalidArgument(msg, reason="TEXTS_NOT_SUPPORTED", texts=len(texts))
        return labelled(self.served.embed(list(images)), self.config, self.is_classifier)

    def embed_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """``embed``'s outputs from ``pixel_values`` or ``pixels`` (``_tensors``), through the same served path."""
        cfg = self.config
        _tensors.check_names(inputs, _tensors.IMAGE_INPUTS, "ViT")
        given = _tensors.images(inputs, cfg.image_size, cfg.num_channels)
        if "pixels" in given:
            return labelled(self.served.forward(given["pixels"]), self.config, self.is_classifier)
        return labelled(self.served.forward_values(given["pixel_values"]), self.config, self.is_classifier)

    @cached_property
    def served(self) -> VitServed:
        return VitServed(self)

    def warm_up(self) -> float:
        """Compile the common graphs now (called at load), so the first request does not pay for it."""
        return self.served.warm_up()


def map_weight(name: str) -> str | None:
    """HF tensor name -> name on disk: ``vit.`` stripped, transformers-5 in-memory names mapped to the saved
    ones, ``classifier.*`` kept, ``mask_token`` and other heads (``decoder.*``) dropped. A second pass is a no-op."""
    name = name.removeprefix("vit.")
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    if name in _DROP or not name.startswith(_KEEP):
        return None
    return name


def read_config(model_dir: Path) -> ViTConfig:
    """Parse ``model_dir/config.json``; raise ``InvalidArgument`` unless it is a ViT config."""
    return read_arch_config(model_dir, "vit", ViTConfig.from_dict, "ViT")


def _patch_layout(layout: dict[str, str] | None) -> str:
    # No record at all: a raw HF/PyTorch directory. A record without the patch weight: written in MLX layout.
    if layout is None:
        return "pytorch_conv2d_OIHW"
    return layout.get(PATCH_WEIGHT, "mlx_conv2d_OHWI")


def load(model_dir: Path) -> ViTBundle:
    """Load a converted (or raw HF safetensors) ViT directory: float32 on the CPU, quantized kernels on GPUs."""
    model_dir = require_dir(model_dir)
    cfg = read_config(model_dir)
    weights, layout, dtype = read_weights(model_dir, map_weight)
    patch_layout = _patch_layout(layout)
    if PATCH_WEIGHT in weights and patch_layout == "pytorch_conv2d_OIHW":
        # pytorch conv2d is [O, I, kH, kW], MLX is [O, kH, kW, I].
        weights[PATCH_WEIGHT] = weights[PATCH_WEIGHT].transpose(0, 2, 3, 1)
    elif patch_layout != "mlx_conv2d_OHWI":
        msg = f"{PATCH_WEIGHT} in {model_dir} has unknown recorded layout {patch_layout!r}: re-run the conversion"
        raise InvalidArgument(msg, reason="BAD_LAYOUT", tensor=PATCH_WEIGHT, layout=patch_layout)
    if cfg.is_classifier:
        # ViTForImageClassification has no pooler (HF ignores one in the checkpoint).
        weights = {k: v for k, v in weights.items() if not k.startswith("pooler.")}
        if "classifier.weight" not in weights:
            msg = f"{model_dir} is a {_IMAGE_CLS} without classifier weights: re-convert the full checkpoint"
            raise InvalidArgument(msg, reason="WEIGHTS_MISMATCH", missing="classifier.weight")
    else:
        # Only image classification heads are implemented: other checkpoints serve embeddings.
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    has_pooler = "pooler.dense.weight" in weights
    model = ViTModel(cfg, pooler=has_pooler, num_labels=len(cfg.labels) if cfg.is_classifier else 0)
    compute, nbytes = fill_model(model, weights, cfg.quantization, model_dir, "ViT")
    return ViTBundle(
        model=model,
        config=cfg,
        image_config=VitImageConfig.load(model_dir, cfg.image_size),
        model_dir=model_dir,
        dtype=dtype,
        nbytes=nbytes,
        quantization=cfg.quantization,
        compute_dtype=compute,
    )


# ---- validation hooks -------------------------------------------------------------------------------------


def golden_inputs(
    model_dir: Path, *, texts: list[str] | None = None, images: list[Image.Image] | None = None
) -> dict[str, Any]:
    """Deterministic images (or the caller's), preprocessed with ``model_dir``'s processor settings."""
    from mlxd_daemon.golden import golden_images

    if texts:
        msg = f"ViT is an image model: {len(texts)} text(s) given, validate with images only"
        raise InvalidArgument(msg, reason="TEXTS_NOT_SUPPORTED", texts=len(texts))
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    images = golden_images(4, min(cfg.image_size) + 9) if images is None else list(images)
    pixels = preprocess_images(images, VitImageConfig.load(model_dir, cfg.image_size))
    return {"texts": [], "images": images, "pixel_values": pixels}


def run_mlx(bundle: ViTBundle, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The MLX outputs for ``golden_inputs``' preprocessed pixels."""
    return bundle.forward_outputs(inputs["pixel_values"])


def run_reference(src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers' ViTForImageClassification / ViTModel (float32, no_grad) on the same pixels; keys as
    ``run_mlx``. ``pooler_output`` only when the source checkpoint has pooler weights (else HF's is random)."""
    import torch
    import transformers

    cfg = read_config(Path(src_dir))
    auto = transformers.ViTForImageClassification if cfg.is_classifier else transformers.ViTModel
    loaded = auto.from_pretrained(str(src_dir), dtype=torch.float32, output_loading_info=True)
    model, info = cast("tuple[Any, dict[str, Any]]", loaded)
    model.eval()
    has_pooler = not cfg.is_classifier and not any("pooler." in k for k in info.get("missing_keys", ()))
    pixels = torch.from_numpy(np.asarray(inputs["pixel_values"], np.float32))
    d = cfg.hidden_size
    if not len(pixels):
        empty: dict[str, tuple[int, ...]] = {"last_hidden_state": (0, cfg.num_patches + 1, d), "image_embeds": (0, d)}
        empty |= {"logits": (0, len(cfg.labels))} if cfg.is_classifier else {}
        empty |= {"pooler_output": (0, cfg.pooler_output_size or d)} if has_pooler else {}
        return {k: np.zeros(shape, np.float32) for k, shape in empty.items()}
    with torch.no_grad():
        base = model.vit if cfg.is_classifier else model
        o = base(pixel_values=pixels)
        cls = o.last_hidden_state[:, 0]
        out = {
            "last_hidden_state": o.last_hidden_state,
            "image_embeds": cls / cls.norm(dim=-1, keepdim=True).clamp_min(1e-30),
        }
        if cfg.is_classifier:
            out["logits"] = model.classifier(cls)
        if has_pooler:
            out["pooler_output"] = o.pooler_output
    return {k: v.float().numpy() for k, v in out.items()}
