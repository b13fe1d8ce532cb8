"""MLX affine quantization helpers: round trips through ``mx.quantize`` and packing of precomputed codes.

MLX affine stores per group ``scale`` and ``bias`` (in the float dtype of the weight) and ``w = scale * q + bias``
with ``q`` in [0, 2^bits - 1]; codes are packed as one little-endian bit stream per row into uint32 words
(checked against ``mx.quantize`` for 2, 3, 4, 5, 6 and 8 bits in tests/test_calibrate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

_MX_DTYPES = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


@dataclass
class Packed:
    """A quantized weight in MLX's format (``weight`` uint32, ``scales``, ``biases``) in the storage dtype."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        """The float32 weight a loader gets back."""
        w = mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits, dtype=mx.float32
        )
        return np.array(w)


def mx_dtype(dtype: torch.dtype) -> mx.Dtype:
    return _MX_DTYPES[dtype]


def quantize(w: np.ndarray, bits: int, group_size: int, dtype: torch.dtype) -> Packed:
    """``mx.quantize`` of ``w`` stored as ``dtype`` (the storage dtype decides the scales' dtype)."""
    q, s, b = mx.quantize(mx.array(np.asarray(w, np.float32)).astype(mx_dtype(dtype)), group_size=group_size, bits=bits)
    mx.eval(q, s, b)
    return Packed(q, s, b, bits, group_size)


def fake_quantize(w: np.ndarray, bits: int, group_size: int, dtype: torch.dtype) -> np.ndarray:
    """``dequantize(quantize(w))`` as float32: what the quantized layer computes with."""
    return quantize(w, bits, group_size, dtype).dequantize()


def group_params(w: np.ndarray, bits: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per row for one group of columns ``w`` [rows, group], exactly as ``mx.quantize`` picks and
    stores them, returned as float64 [rows]."""
    p = quantize(w, bits, w.shape[1], dtype)
    return (
        np.array(p.scales.astype(mx.float32), np.float64)[:, 0],
        np.array(p.biases.astype(mx.float32), np.float64)[:, 0],
    )


def codes_for(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes of ``w`` [rows] (or [rows, k]) on the grid ``scale * q + bias``, clipped to the range."""
    if w.ndim == 2:
        scale, bias = scale[:, None], bias[:, None]
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint((w - bias) / safe), 0, (1 << bits) - 1)


def pack(
    codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int, dtype: torch.dtype
) -> Packed:
    """Pack integer ``codes`` [rows, cols] with per-group ``scales``/``biases`` [rows, cols / group] into MLX's
    format: each row is one little-endian bit stream of ``bits``-wide codes, cut into uint32 words."""
    rows, cols = codes.shape
    c = codes.astype(np.uint64)
    words = np.zeros((rows, cols * bits // 32 + 1), np.uint64)
    pos = np.arange(cols) * bits
    for j in range(cols):  # at most a few thousand columns; each step is a vector op over rows
        word, off = divmod(int(pos[j]), 32)
        v = c[:, j] << np.uint64(off)
        words[:, word] |= v & np.uint64(0xFFFFFFFF)
        words[:, word + 1] |= v >> np.uint64(32)
    packed = mx.array(words[:, :-1].astype(np.uint32))
    dt = mx_dtype(dtype)
    return Packed(
        packed,
        mx.array(scales.astype(np.float32)).astype(dt),
        mx.array(biases.astype(np.float32)).astype(dt),
        bits,
        group_size,
    )
