"""diffusers' ``UNet2DConditionModel`` (the SD-1.x/2.x shape) in MLX, with diffusers' module names.

``UNetConfig.from_dict`` refuses, before any weight is read, every config entry this implementation does not
compute (class/addition embeddings, other block types, time-scale-shift resnets, ...): ``Unsupported`` with
reason ``UNSUPPORTED_UNET_CONFIG`` naming the key. Taps (per-layer validation) use diffusers' module paths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxd_daemon.errors import Unsupported
from mlxd_daemon.pipelines.layers import (
    Attention,
    Downsample2D,
    GroupNorm,
    LayerNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    timestep_embedding,
)
from mlxd_daemon.taps import tap

_TL = "transformer_layers_per_block"
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# Config entries that must keep the value SD-1.x/2.x use (anything else changes the computation).
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "attention_type": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "resnet_out_scale_factor": (1, 1.0),
    "resnet_skip_time_act": (False,),
    "mid_block_scale_factor": (1, 1.0),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "time_embedding_dim": (None,),
}


def _per_block(value: Any, n: int, key: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, int) for v in value):
            msg = f"unet config {key}={value} must be an int or one int per block ({n}); nested lists are not supported"
            raise Unsupported(msg, reason="UNSUPPORTED_UNET_CONFIG", key=key)
        return tuple(value)
    return (int(value),) * n


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: tuple[int, ...] = (768,) * 4
    transformer_layers: tuple[int, ...] = (1,) * 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    use_linear_projection: bool = False
    center_input_sample: bool = False
    sample_size: int = 64

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Parse diffusers' unet/config.json; ``Unsupported`` for anything this UNet does not compute."""
        for key, allowed in _REQUIRED.items():
            if key in d and d[key] not in allowed:
                msg = f"unet config {key}={d[key]!r} is not supported (mlxd maps {key} in {list(allowed)})"
                raise Unsupported(msg, reason="UNSUPPORTED_UNET_CONFIG", key=key, value=str(d[key]))
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for kind, names, known in (("down", down, DOWN_BLOCKS), ("up", up, UP_BLOCKS)):
            bad = [b for b in names if b not in known]
            if bad:
                msg = f"unet {kind} block type {bad[0]!r} is not supported; supported: {', '.join(known)}"
                raise Unsupported(msg, reason="UNSUPPORTED_UNET_CONFIG", key=f"{kind}_block_types", value=bad[0])
        n = len(down)
        # diffusers' historical naming: attention_head_dim holds the number of heads unless num_attention_heads is set.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        field_names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in field_names}
        return cls(**{
            **kw, "block_out_channels": tuple(d.get("block_out_channels", cls.block_out_channels)),
            "down_block_types": down, "up_block_types": up, "heads": _per_block(heads, n, "attention_head_dim"),
            "cross_attention_dim": _per_block(d.get("cross_attention_dim", 768), n, "cross_attention_dim"),
            "transformer_layers": _per_block(d.get(_TL, 1), n, _TL),
        })  # fmt: skip


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` gives value and gate, exact GELU on the gate, ``net.2`` projects back."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = [_GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(self.proj(x), 2, axis=-1)
        return value * nn.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim)
        self.norm3 = LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or Linear with use_linear_projection), transformer blocks, proj_out, residual."""

    def __init__(self, name: str, dim: int, heads: int, context_dim: int, layers: int, cfg: UNetConfig):
        super().__init__()
        self._name, self.linear = name, cfg.use_linear_projection
        self.norm = GroupNorm(cfg.norm_num_groups, dim, 1e-6)
        self.proj_in = nn.Linear(dim, dim) if self.linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = [BasicTransformerBlock(dim, heads, context_dim, cfg.norm_eps) for _ in range(layers)]
        self.proj_out = nn.Linear(dim, dim) if self.linear else nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.norm(x)
        y = self.proj_in(y.reshape(b, h * w, c)) if self.linear else self.proj_in(y).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y).reshape(b, h, w, c) if self.linear else self.proj_out(y.reshape(b, h, w, c))
        return tap(self._name, y + x)


class DownBlock(nn.Module):
    def __init__(self, name: str, i: int, cin: int, cout: int, last: bool, cfg: UNetConfig, temb: int):
        super().__init__()
        self._name = name
        g, eps, n = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block
        self.resnets = [ResnetBlock2D(f"{name}.resnets.{j}", cin if j == 0 else cout, cout, temb, g, eps)
                        for j in range(n)]  # fmt: skip
        if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
            self.attentions = [
                Transformer2DModel(f"{name}.attentions.{j}", cout, cfg.heads[i], cfg.cross_attention_dim[i],
                                   cfg.transformer_layers[i], cfg) for j in range(n)
            ]  # fmt: skip
        if not last:
            self.downsamplers = [Downsample2D(cout, cfg.downsample_padding)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> tuple[mx.array, list[mx.array]]:
        states = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
            states.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            states.append(x)
        return tap(self._name, x), states


class UpBlock(nn.Module):
    def __init__(self, name: str, i: int, cin: int, cout: int, prev: int, last: bool, cfg: UNetConfig, temb: int):
        super().__init__()
        self._name = name
        n, g, eps = cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [
            ResnetBlock2D(f"{name}.resnets.{j}", (prev if j == 0 else cout) + (cin if j == n - 1 else cout), cout,
                          temb, g, eps) for j in range(n)
        ]  # fmt: skip
        k = len(cfg.heads) - 1 - i  # up blocks read the per-block lists reversed
        if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
            self.attentions = [
                Transformer2DModel(f"{name}.attentions.{j}", cout, cfg.heads[k], cfg.cross_attention_dim[k],
                                   cfg.transformer_layers[k], cfg) for j in range(n)
            ]  # fmt: skip
        if not last:
            self.upsamplers = [Upsample2D(cout)]

    def __call__(self, x: mx.array, skips: list[mx.array], temb: mx.array, context: mx.array) -> mx.array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return tap(self._name, x)


class MidBlock(nn.Module):
    def __init__(self, dim: int, cfg: UNetConfig, temb: int):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [ResnetBlock2D(f"mid_block.resnets.{j}", dim, dim, temb, g, eps) for j in range(2)]
        self.attentions = [Transformer2DModel("mid_block.attentions.0", dim, cfg.heads[-1], cfg.cross_attention_dim[-1],
                                              cfg.transformer_layers[-1], cfg)]  # fmt: skip

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> mx.array:
        x = self.resnets[0](x, temb)
        x = self.resnets[1](self.attentions[0](x, context), temb)
        return tap("mid_block", x)


class UNet2DConditionModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        n = len(ch)
        self.down_blocks = [DownBlock(f"down_blocks.{i}", i, ch[max(i - 1, 0)], ch[i], i == n - 1, cfg, temb)
                            for i in range(n)]  # fmt: skip
        self.mid_block = MidBlock(ch[-1], cfg, temb)
        rev = list(reversed(ch))
        self.up_blocks = [
            UpBlock(f"up_blocks.{i}", i, rev[min(i + 1, n - 1)], rev[i], rev[max(i - 1, 0)], i == n - 1, cfg, temb)
            for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def __call__(self, sample: mx.array, timesteps: mx.array, context: mx.array) -> mx.array:
        """Noise prediction, NHWC in and out; ``timesteps`` [B], ``context`` [B, L, D] (the text encoder's)."""
        dtype = self.conv_in.weight.dtype
        x = sample.astype(dtype)
        if self.cfg.center_input_sample:
            x = 2 * x - 1.0
        t = timestep_embedding(timesteps, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                               self.cfg.freq_shift)  # fmt: skip
        temb = tap("time_embedding", self.time_embedding(t.astype(dtype)))
        context = context.astype(dtype)
        x = tap("conv_in", self.conv_in(x))
        skips = [x]
        for down in self.down_blocks:
            x, states = down(x, temb, context)
            skips += states
        x = self.mid_block(x, temb, context)
        for up in self.up_blocks:
            x = up(x, skips, temb, context)
        return self.conv_out(nn.silu(self.conv_norm_out(x))).astype(mx.float32)
