"""GPTQ-style quantization (Frantar et al. 2022): columns quantized left to right, each column's rounding
error spread over the columns not yet quantized through the inverse Hessian ``H = 2 XᵀX`` of the layer inputs.

Groups follow MLX's group size: a group's scale and bias are picked (as ``mx.quantize`` picks them) from the
current, already-compensated weights when the quantizer reaches its first column (GPTQ's ``static_groups=False``,
no act-order), so the result packs into the standard MLX affine format. float64 on the CPU (torch).
"""

from __future__ import annotations

import numpy as np
import torch

from mlxd_daemon.calibrate import affine

DAMP = 0.01  # fraction of the mean Hessian diagonal added to the diagonal, as in GPTQ
GRID_RATIOS = tuple(1.0 - i / 40 for i in range(9))  # group range shrink ratios tried: 1.0 down to 0.8
# Off: measured on MiniLM, static groups (needed with act-order) lost more than the ordering gained.
ACT_ORDER = False
BLOCK = 128  # columns updated lazily per block; a multiple of every MLX group size


def hessian(x: np.ndarray) -> np.ndarray:
    """``2 XᵀX / n`` in float64 for inputs ``x`` [tokens, in]."""
    x64 = np.asarray(x, np.float64)
    return 2.0 * (x64.T @ x64) / max(len(x64), 1)


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    damp: float = DAMP,
    act_order: bool = ACT_ORDER,
) -> affine.Packed:
    """Quantize ``w`` [out, in] with error compensation under Hessian ``h`` [in, in]; returns MLX packing.

    ``act_order``: columns in decreasing Hessian-diagonal order, with every group's grid fixed up front from the
    uncompensated weights (GPTQ's ``static_groups``; MLX groups are contiguous columns, so they cannot follow the
    order). Without it, columns go left to right and a group's grid comes from the compensated weights."""
    W = torch.from_numpy(np.array(w, np.float64))
    H = np.array(h, np.float64)
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, torch.from_numpy(dead)] = 0.0  # inputs that are always zero: their weights cannot matter
    hdiag = np.diag(H).copy()
    n_groups = cols // group_size
    scales, biases = np.zeros((rows, n_groups)), np.zeros((rows, n_groups))
    perm = np.argsort(-hdiag, kind="stable") if act_order else np.arange(cols)
    if act_order:
        for g in range(n_groups):
            cs = slice(g * group_size, (g + 1) * group_size)
            scales[:, g], biases[:, g] = _group_grid(W[:, cs].numpy(), hdiag[cs], bits, dtype)
    H[np.diag_indices(cols)] += damp * float(np.mean(np.diag(H)))
    W, H = W[:, torch.from_numpy(perm)].contiguous(), H[np.ix_(perm, perm)]
    hinv = torch.from_numpy(_upper_inverse_cholesky(H))
    maxq = float((1 << bits) - 1)
    codes = torch.zeros((rows, cols), dtype=torch.float64)
    S, B = torch.from_numpy(scales), torch.from_numpy(biases)
    block = max(BLOCK, group_size)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:
                # The group's grid is fixed from the compensated weights when the quantizer reaches it.
                sc, bi = _group_grid(w1[:, i : i + group_size].numpy(), hdiag[col : col + group_size], bits, dtype)
                scales[:, g], biases[:, g] = sc, bi
            scale, bias = S[:, g], B[:, g]
            wcol = w1[:, i]
            q = torch.clamp(torch.round((wcol - bias) / torch.where(scale == 0, 1.0, scale)), 0.0, maxq)
            codes[:, col] = q
            e = (wcol - (scale * q + bias)) / hinv1[i, i]
            w1[:, i:].sub_(torch.outer(e, hinv1[i, i:]))
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return affine.pack(codes.numpy(), scales, biases, bits, group_size, dtype)


def _group_grid(w: np.ndarray, hdiag: np.ndarray, bits: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per row (scale, bias) for one group [rows, group]: MLX's min/max grid of the range shrunk by the ratio in
    ``GRID_RATIOS`` that minimises the Hessian-diagonal-weighted rounding error (GPTQ's ``mse`` grid search)."""
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    best_err = np.full(len(w), np.inf)
    best_s, best_b = np.zeros(len(w)), np.zeros(len(w))
    for r in GRID_RATIOS:
        clipped = np.clip(w, np.where(lo < 0, lo * r, lo), np.where(hi > 0, hi * r, hi))
        sc, bi = affine.group_params(clipped, bits, dtype)
        q = affine.codes_for(w, sc, bi, bits)
        err = ((w - (sc[:, None] * q + bi[:, None])) ** 2) @ hdiag
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_b = np.where(better, sc, best_s), np.where(better, bi, best_b)
    return best_s, best_b


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``h``⁻¹ (LAPACK potrf/potri); more damping if ``h`` is not positive definite."""
    from scipy.linalg import lapack

    extra = 0.0
    for _ in range(8):
        c, info = lapack.dpotrf(h + extra * np.eye(len(h)), lower=0)
        if info == 0:
            inv, info = lapack.dpotri(c, lower=0)
            inv = np.triu(inv) + np.triu(inv, 1).T
            u, info2 = lapack.dpotrf(inv, lower=0)
            if info == 0 and info2 == 0:
                return np.triu(u)
        extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))))
    msg = "Hessian is not positive definite even after extra damping"
    raise RuntimeError(msg)
