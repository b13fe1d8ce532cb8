"""Loading weights for inference: the compute policy per backend, for every arch.

- Linux CPU: ``mx.quantized_matmul`` is ~57x slower than float32 matmul and float16/bfloat16 matmul ~40x slower
  (../shared/REFERENCE.md), so packed weights are dequantized once at load and everything computes in float32.
- Apple GPUs and CUDA: quantized and half-precision kernels are the fast ones, so quantized modules stay
  quantized (the model keeps its quantized size) and compute runs in the stored float dtype.

``MLXD_QUANTIZED_COMPUTE=kernels|dequantize`` overrides the choice (``auto`` by default).
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxd_daemon.quantize import layer_params

__all__ = ["dequantize_weights", "layer_params", "prepare_weights", "use_kernels"]

ENV_POLICY = "MLXD_QUANTIZED_COMPUTE"
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def use_kernels() -> bool:
    """Keep quantized weights packed (and half precision as stored) on this backend?"""
    policy = os.environ.get(ENV_POLICY, "auto")
    if policy in ("kernels", "dequantize"):
        return policy == "kernels"
    return bool(mx.default_device() == mx.gpu)


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


def prepare_weights(
    model: nn.Module, weights: dict[str, mx.array], config_quantization: dict[str, Any] | None
) -> tuple[dict[str, mx.array], str]:
    """Apply the backend's policy before ``model.load_weights``: returns the weights to load and the compute
    policy (shown by ListModels). With kernels, the model's quantized modules are swapped in here."""
    packed = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")}
    if not use_kernels():
        dequantize_weights(weights, config_quantization)
        policy = "float32 (quantized weights dequantized at load)" if packed else "float32"
        return {k: v.astype(mx.float32) if v.dtype in _FLOATS else v for k, v in weights.items()}, policy

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path not in packed or not hasattr(module, "to_quantized"):
            return False
        p = layer_params(config_quantization, path)
        return {"group_size": p.group_size, "bits": p.bits, "mode": p.mode}

    if packed:
        nn.quantize(model, class_predicate=predicate)
    floats = [v.dtype for v in weights.values() if v.dtype in _FLOATS]
    compute = max(set(floats), key=floats.count) if floats else mx.float32
    policy = f"{str(compute).split('.')[-1]}" + (" with quantized kernels" if packed else "")
    return {k: v.astype(compute) if v.dtype in _FLOATS else v for k, v in weights.items()}, policy
