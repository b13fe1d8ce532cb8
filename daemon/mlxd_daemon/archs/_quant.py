"""Loading quantized MLX weights: dequantize every ``<p>.weight`` that has ``<p>.scales``, for any arch.

On the Linux CPU backend ``mx.quantized_matmul`` is ~57x slower than float32 matmul, and dequantize + float32
is ~10x faster than it (../shared/REFERENCE.md), so loaders dequantize once at load time.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlxd_daemon.quantize import layer_params

__all__ = ["dequantize_weights", "layer_params"]


def dequantize_weights(
    weights: dict[str, mx.array], config_quantization: dict[str, Any] | None, dtype: mx.Dtype = mx.float32
) -> dict[str, mx.array]:
    """Replace every packed ``<p>.weight`` (or bare ``<p>``) that has ``<p>.scales`` by its ``dtype``
    dequantization, in place, using the per-module entry of config.json ``quantization`` or its defaults
    (bits, group size and mode: affine, mxfp4, mxfp8, nvfp4). Returns ``weights``."""
    for scales_name in [k for k in weights if k.endswith(".scales")]:
        prefix = scales_name.removesuffix(".scales")
        p = layer_params(config_quantization, prefix)
        name = prefix + ".weight" if prefix + ".weight" in weights else prefix
        weights[name] = mx.dequantize(
            weights[name],
            weights.pop(scales_name),
            weights.pop(prefix + ".biases", None),
            group_size=p.group_size,
            bits=p.bits,
            mode=p.mode,
            dtype=dtype,
        )
    return weights
