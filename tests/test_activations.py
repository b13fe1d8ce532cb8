"""The fused rational activations match PyTorch's (MLX's CPU transcendentals are scalar and slow)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlxd_daemon.archs._activations import ACTIVATIONS, erf, sigmoid, tanh

XS = np.linspace(-20, 20, 400_001, dtype=np.float32)
TORCH = {
    "gelu": lambda t: torch.nn.functional.gelu(t),
    "gelu_new": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "relu": torch.relu,
}


class TestActivations:
    @pytest.mark.parametrize("name", sorted(ACTIVATIONS))
    def test_matches_torch(self, name: str) -> None:
        """Each hidden_act agrees with PyTorch's to float32 rounding over [-20, 20] and keeps the dtype."""
        expected = TORCH[name](torch.from_numpy(XS)).numpy()
        got = ACTIVATIONS[name](mx.array(XS))
        assert got.dtype == mx.float32
        np.testing.assert_allclose(np.array(got), expected, atol=4e-6, rtol=1e-6)

    @pytest.mark.parametrize(("ours", "reference"), [(tanh, np.tanh), (sigmoid, lambda x: 1 / (1 + np.exp(-x)))])
    def test_building_blocks(self, ours: object, reference: object) -> None:
        """tanh and sigmoid are within 4e-7 of float64."""
        got = np.array(ours(mx.array(XS)))  # type: ignore[operator]
        want = reference(XS.astype(np.float64))  # type: ignore[operator]
        assert np.abs(got - want).max() < 4e-7

    def test_erf(self) -> None:
        """erf is within 5e-7 of float64 (saturating beyond |x| = 4)."""
        import math

        want = np.array([math.erf(x) for x in XS[::97].astype(np.float64)])
        assert np.abs(np.array(erf(mx.array(XS[::97]))) - want).max() < 5e-7
