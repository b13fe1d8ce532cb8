"""The converter's affine quantization kernel against ``mx.quantize``: the same bytes, every bit width, group size
and input dtype, on weights built to hit the formula's branches (zero, constant, one-signed and tiny groups,
integer grids where rounding ties), and NaN/Inf left to MLX."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch
from mlxd_daemon import affine_kernel
from mlxd_daemon.torch_mlx import to_mlx, to_torch


def _weights(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * 0.02
    w[0, :128] = 0  # an all-zero group: scale eps, bias 0
    w[1, :128] = 1.5  # constant groups
    w[2, :128] = -3
    w[3] = torch.randn(256, generator=g) * 1e-9  # below eps
    w[4] = torch.randn(256, generator=g) * 1e4
    w[5] = torch.randint(-8, 8, (256,), generator=g).float()  # exact grid points: rint ties
    w[6] = torch.rand(256, generator=g)  # one-signed groups: the edge is the min or the max
    w[7] = -torch.rand(256, generator=g)
    w[8] = (torch.arange(256) % 16).float() * 0.5 - 3.75  # half-way values
    w[9, ::2] = -0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bytes_equal_mx_quantize(dtype: torch.dtype) -> None:
    w = _weights(dtype)
    for bits in affine_kernel.BITS:
        for group in affine_kernel.GROUP_SIZES:
            assert affine_kernel.supported("affine", bits, group, tuple(w.shape), dtype)
            ours = affine_kernel.quantize(w, bits, group)
            assert ours is not None
            theirs = mx.quantize(to_mlx(w), group_size=group, bits=bits)
            mx.eval(theirs)
            for a, b in zip(ours, theirs, strict=True):
                b = to_torch(b)
                assert a.dtype == b.dtype and a.shape == b.shape, (bits, group, a.dtype, b.dtype, a.shape, b.shape)
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (dtype, bits, group)


def test_leading_dims_and_row_blocks() -> None:
    """Experts ([E, rows, d]) and a block of rows quantize as the whole tensor does."""
    w = (torch.randn(3, 16, 128) * 0.05).to(torch.bfloat16)
    whole = affine_kernel.quantize(w, 4, 64)
    part = affine_kernel.quantize(w[1:], 4, 64)
    assert whole is not None and part is not None
    assert whole[0].shape == (3, 16, 16) and whole[1].shape == (3, 16, 2)
    for a, b in zip(whole, part, strict=True):
        assert torch.equal(a[1:].view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_left_to_mlx(bad: float) -> None:
    w = torch.randn(4, 64)
    w[2, 5] = bad
    assert affine_kernel.quantize(w.to(torch.bfloat16), 4, 64) is None
    assert affine_kernel.quantize(w, 8, 32) is None


def test_supported() -> None:
    assert not affine_kernel.supported("mxfp4", 4, 32, (4, 64), torch.float32)
    assert not affine_kernel.supported("affine", 4, 64, (4, 96), torch.float32)  # d not a multiple of the group
    assert not affine_kernel.supported("affine", 4, 16, (4, 64), torch.float32)
    assert not affine_kernel.supported("affine", 7, 64, (4, 64), torch.float32)
    assert not affine_kernel.supported("affine", 4, 64, (4, 64), torch.float64)
