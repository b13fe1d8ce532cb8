"""AWQ-style quantization (Lin et al. 2023): activation-aware per-input-channel scales and weight clipping.

Scales: for Linears that share an input ``x``, ``s = mean|x|^α`` (normalised) with α on a grid in [0, 1] chosen to
minimise ``Σ ||x Wᵀ - (x / s) Q(W s)ᵀ||²`` on calibration activations; the layers store ``Q(W s)`` and ``1 / s`` is
folded into the op that produces ``x`` (a LayerNorm/RMSNorm's weight and bias, or the rows of a previous Linear
whose output reaches ``x`` linearly), so the model computes the same function with no new op. α = 0 is plain
rounding, so the search never does worse than it on the calibration set.
Clipping: per (row, group), the range [min, max] shrinks by a ratio on a grid when that lowers the group's
contribution to the output error.
"""

from __future__ import annotations

import numpy as np
import torch

from mlxd_daemon.calibrate import affine

ALPHAS = tuple(i / 20 for i in range(21))
CLIP_RATIOS = tuple(1.0 - i / 40 for i in range(21))  # 1.0 down to 0.5
CLIP_TOKENS = 1024


def search_scales(
    x: np.ndarray, x_mean: np.ndarray, weights: list[np.ndarray], params: list[tuple[int, int]], dtype: torch.dtype
) -> tuple[np.ndarray, float, float]:
    """(s [in], best α, relative output error at that α) for Linears ``weights`` sharing input ``x`` [tokens, in].

    ``params`` are each layer's (bits, group_size); ``x_mean`` is mean |x| per channel over the whole set."""
    x = np.asarray(x, np.float32)
    refs = [x @ w.T for w in weights]
    norm = sum(float(np.sum(r * r)) for r in refs) or 1.0
    base = np.maximum(np.asarray(x_mean, np.float64), 1e-8)
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in ALPHAS:
        s = base**alpha
        s = s / np.sqrt(s.max() * s.min())
        s = np.maximum(s, 1e-4).astype(np.float32)
        err = 0.0
        for w, ref, (bits, group) in zip(weights, refs, params, strict=True):
            wq = affine.fake_quantize(w * s[None, :], bits, group, dtype)
            err += float(np.sum(((x / s[None, :]) @ wq.T - ref) ** 2))
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[2], best[1], best[0] / norm


def fold_into_norm(weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A LayerNorm/RMSNorm whose output is divided by ``s`` per channel."""
    return weight / s, None if bias is None else bias / s


def fold_into_rows(weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A Linear whose output rows are divided by ``s`` (its output reaches the next input linearly)."""
    return weight / s[:, None], None if bias is None else bias / s


def clip_search(
    w: np.ndarray, x: np.ndarray, bits: int, group_size: int, dtype: torch.dtype
) -> tuple[np.ndarray, float]:
    """``w`` with each (row, group) range shrunk by the ratio that minimises its output error on ``x``; with the
    mean chosen ratio. ``mx.quantize`` of the result gives the clipped grid."""
    rows, cols = w.shape
    x = np.asarray(x[:CLIP_TOKENS], np.float32)
    g = cols // group_size
    wg = w.reshape(rows, g, group_size)
    lo, hi = wg.min(axis=2, keepdims=True), wg.max(axis=2, keepdims=True)
    xg = x.reshape(len(x), g, group_size)
    best_err = np.full((rows, g), np.inf)
    best_ratio = np.ones((rows, g))
    for r in CLIP_RATIOS:
        clipped = np.clip(wg, np.where(lo < 0, lo * r, lo), np.where(hi > 0, hi * r, hi))
        diff = wg - affine.fake_quantize(clipped.reshape(rows, cols), bits, group_size, dtype).reshape(
            rows, g, group_size
        )
        # Output error of each group's part of the product: Σ_tokens (x_g · d_g)², one group at a time.
        err = np.stack([np.sum((xg[:, j] @ diff[:, j].T) ** 2, axis=0) for j in range(g)], axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, r, best_ratio)
    br = best_ratio[..., None]
    out = np.clip(wg, np.where(lo < 0, lo * br, lo), np.where(hi > 0, hi * br, hi))
    return out.reshape(rows, cols).astype(np.float32), float(best_ratio.mean())
