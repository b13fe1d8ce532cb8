"""Torch tensors <-> MLX arrays of the same dtype, for the conversion paths that hold both (numpy, the usual
bridge, has no bfloat16: those move as raw 16-bit words and are reinterpreted on the other side)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch


def to_mlx(t: torch.Tensor) -> mx.array:
    """A torch tensor as an MLX array of the same dtype."""
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def to_torch(a: mx.array, copy: bool = True) -> torch.Tensor:
    """An evaluated MLX array as a torch tensor of the same dtype: a copy that owns its memory, or (``copy=False``)
    a view that keeps ``a`` alive."""
    view = np.asarray(a.view(mx.int16)) if a.dtype == mx.bfloat16 else np.asarray(a)
    t = torch.from_numpy(view.copy() if copy else view)
    return t.view(torch.bfloat16) if a.dtype == mx.bfloat16 else t
