"""Core ATen op -> MLX: a data table (``OPS``) of small functions, plus which ops understand channels-last.

Every function takes the node's resolved arguments exactly as the ATen schema orders them (tensors are
``mx.array``, dtypes ``mx.Dtype``) and returns what the ATen op returns (a tuple for multi-output ops).
PyTorch is NCHW; MLX convolutions and pools are NHWC. Ops in ``CHANNELS_LAST`` receive their first argument
channels-last and return channels-last; ``ELEMENTWISE`` ops pass channels-last through; every other op sees
NCHW (the interpreter in ``program.py`` transposes at that boundary only). The layers (normalisation, attention,
convolution, pooling, resizing) and their channels-last tables are in ``ops_nn``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.export.ops_nn import CHANNELS_LAST as CHANNELS_LAST  # re-exported: the interpreter reads ops.*
from mlxd_daemon.export.ops_nn import LAYER_OPS, NHWC_VARIANTS, Op
from mlxd_daemon.export.ops_nn import WEIGHT_LAYOUTS as WEIGHT_LAYOUTS

_INT64_MAX = 2**63 - 1


def _axes(dims: int | Sequence[int] | None, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, Sequence) and len(dims) == 0):
        return list(range(ndim))
    seq = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim if ndim else 0 for d in seq]


def _cast(x: mx.array, dtype: mx.Dtype | None) -> mx.array:
    return x if dtype is None else x.astype(dtype)


# ---- shapes and views ------------------------------------------------------------------------------------


def _expand(x: mx.array, size: Sequence[int], *, implicit: bool = False) -> mx.array:
    lead = len(size) - x.ndim
    shape = [s if s != -1 else x.shape[i - lead] for i, s in enumerate(size)]
    return mx.broadcast_to(x, shape)


def _slice(x: mx.array, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> mx.array:
    dim %= x.ndim
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None or end >= _INT64_MAX else end
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def _select(x: mx.array, dim: int, index: int) -> mx.array:
    index_tuple: list[Any] = [slice(None)] * x.ndim
    index_tuple[dim % x.ndim] = index
    return x[tuple(index_tuple)]


def _unsqueeze(x: mx.array, dim: int) -> mx.array:
    return mx.expand_dims(x, dim if dim >= 0 else dim + x.ndim + 1)


def _squeeze(x: mx.array, dims: int | Sequence[int] | None = None) -> mx.array:
    axes = [a for a in _axes(dims, x.ndim) if x.shape[a] == 1] if x.ndim else []
    return mx.squeeze(x, axes) if axes else x


def _transpose(x: mx.array, a: int, b: int) -> mx.array:
    return mx.swapaxes(x, a, b) if x.ndim > 1 else x


def _index(x: mx.array, indices: Sequence[mx.array | None]) -> mx.array:
    key = tuple(slice(None) if i is None else (i.astype(mx.int32) if i.dtype == mx.int64 else i) for i in indices)
    return x[key]


def _split_with_sizes(x: mx.array, sizes: Sequence[int], dim: int = 0) -> list[mx.array]:
    bounds = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    return list(mx.split(x, bounds, axis=dim))


def _split(x: mx.array, size: int, dim: int = 0) -> list[mx.array]:
    n = x.shape[dim]
    return _split_with_sizes(x, [min(size, n - s) for s in range(0, n, size)], dim)


def _pad(x: mx.array, pad: Sequence[int], value: float = 0.0) -> mx.array:
    # ATen pads from the last dim backwards: (left_last, right_last, left_prev, right_prev, ...).
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return mx.pad(x, widths, constant_values=value)


def _flip(x: mx.array, dims: Sequence[int]) -> mx.array:
    flipped = set(_axes(dims, x.ndim))
    return x[tuple(slice(None, None, -1) if i in flipped else slice(None) for i in range(x.ndim))]


def _repeat(x: mx.array, repeats: Sequence[int]) -> mx.array:
    x = x.reshape((1,) * (len(repeats) - x.ndim) + tuple(x.shape))
    return mx.tile(x, list(repeats))


# ---- creation --------------------------------------------------------------------------------------------


def _full(size: Sequence[int], value: Any, *, dtype: mx.Dtype | None = None) -> mx.array:
    if dtype is None:
        dtype = mx.bool_ if isinstance(value, bool) else mx.int64 if isinstance(value, int) else mx.float32
    return mx.full(list(size), value, dtype=dtype)


def _full_like(x: mx.array, value: Any, *, dtype: mx.Dtype | None = None) -> mx.array:
    return mx.full(x.shape, value, dtype=dtype or x.dtype)


def _arange(start: Any, end: Any = None, step: Any = 1, *, dtype: mx.Dtype | None = None) -> mx.array:
    if end is None:
        start, end = 0, start
    if dtype is None:  # torch: int64 when every bound is an int, else the default float dtype
        dtype = mx.int64 if all(isinstance(v, int) for v in (start, end, step)) else mx.float32
    return mx.arange(start, end, step, dtype=dtype)


def _scalar_tensor(value: Any, *, dtype: mx.Dtype | None = None) -> mx.array:
    return mx.array(value, dtype=dtype or mx.float32)


# ---- math ------------------------------------------------------------------------------------------------


def _add(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    return a + (b if alpha == 1 else b * alpha)


def _sub(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    return a - (b if alpha == 1 else b * alpha)


def _div_mode(a: Any, b: Any, *, rounding_mode: str | None = None) -> Any:
    if rounding_mode == "floor":
        return mx.floor_divide(a, b)
    if rounding_mode == "trunc":
        q = mx.divide(a, b)
        return mx.where(q < 0, mx.ceil(q), mx.floor(q)).astype(mx.result_type(a, b))
    return mx.divide(a, b)


def _addmm(bias: mx.array, a: mx.array, b: mx.array, *, beta: float = 1, alpha: float = 1) -> mx.array:
    return mx.addmm(bias, a, b, alpha=alpha, beta=beta)


def _linear(x: mx.array, w: mx.array, b: mx.array | None = None) -> mx.array:
    return x @ w.T if b is None else mx.addmm(b, x, w.T)


def _gelu(x: mx.array, *, approximate: str = "none") -> mx.array:
    return nn.gelu_approx(x) if approximate == "tanh" else nn.gelu(x)


def _clamp(x: mx.array, lo: Any = None, hi: Any = None) -> mx.array:
    if lo is not None:
        x = mx.maximum(x, lo)
    return x if hi is None else mx.minimum(x, hi)


# ---- reductions ------------------------------------------------------------------------------------------


def _reduce(fn: Callable[..., mx.array]) -> Op:
    def op(x: mx.array, dims: Any = None, keepdim: bool = False, *, dtype: mx.Dtype | None = None) -> mx.array:
        return fn(_cast(x, dtype), axis=_axes(dims, x.ndim), keepdims=keepdim)

    return op


def _var(x: mx.array, dims: Any = None, *, correction: float = 1, keepdim: bool = False) -> mx.array:
    return mx.var(x, axis=_axes(dims, x.ndim), keepdims=keepdim, ddof=int(correction))


def _arg(fn: Callable[..., mx.array]) -> Op:
    def op(x: mx.array, dim: int | None = None, keepdim: bool = False) -> mx.array:
        out = fn(x.reshape(-1), axis=0) if dim is None else fn(x, axis=dim, keepdims=keepdim)
        return out.astype(mx.int64)

    return op


def _max_dim(x: mx.array, dim: int, keepdim: bool = False) -> tuple[mx.array, mx.array]:
    return mx.max(x, axis=dim, keepdims=keepdim), mx.argmax(x, axis=dim, keepdims=keepdim).astype(mx.int64)


def _min_dim(x: mx.array, dim: int, keepdim: bool = False) -> tuple[mx.array, mx.array]:
    return mx.min(x, axis=dim, keepdims=keepdim), mx.argmin(x, axis=dim, keepdims=keepdim).astype(mx.int64)


def _any(x: mx.array, dims: Any = None, keepdim: bool = False) -> mx.array:
    return mx.any(x, axis=_axes(dims, x.ndim), keepdims=keepdim)


def _cumsum(x: mx.array, dim: int, *, dtype: mx.Dtype | None = None) -> mx.array:
    return mx.cumsum(_cast(x, dtype), axis=dim)


def _mean_nhwc(x: mx.array, dims: Any = None, keepdim: bool = False, *, dtype: mx.Dtype | None = None) -> mx.array:
    """Global pooling over H, W of a channels-last value (NCHW dims 2, 3 are NHWC 1, 2)."""
    return mx.mean(_cast(x, dtype), axis=[1, 2], keepdims=keepdim)


def spatial_reduction(dims: Any, ndim: int) -> bool:
    """Whether ``mean.dim``'s dims are exactly the spatial axes of a 4-D NCHW value."""
    return ndim == 4 and sorted(_axes(dims, 4)) == [2, 3]


def _vector_norm(
    x: mx.array, ord: float = 2.0, dim: Any = None, keepdim: bool = False, *, dtype: mx.Dtype | None = None
) -> mx.array:
    x, axes = _cast(x, dtype), _axes(dim, x.ndim)
    if ord == 2:
        return mx.sqrt(mx.sum(x * x, axis=axes, keepdims=keepdim))
    if ord == math.inf:
        return mx.max(mx.abs(x), axis=axes, keepdims=keepdim)
    if ord == 1:
        return mx.sum(mx.abs(x), axis=axes, keepdims=keepdim)
    return mx.power(mx.sum(mx.power(mx.abs(x), ord), axis=axes, keepdims=keepdim), 1.0 / ord)


def _assert_scalar(condition: Any, message: str = "") -> None:
    # Guards torch.export recorded on symbolic sizes: under mx.compile they are plain Python values.
    if not condition:
        msg = f"the input shapes break a condition of the exported program: {message}"
        raise InvalidArgument(msg, reason="BAD_INPUT_SHAPE")


def _identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _getitem(x: Sequence[Any], i: int) -> Any:
    return x[i]


# The table. Keys are ATen overload names as ``str(node.target)`` prints them.
OPS: dict[str, Op] = {
    "getitem": _getitem,
    "aten._assert_tensor_metadata.default": _noop,
    # linear algebra
    "aten.addmm.default": _addmm,
    "aten.mm.default": mx.matmul,
    "aten.bmm.default": mx.matmul,
    "aten.matmul.default": mx.matmul,
    "aten.linear.default": _linear,
    # activations
    "aten._softmax.default": lambda x, dim, half_to_float=False: mx.softmax(x, axis=dim, precise=True),
    "aten._log_softmax.default": lambda x, dim, half_to_float=False: x - mx.logsumexp(x, axis=dim, keepdims=True),
    "aten.gelu.default": _gelu,
    "aten.relu.default": nn.relu,
    "aten.sigmoid.default": mx.sigmoid,
    "aten.tanh.default": mx.tanh,
    "aten.silu.default": nn.silu,
    "aten.hardtanh.default": lambda x, lo=-1.0, hi=1.0: mx.clip(x, lo, hi),
    "aten.leaky_relu.default": lambda x, slope=0.01: nn.leaky_relu(x, slope),
    "aten.clamp.default": _clamp,
    "aten.clamp_min.default": lambda x, lo: mx.maximum(x, lo),
    "aten.clamp_max.default": lambda x, hi: mx.minimum(x, hi),
    # elementwise arithmetic
    "aten.add.Tensor": _add,
    "aten.add.Scalar": _add,
    "aten.sub.Tensor": _sub,
    "aten.sub.Scalar": _sub,
    "aten.rsub.Scalar": lambda a, b, alpha=1: _sub(b, a, alpha=alpha),
    "aten.mul.Tensor": mx.multiply,
    "aten.mul.Scalar": mx.multiply,
    "aten.div.Tensor": mx.divide,
    "aten.div.Scalar": mx.divide,
    "aten.div.Tensor_mode": _div_mode,
    "aten.pow.Tensor_Scalar": mx.power,
    "aten.pow.Tensor_Tensor": mx.power,
    "aten.pow.Scalar": mx.power,
    "aten.remainder.Tensor": mx.remainder,
    "aten.remainder.Scalar": mx.remainder,
    "aten.maximum.default": mx.maximum,
    "aten.minimum.default": mx.minimum,
    "aten.rsqrt.default": mx.rsqrt,
    "aten.sqrt.default": mx.sqrt,
    "aten.exp.default": mx.exp,
    "aten.log.default": mx.log,
    "aten.neg.default": mx.negative,
    "aten.abs.default": mx.abs,
    "aten.erf.default": mx.erf,
    "aten.sin.default": mx.sin,
    "aten.cos.default": mx.cos,
    "aten.reciprocal.default": mx.reciprocal,
    "aten.floor.default": mx.floor,
    "aten.ceil.default": mx.ceil,
    "aten.sign.default": mx.sign,
    "aten.isnan.default": mx.isnan,
    "aten.isinf.default": mx.isinf,
    "aten.where.self": mx.where,
    # logic and comparison
    "aten.eq.Scalar": mx.equal,
    "aten.eq.Tensor": mx.equal,
    "aten.ne.Scalar": mx.not_equal,
    "aten.ne.Tensor": mx.not_equal,
    "aten.ge.Scalar": mx.greater_equal,
    "aten.ge.Tensor": mx.greater_equal,
    "aten.gt.Scalar": mx.greater,
    "aten.gt.Tensor": mx.greater,
    "aten.le.Scalar": mx.less_equal,
    "aten.le.Tensor": mx.less_equal,
    "aten.lt.Scalar": mx.less,
    "aten.lt.Tensor": mx.less,
    "aten.bitwise_and.Tensor": mx.bitwise_and,
    "aten.bitwise_or.Tensor": mx.bitwise_or,
    "aten.bitwise_not.default": lambda x: mx.logical_not(x) if x.dtype == mx.bool_ else mx.bitwise_invert(x),
    "aten.logical_not.default": mx.logical_not,
    "aten.logical_and.default": mx.logical_and,
    "aten.logical_or.default": mx.logical_or,
    # reductions
    "aten.mean.dim": _reduce(mx.mean),
    "aten.sum.dim_IntList": _reduce(mx.sum),
    "aten.amax.default": _reduce(mx.max),
    "aten.amin.default": _reduce(mx.min),
    "aten.prod.dim_int": _reduce(mx.prod),
    "aten.var.correction": _var,
    "aten.any.dim": _any,
    "aten.any.dims": _any,
    "aten.any.default": _any,
    "aten.argmax.default": _arg(mx.argmax),
    "aten.argmin.default": _arg(mx.argmin),
    "aten.max.dim": _max_dim,
    "aten.min.dim": _min_dim,
    "aten.cumsum.default": _cumsum,
    # shapes, views, copies
    "aten.view.default": mx.reshape,
    "aten.reshape.default": mx.reshape,
    "aten._unsafe_view.default": mx.reshape,
    "aten.permute.default": mx.transpose,
    "aten.expand.default": _expand,
    "aten.slice.Tensor": _slice,
    "aten.select.int": _select,
    "aten.cat.default": lambda xs, dim=0: mx.concatenate(list(xs), axis=dim),
    "aten.unsqueeze.default": _unsqueeze,
    "aten.squeeze.dim": _squeeze,
    "aten.squeeze.dims": _squeeze,
    "aten.squeeze.default": _squeeze,
    "aten.transpose.int": _transpose,
    "aten.t.default": lambda x: x.T,
    "aten.clone.default": _identity,
    "aten.alias.default": _identity,
    "aten.detach.default": _identity,
    "aten.lift_fresh_copy.default": _identity,
    "aten._to_copy.default": lambda x, *, dtype=None: _cast(x, dtype),
    "aten.split_with_sizes.default": _split_with_sizes,
    "aten.split.Tensor": _split,
    "aten.constant_pad_nd.default": _pad,
    "aten.repeat.default": _repeat,
    "aten.flip.default": _flip,
    # indexing and creation
    "aten.embedding.default": lambda w, ids, padding_idx=-1, scale_grad=False, sparse=False: w[ids],
    "aten.index.Tensor": _index,
    "aten.index_select.default": lambda x, dim, index: mx.take(x, index, axis=dim),
    "aten.gather.default": lambda x, dim, index, sparse_grad=False: mx.take_along_axis(x, index, axis=dim),
    "aten.full.default": _full,
    "aten.full_like.default": _full_like,
    "aten.arange.start_step": _arange,
    "aten.arange.start": _arange,
    "aten.arange.default": _arange,
    "aten.scalar_tensor.default": _scalar_tensor,
    "aten.linalg_vector_norm.default": _vector_norm,
    # Strides over the row-major value (MLX copies a non-contiguous input first); validation checks the result.
    "aten.as_strided.default": lambda x, size, stride, offset=None: mx.as_strided(x, size, stride, offset or 0),
    # symbolic sizes (dynamic shapes): the graph computes them from its inputs' shapes with Python arithmetic
    "aten.sym_size.int": lambda x, dim: x.shape[dim],
    "aten.sym_numel.default": lambda x: x.size,
    "aten._assert_scalar.default": _assert_scalar,
    "aten.sym_constrain_range_for_size.default": _noop,
    "aten.sym_constrain_range.default": _noop,
    "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
    "operator.floordiv": operator.floordiv, "operator.truediv": operator.truediv, "operator.mod": operator.mod,
    "operator.pow": operator.pow, "operator.neg": operator.neg, "operator.eq": operator.eq,
    "operator.ne": operator.ne, "operator.lt": operator.lt, "operator.le": operator.le, "operator.gt": operator.gt,
    "operator.ge": operator.ge, "operator.and_": operator.and_, "operator.or_": operator.or_,
    "torch.sym_max": max, "torch.sym_min": min, "torch.sym_float": float, "torch.sym_int": int,
    "torch.sym_not": operator.not_, "torch.sym_sqrt": math.sqrt, "math.ceil": math.ceil, "math.floor": math.floor,
    "math.sqrt": math.sqrt, "torch.sym_ite": lambda c, a, b: a if c else b,
    **LAYER_OPS,  # normalisation, attention, convolution, pooling, resizing (ops_nn)
}  # fmt: skip

# Ops with a channels-last variant, used when the input already is channels-last (else the NCHW one runs).
CHANNELS_LAST_VARIANT: dict[str, Op] = {
    **NHWC_VARIANTS,
    "aten.mean.dim": _mean_nhwc,  # global pooling; only when the reduction covers exactly H and W
}
# Ops that act per element: channels-last passes through them when the other operands allow it.
ELEMENTWISE: frozenset[str] = frozenset(
    {
        "aten.relu.default", "aten.sigmoid.default", "aten.tanh.default", "aten.silu.default", "aten.gelu.default",
        "aten.hardtanh.default", "aten.leaky_relu.default", "aten.clamp.default", "aten.clamp_min.default",
        "aten.clamp_max.default", "aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar",
        "aten.rsub.Scalar", "aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar",
        "aten.pow.Tensor_Scalar", "aten.rsqrt.default", "aten.sqrt.default", "aten.exp.default", "aten.neg.default",
        "aten.abs.default", "aten.erf.default", "aten.clone.default", "aten.alias.default", "aten.detach.default",
        "aten._to_copy.default", "aten.maximum.default", "aten.minimum.default", "aten.where.self",
    }
)  # fmt: skip


def supported(op: str) -> bool:
    """Whether an op (``str(node.target)``) has an MLX mapping."""
    return op in OPS
