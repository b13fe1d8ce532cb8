"""Layers among the core ATen ops (``ops.OPS`` includes ``LAYER_OPS``): normalisation, attention, convolution,
pooling and resizing, with the channels-last knowledge of the op table.

PyTorch is NCHW; MLX convolutions and pools are NHWC. Ops in ``CHANNELS_LAST`` receive their first argument
channels-last and return channels-last; ``NHWC_VARIANTS`` are used instead of an op's NCHW version when its input
already is channels-last; ``WEIGHT_LAYOUTS`` names the weights transposed once at export.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

Op = Callable[..., Any]


# ---- normalisation and attention -------------------------------------------------------------------------


def _layer_norm(
    x: mx.array, shape: Sequence[int], w: mx.array | None, b: mx.array | None, eps: float
) -> tuple[mx.array, mx.array, mx.array]:
    axes = list(range(x.ndim - len(shape), x.ndim))
    mean = mx.mean(x, axis=axes, keepdims=True)
    rstd = mx.rsqrt(mx.var(x, axis=axes, keepdims=True) + eps)
    if len(shape) == 1:
        out = mx.fast.layer_norm(x, w, b, eps)
    else:
        out = (x - mean) * rstd
        out = out if w is None else out * w
        out = out if b is None else out + b
    return out, mean, rstd  # MLX is lazy: the statistics cost nothing unless a node reads them


def _batch_norm_axis(x: mx.array, w: Any, b: Any, mean: mx.array, var: mx.array, eps: float, axis: int) -> mx.array:
    shape = [1] * x.ndim
    shape[axis] = -1
    scale = mx.rsqrt(var + eps) if w is None else w * mx.rsqrt(var + eps)
    shift = -mean * scale if b is None else b - mean * scale
    return x * scale.reshape(shape) + shift.reshape(shape)


def _batch_norm_nchw(
    x: mx.array, w: Any, b: Any, mean: mx.array, var: mx.array, momentum: float, eps: float
) -> tuple[mx.array, None, None]:
    return _batch_norm_axis(x, w, b, mean, var, eps, 1 if x.ndim > 1 else 0), None, None


def _batch_norm_nhwc(
    x: mx.array, w: Any, b: Any, mean: mx.array, var: mx.array, momentum: float, eps: float
) -> tuple[mx.array, None, None]:
    return _batch_norm_axis(x, w, b, mean, var, eps, -1), None, None


def _native_batch_norm(
    x: mx.array, w: Any, b: Any, mean: mx.array, var: mx.array, training: bool, momentum: float, eps: float
) -> tuple[mx.array, None, None]:
    return _batch_norm_nchw(x, w, b, mean, var, momentum, eps)


def _group_norm(
    x: mx.array, w: Any, b: Any, n: int, c: int, hw: int, groups: int, eps: float
) -> tuple[mx.array, mx.array, mx.array]:
    g = x.reshape(n, groups, -1)
    mean = mx.mean(g, axis=-1, keepdims=True)
    rstd = mx.rsqrt(mx.var(g, axis=-1, keepdims=True) + eps)
    out = ((g - mean) * rstd).reshape(x.shape)
    shape = [1, c] + [1] * (x.ndim - 2)
    out = out if w is None else out * w.reshape(shape)
    out = out if b is None else out + b.reshape(shape)
    return out, mean.reshape(n, groups), rstd.reshape(n, groups)


def _sdpa(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    attn_mask: mx.array | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> mx.array:
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    mask: Any = "causal" if is_causal else attn_mask
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


# ---- convolution, pooling, resizing (channels-last) -------------------------------------------------------------


def _conv_nhwc(
    x: mx.array,
    w: mx.array,
    b: mx.array | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> mx.array:
    """``x`` channels-last; ``w`` already in MLX layout [O, *k, I/groups] (transposed once at export)."""
    nd = x.ndim - 2
    if transposed and nd == 1:
        out = mx.conv_transpose1d(x, w, stride[0], padding[0], dilation[0], output_padding[0], groups)
    elif transposed:
        spec: Any = [tuple(v) for v in (stride, padding, dilation, output_padding)]
        fn: Any = mx.conv_transpose2d if nd == 2 else mx.conv_transpose3d
        out = fn(x, w, *spec, groups)
    elif nd == 1:
        out = mx.conv1d(x, w, stride[0], padding[0], dilation[0], groups)
    else:
        out = mx.conv_general(x, w, list(stride), list(padding), list(dilation), groups=groups)
    return out if b is None else out + b


def _pool_padded(x: mx.array, padding: Sequence[int], value: float) -> mx.array:
    pad = [int(p) for p in padding] if padding else [0, 0]
    pad = pad * 2 if len(pad) == 1 else pad
    if not any(pad):
        return x
    return mx.pad(x, [(0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)], constant_values=value)


def _pair(v: Sequence[int] | int | None, default: Sequence[int]) -> tuple[int, int]:
    if v is None or (isinstance(v, Sequence) and len(v) == 0):
        v = default
    seq = [v] if isinstance(v, int) else list(v)
    return (seq[0], seq[0]) if len(seq) == 1 else (seq[0], seq[1])


def _max_pool_nhwc(
    x: mx.array,
    kernel: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> tuple[mx.array, None]:
    if _pair(dilation, (1,)) != (1, 1) or ceil_mode:
        msg = "max_pool2d with dilation or ceil_mode is not mapped to MLX yet"
        raise NotImplementedError(msg)
    k = _pair(kernel, kernel)
    pool = nn.MaxPool2d(k, _pair(stride, k))
    return pool(_pool_padded(x, padding, -math.inf)), None  # indices: values-only mapping


def _avg_pool_nhwc(
    x: mx.array,
    kernel: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> mx.array:
    pad = _pair(padding, (0,))
    if ceil_mode or divisor_override:
        msg = "avg_pool2d with ceil_mode or divisor_override is not mapped to MLX yet"
        raise NotImplementedError(msg)
    k = _pair(kernel, kernel)
    pool = nn.AvgPool2d(k, _pair(stride, k))
    out = pool(_pool_padded(x, pad, 0.0))
    if any(pad) and not count_include_pad:  # divide by the window's real elements, not the padded ones
        out = out / pool(_pool_padded(mx.ones((1, *x.shape[1:3], 1), x.dtype), pad, 0.0))
    return out


def _source_coords(out: int, size: int, align_corners: bool, scale: float | None) -> tuple[Any, Any, Any]:
    """(lower index, upper index, weight of the upper) per output position, as PyTorch's bilinear computes them."""
    i = mx.arange(out, dtype=mx.float32)
    if align_corners:
        src = i * ((size - 1) / (out - 1)) if out > 1 else mx.zeros_like(i)
    else:
        src = mx.maximum((i + 0.5) * (1.0 / scale if scale else size / out) - 0.5, 0.0)
    lo = mx.minimum(mx.floor(src).astype(mx.int32), size - 1)
    return lo, mx.minimum(lo + 1, size - 1), src - lo.astype(mx.float32)


def _upsample_bilinear(
    x: mx.array, output_size: Sequence[int] | None, align_corners: bool, scale_factors: Sequence[float] | None = None
) -> mx.array:
    """NCHW bilinear resize (``F.interpolate(mode="bilinear")``): interpolate along H, then along W."""
    h, w = x.shape[2], x.shape[3]
    sh: float | None = None  # scale factors set the source coordinates only when no output size is given
    sw: float | None = None
    if output_size:
        oh, ow = int(output_size[0]), int(output_size[1])
    else:
        assert scale_factors, "aten.upsample_bilinear2d.vec takes an output size or scale factors"
        sh, sw = scale_factors[0], scale_factors[1]
        oh, ow = int(h * sh), int(w * sw)
    lo, hi, f = _source_coords(oh, h, align_corners, sh)
    x = mx.take(x, lo, axis=2) * (1 - f)[:, None] + mx.take(x, hi, axis=2) * f[:, None]
    lo, hi, f = _source_coords(ow, w, align_corners, sw)
    return mx.take(x, lo, axis=3) * (1 - f) + mx.take(x, hi, axis=3) * f


def _adaptive_avg_pool_nhwc(x: mx.array, output_size: Sequence[int]) -> mx.array:
    n, h, w, c = x.shape
    oh, ow = _pair(output_size, output_size)
    if h % oh or w % ow:
        msg = f"adaptive_avg_pool2d from {h}x{w} to {oh}x{ow} (not a divisor) is not mapped to MLX yet"
        raise NotImplementedError(msg)
    return x.reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))


LAYER_OPS: dict[str, Op] = {
    "aten.convolution.default": _conv_nhwc,
    "aten.scaled_dot_product_attention.default": _sdpa,
    "aten.native_layer_norm.default": _layer_norm,
    "aten._native_batch_norm_legit_no_training.default": _batch_norm_nchw,
    "aten.native_batch_norm.default": _native_batch_norm,
    "aten.native_group_norm.default": _group_norm,
    # pooling (NCHW entry points, in CHANNELS_LAST: the interpreter hands them channels-last values)
    "aten.max_pool2d_with_indices.default": _max_pool_nhwc,
    "aten.avg_pool2d.default": _avg_pool_nhwc,
    "aten._adaptive_avg_pool2d.default": _adaptive_avg_pool_nhwc,
    "aten.adaptive_avg_pool2d.default": _adaptive_avg_pool_nhwc,
    "aten.upsample_bilinear2d.vec": _upsample_bilinear,
}
# Ops whose ``OPS`` implementation takes its first argument channels-last and returns channels-last: the
# interpreter moves an NCHW input's channels last once, and keeps the result channels-last.
CHANNELS_LAST: frozenset[str] = frozenset(
    {
        "aten.convolution.default", "aten.max_pool2d_with_indices.default", "aten.avg_pool2d.default",
        "aten._adaptive_avg_pool2d.default", "aten.adaptive_avg_pool2d.default",
    }
)  # fmt: skip
NHWC_VARIANTS: dict[str, Op] = {"aten._native_batch_norm_legit_no_training.default": _batch_norm_nhwc}
# Ops whose weight argument (by position) is transposed once at export time to MLX's channels-last layout.
WEIGHT_LAYOUTS: dict[str, int] = {"aten.convolution.default": 1}
