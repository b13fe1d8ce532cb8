"""Lower a decomposed ``ExportedProgram`` to the program format's graph (JSON-able nodes) and its weights.

Weights keep their ``state_dict`` names. Convolution weights are transposed here, once, to MLX's channels-last
layout (PyTorch conv2d is [O, I, kH, kW], MLX is [O, kH, kW, I]) and the layout is recorded per tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument

from mlxd_daemon.errors import Unsupported
from mlxd_daemon.export.capture import op_name, output_names
from mlxd_daemon.export.ops import WEIGHT_LAYOUTS

# kwargs that only place or lay out memory; MLX has one device and dense row-major arrays.
_PLACEMENT_KWARGS = frozenset({"device", "layout", "pin_memory", "memory_format", "non_blocking"})
_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclass
class Lowered:
    inputs: list[dict[str, Any]]  # [{name, shape, dtype}]; a symbolic axis is its dim name (a string)
    outputs: list[dict[str, Any]]  # [{name, ref, shape, dtype}]
    nodes: list[dict[str, Any]]
    params: dict[str, str]  # graph input name -> safetensors tensor name
    weights: dict[str, torch.Tensor]  # safetensors tensor name -> tensor (already in its disk layout)
    layouts: dict[str, str]  # safetensors tensor name -> layout, for tensors not in PyTorch's
    dims: dict[str, dict[str, int | None]] = field(default_factory=dict)  # dim name -> {min, max}


class _Dims:
    """Names for the program's symbolic sizes: the capture's names (batch, seq) where given, else torch's."""

    def __init__(self, ep: ExportedProgram, names: dict[str, dict[str, str]], max_lengths: dict[str, int]) -> None:
        self.ep, self.names, self.max_lengths = ep, names, max_lengths
        self.by_symbol: dict[str, str] = {}
        self.ranges: dict[str, dict[str, int | None]] = {}

    def input_shape(self, name: str, val: torch.Tensor) -> list[int | str]:
        shape: list[int | str] = []
        for axis, d in enumerate(val.shape):
            if isinstance(d, int) or not isinstance(d, torch.SymInt) or d.node.expr.is_number:
                shape.append(int(d))
                continue
            symbol = str(d.node.expr)
            dim = self.by_symbol.setdefault(symbol, self.names.get(name, {}).get(str(axis), symbol))
            shape.append(dim)
            if dim not in self.ranges:
                bounds = self.ep.range_constraints.get(d.node.expr)
                lo, hi = (_finite(bounds.lower), _finite(bounds.upper)) if bounds is not None else (None, None)
                lo = 1 if lo is None else lo
                cap = self.max_lengths.get(dim)
                hi = cap if hi is None or (cap is not None and cap < hi) else hi
                self.ranges[dim] = {"min": 1 if lo == 2 else lo, "max": hi}  # 2: torch's 0/1 specialisation
        return shape

    def output_shape(self, val: torch.Tensor) -> list[int | str]:
        out: list[int | str] = []
        for d in val.shape:
            if isinstance(d, int) or not isinstance(d, torch.SymInt) or d.node.expr.is_number:
                out.append(int(d))
            else:
                text = str(d.node.expr)
                for symbol, dim in sorted(self.by_symbol.items(), key=lambda kv: -len(kv[0])):
                    text = re.sub(rf"\b{symbol}\b", dim, text)
                out.append(text)
        return out


def _finite(bound: Any) -> int | None:
    """A range bound as an int; None for torch's infinities (``int_oo``, ``oo``)."""
    return None if "oo" in str(bound) else int(bound)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(value: Any) -> Any:
    """A node argument as JSON: node references ``{"ref": name}``, dtypes ``{"dtype": "float32"}``,
    non-finite floats ``{"float": "inf"}``; placement objects (device, layout, memory format) become null."""
    if isinstance(value, torch.fx.Node):
        return {"ref": value.name}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.device, torch.layout, torch.memory_format)):
        return None
    msg = f"graph argument {value!r} ({type(value).__name__}) has no program encoding"
    raise Unsupported(msg, reason="UNSUPPORTED_ARGUMENT", type=type(value).__name__)


def _state_tensor(ep: ExportedProgram, target: str) -> torch.Tensor:
    value = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
    if not isinstance(value, torch.Tensor):
        msg = f"program constant {target!r} is a {type(value).__name__}, not a tensor"
        raise Unsupported(msg, reason="UNSUPPORTED_CONSTANT", name=target)
    return value.detach()


_KERNEL_AXES = {1: "K", 2: "HW", 3: "DHW"}


def _mlx_weight_layout(w: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, str]:
    nd = w.ndim - 2
    if transposed:
        # PyTorch conv_transpose is [I, O, *k], MLX is [O, *k, I].
        return w.permute(1, *range(2, w.ndim), 0), f"mlx_conv_transpose{nd}d_O{_KERNEL_AXES[nd]}I"
    # PyTorch conv is [O, I, *k], MLX is [O, *k, I].
    return w.permute(0, *range(2, w.ndim), 1), f"mlx_conv{nd}d_O{_KERNEL_AXES[nd]}I"


def lower(
    ep: ExportedProgram, dim_names: dict[str, dict[str, str]] | None = None, max_lengths: dict[str, int] | None = None
) -> Lowered:
    """The graph as program nodes plus its weights (conv weights pre-transposed; see the module docstring).

    ``dim_names``: {input: {axis: name}} for symbolic axes (dynamic shapes); ``max_lengths``: {name: the model's
    maximum}, e.g. its position embeddings, recorded with each dim's range."""
    dims = _Dims(ep, dim_names or {}, max_lengths or {})
    params: dict[str, str] = {}
    weights: dict[str, torch.Tensor] = {}
    inputs: list[dict[str, Any]] = []
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        if not isinstance(spec.arg, TensorArgument):
            continue  # a constant user input: its value is baked into the nodes that read it
        name = spec.arg.name
        if spec.kind in _STATE_KINDS and spec.target is not None:
            params[name] = spec.target
            weights[spec.target] = _state_tensor(ep, spec.target)
        elif spec.kind == InputKind.USER_INPUT:
            val = placeholders[name].meta["val"]
            inputs.append({"name": name, "shape": dims.input_shape(name, val), "dtype": dtype_name(val.dtype)})
        else:
            msg = f"graph input {name} of kind {spec.kind.name} is not supported (a training-mode graph?)"
            raise Unsupported(msg, reason="UNSUPPORTED_INPUT_KIND", kind=spec.kind.name)

    layouts = _pretranspose(ep, params, weights)
    nodes = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        kwargs = {k: encode(v) for k, v in node.kwargs.items() if k not in _PLACEMENT_KWARGS}
        nodes.append({"op": op_name(node), "args": encode(node.args), "kwargs": kwargs, "out": node.name})

    user_outputs = [s for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
    if len(user_outputs) != len(ep.graph_signature.output_specs):
        msg = "the program mutates buffers or inputs (a training-mode module?): export it in eval mode"
        raise Unsupported(msg, reason="UNSUPPORTED_MUTATION")
    names = output_names(ep)
    out_nodes = {n.name: n for n in ep.graph.nodes}
    outputs = []
    for name, spec in zip(names, user_outputs, strict=True):
        ref = getattr(spec.arg, "name", None)
        val = out_nodes[ref].meta.get("val") if ref in out_nodes else None
        entry: dict[str, Any] = {"name": name, "ref": ref}
        if isinstance(val, torch.Tensor):
            entry.update(shape=dims.output_shape(val), dtype=dtype_name(val.dtype))
        outputs.append(entry)
    return Lowered(inputs, outputs, nodes, params, weights, layouts, dims.ranges)


def _pretranspose(ep: ExportedProgram, params: dict[str, str], weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Transpose weights read only as convolution weights to MLX layout; the rest stay as PyTorch has them."""
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in ep.graph.nodes:
        for i, arg in enumerate(node.args):
            if isinstance(arg, torch.fx.Node) and arg.name in params:
                uses.setdefault(arg.name, set()).add((op_name(node), i))
    layouts: dict[str, str] = {}
    for node in ep.graph.nodes:
        position = WEIGHT_LAYOUTS.get(op_name(node))
        if position is None:
            continue
        w = node.args[position]
        if not isinstance(w, torch.fx.Node) or w.name not in params or len(uses[w.name]) != 1:
            continue  # computed or shared weight: the interpreter transposes it per call instead
        target = params[w.name]
        if target in layouts:
            continue
        transposed = bool(node.args[6]) if len(node.args) > 6 else False
        weights[target], layouts[target] = _mlx_weight_layout(weights[target], transposed)
    return layouts
