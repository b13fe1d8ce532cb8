"""CLIP's MLX model: the configs and the modules, with Hugging Face's names (``clip`` loads, serves and
validates it; ``clip_calibrate`` runs its layers for AWQ/GPTQ; Stable Diffusion reuses the text tower)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxd_daemon.archs._activations import activation
from mlxd_daemon.archs._attention import attention
from mlxd_daemon.archs._config import FromDict
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.taps import tap


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


class CLIPAttention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array | None, keys: mx.array | None = None) -> mx.array:
        """Attention of ``x``'s positions over ``keys``' (default: ``x``'s own)."""
        keys = x if keys is None else keys
        q, k, v = self.q_proj(x), self.k_proj(keys), self.v_proj(keys)
        return self.out_proj(attention(q, k, v, self.heads, self.scale, mask))


class CLIPMLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
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

    def at(self, x: mx.array, rows: mx.array, mask: mx.array | None) -> mx.array:
        """The layer's output at positions ``rows`` [B, R] only (``mask``: those rows' keys, [B, 1, R, L]); every
        position is still a key and value. What a pooled output needs of the last layer, at a fraction of its cost."""
        h = self.layer_norm1(x)
        picked = mx.take_along_axis(x, rows[..., None], axis=1)
        picked = picked + self.self_attn(mx.take_along_axis(h, rows[..., None], axis=1), mask, keys=h)
        return picked + self.mlp(self.layer_norm2(picked))


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
        self.check(input_ids)
        ids, keep, eos = self.prepare(input_ids, attention_mask)
        return self.encode(mx.array(ids), mx.array(keep), mx.array(eos))

    def check(self, input_ids: np.ndarray) -> None:
        n = input_ids.shape[1]
        if n > self.cfg.max_position_embeddings:
            msg = f"text is {n} tokens, the model takes at most {self.cfg.max_position_embeddings}: truncate it"
            raise InvalidArgument(msg, reason="TEXT_TOO_LONG")

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

    def pooled(self, ids: mx.array, keep: mx.array, eos_pos: mx.array) -> mx.array:
        """``encode``'s pooled output alone: the last layer runs at each row's EOS only (the served path)."""
        x = self.embeddings(ids)
        for layer in self.encoder.layers[:-1]:
            x = layer(x, keep)
        eos_keep = mx.take_along_axis(keep, eos_pos[:, None, None, None], axis=2)  # the keys each EOS attends to
        return self.final_layer_norm(self.encoder.layers[-1].at(x, eos_pos[:, None], eos_keep)[:, 0])


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

    def pooled(self, pixels_nhwc: mx.array) -> mx.array:
        """``encode``'s pooled output alone: the last layer runs at the class token only (the served path)."""
        x = self.pre_layrnorm(self.embeddings(pixels_nhwc))
        for layer in self.encoder.layers[:-1]:
            x = layer(x, None)
        cls = mx.zeros((x.shape[0], 1), mx.int32)
        return self.post_layernorm(self.encoder.layers[-1].at(x, cls, None)[:, 0])


class CLIPModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg.text)
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = mx.array(cfg.logit_scale_init_value)


def l2_normalise(x: mx.array) -> mx.array:
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)
