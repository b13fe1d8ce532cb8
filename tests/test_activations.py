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


class TestAttention:
    def test_softmax_matches_float64(self) -> None:
        """The fused softmax is within 1e-6 of float64 over logits spanning +-60, with -inf-like masked entries
        giving exact zeros, as mx.softmax does."""
        from mlxd_daemon.archs._attention import softmax

        rng = np.random.default_rng(0)
        x = rng.uniform(-60, 60, (64, 77)).astype(np.float32)
        x[:, 40:] = np.finfo(np.float32).min  # masked keys
        want = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        want /= want.sum(-1, keepdims=True)
        got = np.array(softmax(mx.array(x)))
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
        assert (got[:, 40:] == 0).all()

    @pytest.mark.parametrize("masked", [False, True])
    def test_attention_matches_mlx_sdpa(self, masked: bool) -> None:
        """Attention on the CPU (explicit, fused softmax) equals mx.fast.scaled_dot_product_attention."""
        from mlxd_daemon.archs._attention import attention

        b, n, heads, d = 3, 17, 4, 32
        q, k, v = (mx.random.normal((b, n, d), key=mx.random.key(i)) for i in range(3))
        mask = mx.array(np.tril(np.ones((n, n), bool))[None, None]) if masked else None
        split = [t.reshape(b, n, heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v)]
        want = mx.fast.scaled_dot_product_attention(*split, scale=0.3, mask=mask).transpose(0, 2, 1, 3).reshape(b, n, d)
        np.testing.assert_allclose(np.array(attention(q, k, v, heads, 0.3, mask)), np.array(want), atol=1e-6)
