"""Building blocks shared by the MLX UNet and VAE, named exactly as diffusers' modules so weights load by name.

Activations are channels-last (NHWC) throughout; conv weights are MLX's [O, kH, kW, I] (the loader transposes
the PyTorch [O, I, kH, kW] tensors stored on disk, see ``sd.load_component``). Norms compute in float32 whatever
the weights' dtype: GroupNorm statistics over a whole feature map are where float16 overflows first.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlxd_daemon.taps import tap


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC: channels grouped contiguously (PyTorch order), statistics in float32."""

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = x.astype(mx.float32).reshape(b, h * w, self.groups, c // self.groups)
        mean = y.mean(axis=(1, 3), keepdims=True)
        var = y.var(axis=(1, 3), keepdims=True)
        y = ((y - mean) * mx.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.weight.astype(mx.float32) + self.bias.astype(mx.float32)).astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 (then cast back), for the same reason as GroupNorm."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(mx.float32) if "weight" in self else None
        b = self.bias.astype(mx.float32) if "bias" in self else None
        return mx.fast.layer_norm(x.astype(mx.float32), w, b, self.eps).astype(x.dtype)


def timestep_embedding(t: mx.array, dim: int, flip_sin_to_cos: bool, shift: float) -> mx.array:
    """diffusers' ``get_timestep_embedding`` (sinusoidal, max period 10000) for a 1-D array of timesteps."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - shift))
    emb = t.astype(mx.float32)[:, None] * freqs[None]
    emb = mx.concatenate([mx.sin(emb), mx.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = mx.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm "default", output_scale_factor 1)."""

    def __init__(self, name: str, cin: int, cout: int, temb: int | None, groups: int, eps: float):
        super().__init__()
        self._name = name
        self.norm1 = GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb is not None:
            self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = GroupNorm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        if temb is not None and "time_emb_proj" in self:
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return tap(self._name, skip + h)


class Attention(nn.Module):
    """diffusers' Attention: q/k/v projections, scaled dot-product attention over ``heads``, ``to_out.0``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale = heads, head_dim**-0.5
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = [nn.Linear(inner, dim)]

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        b, n, _ = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding`` 0 is the VAE's variant, which pads one row/column at the end first."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)
