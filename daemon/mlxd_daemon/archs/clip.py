"""CLIP (HF ``model_type: clip``) in MLX: configs, HF-named modules, loading, embedding, validation hooks.

Module and parameter names are exactly Hugging Face's, so weights load by HF name; the one layout change
is the patch-embedding conv (see ``DISK_LAYOUT``). Inputs come from ``clip_processing`` (text) and
``image_processing`` (``ClipImageConfig``): together, CLIPProcessor.

Output keys of ``ClipBundle.forward_outputs``, ``run_mlx`` and ``run_reference``:
  ``text_embeds`` [n_texts, P] and ``image_embeds`` [n_images, P]: L2-normalised projections;
  ``logits_per_image`` [n_images, n_texts]: ``exp(logit_scale) * image_embeds @ text_embeds.T``;
  ``text_last_hidden_state`` [n_texts, L, Dt]: text encoder output after ``final_layer_norm``;
  ``vision_last_hidden_state`` [n_images, 1 + patches, Dv]: vision encoder output (before ``post_layernorm``,
  as HF's ``vision_model_output.last_hidden_state``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from mlxd_daemon.archs._activations import ACTIVATIONS
from mlxd_daemon.archs._config import FromDict
from mlxd_daemon.archs._loading import (
    LAYOUT_METADATA_KEY as LAYOUT_METADATA_KEY,  # re-exported: clip.LAYOUT_METADATA_KEY stays public
)
from mlxd_daemon.archs._loading import (
    fill_model,
    read_json,
    read_safetensors,
    require_dir,
    storage_dtype,
)
from mlxd_daemon.archs._tokenless import has_tokenizer, vocabulary_ids
from mlxd_daemon.archs.clip_processing import load_tokenizer, tokenize
from mlxd_daemon.archs.clip_served import ClipServed
from mlxd_daemon.archs.image_processing import ClipImageConfig, preprocess_images
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.taps import tap

PATCH_WEIGHT = "vision_model.embeddings.patch_embedding.weight"
# Kept in PyTorch layout on disk so mlx-examples' CLIPModel.from_pretrained (which transposes) reads it.
DISK_LAYOUT: dict[str, str] = {PATCH_WEIGHT: "pytorch_conv2d_OIHW"}
_TOP_LEVEL = ("text_model.", "vision_model.", "text_projection.", "visual_projection.", "logit_scale")


@dataclass(frozen=True)
class TextConfig(FromDict):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclass(frozen=True)
class VisionConfig(FromDict):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    msg = f"non-square vision {name}={v} is not supported"
                    raise Unsupported(msg, reason="UNSUPPORTED_CONFIG")
                object.__setattr__(self, name, int(v[0]))


@dataclass(frozen=True)
class ClipConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        """Parse HF CLIPConfig's config.json (text_config/vision_config dicts); unknown keys are ignored."""
        return cls(
            text=TextConfig.from_dict(d.get("text_config") or {}),
            vision=VisionConfig.from_dict(d.get("vision_config") or {}),
            projection_dim=d.get("projection_dim", 512),
            logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
            quantization=d.get("quantization") or None,
        )


def _activation(name: str) -> Any:
    if name not in ACTIVATIONS:
        msg = f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        raise Unsupported(msg, reason="UNSUPPORTED_ACTIVATION", hidden_act=name)
    return ACTIVATIONS[name]


class CLIPAttention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        b, n, d = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.act = _activation(act)
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig | VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig | VisionConfig, name: str):
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self._name = name  # HF module path, for per-layer validation taps

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = tap(f"{self._name}.layers.{i}", layer(x, mask))
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, "text_model.encoder")
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[mx.array, mx.array]:
        """(pooled [B, D], last_hidden_state [B, L, D]); pooling at EOS exactly as transformers does."""
        n = input_ids.shape[1]
        if n > self.cfg.max_position_embeddings:
            msg = f"text is {n} tokens, the model takes at most {self.cfg.max_position_embeddings}: truncate it"
            raise InvalidArgument(msg, reason="TEXT_TOO_LONG")
        ids, keep, eos = self.prepare(input_ids, attention_mask)
        return self.encode(mx.array(ids), mx.array(keep), mx.array(eos))

    def prepare(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """int32 ids, the boolean attention mask [B, 1, L, L] and each row's EOS position."""
        n = input_ids.shape[1]
        # Boolean mask (True = attend): causal, and padded keys hidden, like HF's create_causal_mask.
        keep = np.tril(np.ones((n, n), dtype=bool))[None, None] & attention_mask.astype(bool)[:, None, None, :]
        if self.cfg.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773): EOS is the largest id in each row.
            eos_pos = input_ids.argmax(axis=-1)
        else:
            # First EOS; np.argmax returns the first maximum, and pad may equal EOS.
            eos_pos = (input_ids == self.cfg.eos_token_id).astype(np.int32).argmax(axis=-1)
        return input_ids.astype(np.int32), keep, eos_pos.astype(np.int32)

    def encode(self, ids: mx.array, keep: mx.array, eos_pos: mx.array) -> tuple[mx.array, mx.array]:
        """The tower on prepared inputs (pure MLX, so the served path can compile it)."""
        x = tap("text_model.embeddings", self.embeddings(ids))
        x = self.final_layer_norm(self.encoder(x, keep))
        return x[mx.arange(x.shape[0]), eos_pos], x


class CLIPPatchEmbedding(nn.Module):
    """A stride=kernel conv, done as patchify + matmul; ``weight`` is MLX conv layout [O, kH, kW, I]."""

    def __init__(self, channels: int, dims: int, patch: int):
        super().__init__()
        self.patch = patch
        self.weight = mx.zeros((dims, patch, patch, channels))

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        return x @ self.weight.reshape(self.weight.shape[0], -1).T


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((cfg.hidden_size,))
        self.patch_embedding = CLIPPatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels_nhwc)
        cls = mx.broadcast_to(self.class_embedding, (patches.shape[0], 1, patches.shape[-1]))
        return mx.concatenate([cls, patches], axis=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's name
        self.encoder = CLIPEncoder(cfg, "vision_model.encoder")
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixel_values: np.ndarray) -> tuple[mx.array, mx.array]:
        """(pooled [B, D], last_hidden_state [B, 1 + patches, D]) from NCHW pixels."""
        self.check(pixel_values)
        return self.encode(mx.array(pixel_values.astype(np.float32)).transpose(0, 2, 3, 1))

    def check(self, pixel_values: np.ndarray) -> None:
        size = self.cfg.image_size
        if tuple(pixel_values.shape[1:]) != (self.cfg.num_channels, size, size):
            msg = f"pixel_values {tuple(pixel_values.shape)} do not match the model's [N, 3, {size}, {size}]"
            raise InvalidArgument(msg, reason="BAD_IMAGE_SIZE")

    def encode(self, pixels_nhwc: mx.array) -> tuple[mx.array, mx.array]:
        """The tower on NHWC pixels (pure MLX, so the served path can compile it)."""
        x = tap("vision_model.embeddings", self.embeddings(pixels_nhwc))
        x = self.encoder(self.pre_layrnorm(x))
        return self.post_layernorm(x[:, 0]), x


class CLIPModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg.text)
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = mx.array(cfg.logit_scale_init_value)


def _l2_normalise(x: mx.array) -> mx.array:
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class ClipBundle:
    """A loaded CLIP: model (float32 compute), tokenizer and image settings, plus storage facts."""

    model: CLIPModel
    config: ClipConfig
    tokenizer: Tokenizer | None  # None: the directory has no tokenizer files (embedding texts then fails)
    image_config: ClipImageConfig
    model_dir: Path
    dtype: str  # storage dtype of the float tensors on disk ("float32", "float16", "bfloat16")
    nbytes: int  # resident bytes of the loaded parameters
    quantization: dict[str, Any] | None = None
    compute_dtype: str = "float32"  # the backend's policy (archs/_quant.py)

    def preprocess(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask``, ``pixel_values`` as CLIPProcessor(padding=True) gives them."""
        tok = self.tokenizer or load_tokenizer(self.model_dir, 0)  # no tokenizer: TOKENIZER_NOT_FOUND
        ids, mask = tokenize(tok, list(texts))
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": preprocess_images(list(images), self.image_config),
        }

    def forward_outputs(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray
    ) -> dict[str, np.ndarray]:
        """All outputs (see the module docstring for keys); either batch may be empty."""
        m, cfg = self.model, self.config
        out: dict[str, mx.array] = {}
        if len(input_ids):
            pooled, out["text_last_hidden_state"] = m.text_model(np.asarray(input_ids), np.asarray(attention_mask))
            out["text_embeds"] = _l2_normalise(m.text_projection(pooled))
        else:
            out["text_embeds"] = mx.zeros((0, cfg.projection_dim))
            out["text_last_hidden_state"] = mx.zeros((0, 0, cfg.text.hidden_size))
        if len(pixel_values):
            pooled, out["vision_last_hidden_state"] = m.vision_model(np.asarray(pixel_values))
            out["image_embeds"] = _l2_normalise(m.visual_projection(pooled))
        else:
            patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
            out["image_embeds"] = mx.zeros((0, cfg.projection_dim))
            out["vision_last_hidden_state"] = mx.zeros((0, patches + 1, cfg.vision.hidden_size))
        out["logits_per_image"] = mx.exp(m.logit_scale) * (out["image_embeds"] @ out["text_embeds"].T)
        mx.eval(out)
        return {k: np.array(v) for k, v in out.items()}

    def embed(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        """``text_embeds``, ``image_embeds`` (L2-normalised) and ``logits_per_image`` [n_images, n_texts]:
        the served path (compiled towers over shape buckets, ``clip_served``)."""
        return self.served.embed(texts, images)

    @cached_property
    def served(self) -> ClipServed:
        return ClipServed(self)

    def warm_up(self) -> float:
        """Compile the common graphs now (called at load), so the first request does not pay for it."""
        return self.served.warm_up()


def map_weight(name: str) -> str | None:
    """HF tensor name -> name on disk (unchanged), or ``None`` for buffers and non-CLIP tensors."""
    if name.endswith("position_ids") or not name.startswith(_TOP_LEVEL):
        return None
    return name


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "CLIP")


def read_config(model_dir: Path) -> ClipConfig:
    """Parse ``model_dir/config.json``; raise ``InvalidArgument`` unless it is a CLIP config."""
    raw = _read_json(Path(model_dir) / "config.json")
    if raw.get("model_type") != "clip":
        msg = f"{model_dir} holds model_type {raw.get('model_type')!r}, not 'clip'"
        raise InvalidArgument(msg, reason="MODEL_TYPE_MISMATCH", model_type=str(raw.get("model_type")))
    return ClipConfig.from_dict(raw)


_read_safetensors = read_safetensors
_storage_dtype = storage_dtype


def load(model_dir: Path) -> ClipBundle:
    """Load a converted (or raw HF safetensors) CLIP directory for float32 inference on the CPU."""
    model_dir = require_dir(model_dir)
    cfg = read_config(model_dir)
    raw, layout = _read_safetensors(model_dir)
    # Packed quantized weights are uint32 and not counted; their scales/biases keep the float dtype.
    dtype = _storage_dtype(raw)
    weights = {new: v for k, v in raw.items() if (new := map_weight(k)) is not None}
    # Without a layout record, behave like mlx-examples' loader: HF/PyTorch conv weights are OIHW, transpose.
    if PATCH_WEIGHT in weights and (layout is None or layout.get(PATCH_WEIGHT) == "pytorch_conv2d_OIHW"):
        # pytorch conv2d is [O, I, kH, kW], MLX is [O, kH, kW, I].
        weights[PATCH_WEIGHT] = weights[PATCH_WEIGHT].transpose(0, 2, 3, 1)
    model = CLIPModel(cfg)
    compute, nbytes = fill_model(model, weights, cfg.quantization, model_dir, "CLIP")
    return ClipBundle(
        model=model,
        config=cfg,
        tokenizer=load_tokenizer(model_dir, cfg.text.max_position_embeddings) if has_tokenizer(model_dir) else None,
        image_config=ClipImageConfig.load(model_dir, cfg.vision.image_size),
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
    """Deterministic texts/images (or the caller's), preprocessed with ``model_dir``'s processor settings."""
    from mlxd_daemon import golden

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    images = golden.golden_images(4, cfg.vision.image_size + 9) if images is None else list(images)
    note = ""
    if texts is None and not has_tokenizer(model_dir):
        ids, mask, note = vocabulary_ids(cfg.text.vocab_size, cfg.text.max_position_embeddings)
        texts = []
    else:
        texts = list(golden.GOLDEN_TEXTS) if texts is None else list(texts)
        ids, mask = tokenize(load_tokenizer(model_dir, cfg.text.max_position_embeddings), texts)
    pixels = preprocess_images(images, ClipImageConfig.load(model_dir, cfg.vision.image_size))
    return {
        "inputs_note": note,
        "texts": texts,
        "images": images,
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
    }


def run_mlx(bundle: ClipBundle, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The MLX outputs for ``golden_inputs``' preprocessed arrays."""
    return bundle.forward_outputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])


def run_reference(src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers' CLIPModel (float32, no_grad) on the same preprocessed arrays; keys as ``run_mlx``."""
    import torch
    import transformers

    model = transformers.CLIPModel.from_pretrained(str(src_dir), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.asarray(inputs["input_ids"], np.int64))
    mask = torch.from_numpy(np.asarray(inputs["attention_mask"], np.int64))
    pixels = torch.from_numpy(np.asarray(inputs["pixel_values"], np.float32))
    with torch.no_grad():
        if len(ids) and len(pixels):
            o = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            out = {
                "text_embeds": o.text_embeds,
                "image_embeds": o.image_embeds,
                "logits_per_image": o.logits_per_image,
                "text_last_hidden_state": o.text_model_output.last_hidden_state,
                "vision_last_hidden_state": o.vision_model_output.last_hidden_state,
            }
            return {k: v.float().numpy() for k, v in out.items()}
        # One side empty: CLIPModel.forward needs both, so run the towers and finish as HF does.
        p = model.config.projection_dim
        t_hidden = torch.zeros((0, 0, model.config.text_config.hidden_size))
        t_emb = torch.zeros((0, p))
        if len(ids):
            to = model.text_model(input_ids=ids, attention_mask=mask)
            t_hidden, t_emb = to.last_hidden_state, model.text_projection(to.pooler_output)
        vc = model.config.vision_config
        v_hidden = torch.zeros((0, (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size))
        v_emb = torch.zeros((0, p))
        if len(pixels):
            vo = model.vision_model(pixel_values=pixels)
            v_hidden, v_emb = vo.last_hidden_state, model.visual_projection(vo.pooler_output)
        t_emb = t_emb / t_emb.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        v_emb = v_emb / v_emb.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        logits = model.logit_scale.exp() * v_emb @ t_emb.T
        out = {
            "text_embeds": t_emb,
            "image_embeds": v_emb,
            "logits_per_image": logits,
            "text_last_hidden_state": t_hidden,
            "vision_last_hidden_state": v_hidden,
        }
        return {k: v.float().numpy() for k, v in out.items()}
