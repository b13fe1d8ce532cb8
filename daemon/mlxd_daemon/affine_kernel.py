"""MLX's affine quantization on the CPU, byte for byte, vectorised (the converter's hot path for ``-q``).

``mx.quantize`` on the CPU runs one scalar loop per group (a division and a rounding per weight, ~5 ns a weight
on the 2-core machine); this is the same arithmetic in the same order, compiled by numba so the per-weight steps
run as SIMD, about 2.3x faster and releasing the GIL (the converter's block workers run it in parallel). Same
order means: min/max in float32 of the group, ``scale = max((max - min) / n_bins, 1e-7)`` signed towards the
larger magnitude, the edge snapped to the grid (``scale = edge / rint(edge / scale)``, ``bias = edge``), each
weight ``clip(rint((w - bias) / scale), 0, n_bins)`` packed little-endian, scales and biases rounded to the input
dtype (bfloat16 round-to-nearest-even, as MLX does). ``tests/test_affine_kernel.py`` checks identity with
``mx.quantize`` over every bit width, group size and input dtype.

A group that holds NaN or Inf is not quantized here (``quantize`` returns None): the caller takes the exact
path (``mx.quantize``, plus the NaN/Inf report), so even undefined outputs stay MLX's. numba's compiled code is
cached on disk (``NUMBA_CACHE_DIR``, defaulting to mlxd's cache dir): a fresh process loads it in ~0.1 s.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxd" / "numba")
)

import numba  # reads NUMBA_CACHE_DIR on import

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# Elements per packed word and its bytes: powers of two fill 32 bits; 3 and 5 bits pack 8 values into 3 / 5
# bytes, 6 bits pack 4 values into 3 bytes (MLX's layout; the packed array is uint32 either way).
_PACK = {2: (16, 4), 3: (8, 3), 4: (8, 4), 5: (8, 5), 6: (4, 3), 8: (4, 4)}


def supported(mode: str, bits: int, group_size: int, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether ``quantize`` takes this tensor (else the caller uses ``mx.quantize``, which also raises MLX's own
    errors for shapes it refuses)."""
    return (
        mode == "affine"
        and bits in BITS
        and group_size in GROUP_SIZES
        and len(shape) >= 1
        and shape[-1] % group_size == 0
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(packed uint32 [..., d * bits / 32], scales, biases [..., d / group_size] in ``w``'s dtype), what
    ``mx.quantize(w, group_size, bits)`` returns, or None when a group holds NaN/Inf."""
    shape = tuple(w.shape)
    bf16 = w.dtype == torch.bfloat16
    # bfloat16 moves as its raw bits; float16 -> float32 is exact (its scales and biases are rounded back below)
    src = w.contiguous().view(torch.int16).numpy().view(np.uint16) if bf16 else w.contiguous().float().numpy()
    groups = src.reshape(-1, group_size)
    n = groups.shape[0]
    packed = np.empty((n, group_size * bits // 8), np.uint8)
    side = np.uint16 if bf16 else np.float32
    scales, biases = np.empty(n, side), np.empty(n, side)
    pack, pack_bytes = _PACK[bits]
    if _affine(groups, bf16, packed, scales, biases, bits, pack, pack_bytes):
        return None
    lead = shape[:-1]
    q = torch.from_numpy(packed.reshape(*lead, -1).view(np.uint32))
    if bf16:
        s = torch.from_numpy(scales.view(np.int16)).view(torch.bfloat16)
        b = torch.from_numpy(biases.view(np.int16)).view(torch.bfloat16)
    else:
        s, b = torch.from_numpy(scales).to(w.dtype), torch.from_numpy(biases).to(w.dtype)
    return q, s.reshape(*lead, -1), b.reshape(*lead, -1)


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"nnan", "ninf", "nsz"})
def _minmax(x: np.ndarray) -> tuple[float, float]:
    # Only compares: reordering them (what the flags allow, so it vectorises) cannot change a finite result, and
    # the caller has ruled out NaN/Inf. A -0.0 vs 0.0 tie cannot change the output (only |min|, |max| and their
    # difference are used, and an all-zero group gets bias 0 either way).
    lo = x[0]
    hi = x[0]
    for j in range(1, x.shape[0]):
        v = x[j]
        hi = v if hi < v else hi
        lo = v if v < lo else lo
    return lo, hi


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _affine(src, bf16, out, scales, biases, bits, pack, pack_bytes):  # type: ignore[no-untyped-def]
    """Groups ``src`` (n, g: float32, or uint16 bfloat16 bits) -> ``out`` (n, g * bits / 8 bytes), ``scales`` and
    ``biases`` (n: float32, or uint16 bfloat16 bits). Returns how many groups hold NaN/Inf (left unwritten)."""
    n_groups, group = src.shape
    n_bins = np.float32((1 << bits) - 1)
    eps = np.float32(1e-7)
    zero = np.float32(0.0)
    exponent = np.uint32(0x7F800000)
    word = np.empty(group, np.uint32)
    x = word.view(np.float32)
    q = np.empty(group, np.uint8)
    pair = np.empty(2, np.float32)
    pair_bits = pair.view(np.uint32)
    bad = 0
    for i in range(n_groups):
        if bf16:
            for j in range(group):
                word[j] = np.uint32(src[i, j]) << np.uint32(16)
        else:
            for j in range(group):
                x[j] = src[i, j]
        special = np.uint32(0)
        for j in range(group):
            special |= np.uint32((word[j] & exponent) == exponent)
        if special:
            bad += 1
            continue
        lo, hi = _minmax(x)
        mask = abs(lo) > abs(hi)
        scale = (hi - lo) / n_bins
        scale = eps if scale < eps else scale
        scale = scale if mask else -scale
        edge = lo if mask else hi
        q0 = np.rint(edge / scale)
        bias = zero
        if q0 != zero:
            scale = edge / q0
            bias = edge
        for j in range(group):
            v = np.rint((x[j] - bias) / scale)
            v = zero if v < zero else v
            v = n_bins if n_bins < v else v
            q[j] = np.uint8(v)
        if bits == 4:
            for b in range(group // 2):
                out[i, b] = q[2 * b] | (q[2 * b + 1] << np.uint8(4))
        elif bits == 8:
            for b in range(group):
                out[i, b] = q[b]
        elif bits == 2:
            for b in range(group // 4):
                out[i, b] = (q[4 * b] | (q[4 * b + 1] << np.uint8(2)) | (q[4 * b + 2] << np.uint8(4))
                             | (q[4 * b + 3] << np.uint8(6)))  # fmt: skip
        else:
            for p in range(group // pack):
                el = np.uint64(0)
                for k in range(pack):
                    el |= np.uint64(q[p * pack + k]) << np.uint64(k * bits)
                for b in range(pack_bytes):
                    out[i, p * pack_bytes + b] = np.uint8((el >> np.uint64(8 * b)) & np.uint64(0xFF))
        pair[0] = scale
        pair[1] = bias
        if bf16:  # float32 -> bfloat16, round to nearest even (no NaN can reach here)
            for t in range(2):
                u = pair_bits[t]
                u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                if t == 0:
                    scales[i] = u
                else:
                    biases[i] = u
        else:
            scales[i] = pair[0]
            biases[i] = pair[1]
    return bad
