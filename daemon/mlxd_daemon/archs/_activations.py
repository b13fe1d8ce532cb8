"""Activation functions from multiplies, adds and one divide, compiled into one fused kernel each.

MLX's CPU backend evaluates exp/tanh/sigmoid/erf with scalar code: ``x * sigmoid(1.702 x)`` on a [400, 3072]
activation took 20 ms, a fifth of a ViT-B layer, while a multiply takes 0.14 ms. The rational approximations
below are Eigen's / XLA's float32 ones (max error 3.6e-7 for tanh, 4.2e-7 for erf, against float64) and run
~12x faster fused; on GPUs they cost about the same as the built-ins.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

# Eigen's float32 tanh: odd rational polynomial on [-7.9, 7.9], where tanh is +-1 in float32 beyond.
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)  # fmt: skip
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_CLAMP = 7.90531110763549805
# Eigen's / XLA's float32 erf: odd rational polynomial on [-4, 4], where erf is +-1 in float32 beyond.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # fmt: skip
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)  # fmt: skip


def _odd_rational(x: mx.array, p: tuple[float, ...], q: tuple[float, ...]) -> mx.array:
    x2 = x * x
    num = p[0] * x2 + p[1]
    for c in p[2:]:
        num = num * x2 + c
    den = q[0] * x2 + q[1]
    for c in q[2:]:
        den = den * x2 + c
    return x * num / den


def tanh(x: mx.array) -> mx.array:
    return _odd_rational(mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP), _TANH_P, _TANH_Q)


def erf(x: mx.array) -> mx.array:
    return _odd_rational(mx.clip(x, -4.0, 4.0), _ERF_P, _ERF_Q)


def sigmoid(x: mx.array) -> mx.array:
    return 0.5 + 0.5 * tanh(0.5 * x)


def _gelu(x: mx.array) -> mx.array:  # exact (erf) GELU, HF "gelu"
    return 0.5 * x * (1 + erf(x * (1 / math.sqrt(2))))


def _gelu_tanh(x: mx.array) -> mx.array:  # HF "gelu_new" / "gelu_pytorch_tanh"
    return 0.5 * x * (1 + tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def _quick_gelu(x: mx.array) -> mx.array:  # CLIP's
    return x * sigmoid(1.702 * x)


def _silu(x: mx.array) -> mx.array:  # Llama's
    return x * sigmoid(x)


def _relu(x: mx.array) -> mx.array:
    return mx.maximum(x, 0)


gelu = mx.compile(_gelu, shapeless=True)
gelu_tanh = mx.compile(_gelu_tanh, shapeless=True)
quick_gelu = mx.compile(_quick_gelu, shapeless=True)
silu = mx.compile(_silu, shapeless=True)

# Hugging Face ``hidden_act`` names.
ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": silu,
    "swish": silu,
    "relu": _relu,
}


Activation = Callable[[mx.array], mx.array]


def activation(name: str, extra: dict[str, Activation] | None = None) -> Activation:
    """The function for a config's ``hidden_act`` (``extra``: names one use allows besides, e.g. a pooler's tanh);
    Unsupported UNSUPPORTED_ACTIVATION naming the supported ones otherwise."""
    from mlxd_daemon.errors import Unsupported

    table = {**(extra or {}), **ACTIVATIONS}
    if name not in table:
        msg = f"hidden_act {name!r} is not supported; supported: {', '.join(table)}"
        raise Unsupported(msg, reason="UNSUPPORTED_ACTIVATION", hidden_act=name)
    return table[name]
