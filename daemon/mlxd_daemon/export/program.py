"""The MLX program format (a directory) and its interpreter.

Directory layout::

    program.json               {"format": "mlxd.program", "version": 2, "inputs": [{name, shape, dtype, range?}],
                                "dims": {dim name: {min, max}},
                                "outputs": [{name, ref, shape, dtype}], "nodes": [{op, args, kwargs, out}],
                                "params": {graph input name: tensor name}, "layouts": {tensor name: layout},
                                "source": {kind, ...}, "op_coverage": {op: count}}
    model.safetensors          weights by PyTorch ``state_dict`` name; conv weights channels-last (see layouts)
    example_inputs.safetensors the inputs the graph was captured with (validation replays them)
    source.pt2                 the captured ExportedProgram, when the source was a module or a factory
    config.json                {"model_type": "mlxd_program", ...}: the daemon finds archs/mlxd_program.py
    mlxd_manifest.json         source, dtype, layouts, created_at

Node arguments: ``{"ref": name}`` is an earlier node's (or an input's, or a param's) value, ``{"dtype": "int64"}``
a dtype, ``{"float": "-inf"}`` a non-finite float; lists nest; everything else is a literal. Ops are core ATen
overload names (``aten.addmm.default``), ``getitem``, or Python arithmetic on sizes (``operator.mul``);
``ops.OPS`` maps each to MLX. A shape entry that is a string is a symbolic axis (version 2): the dim of that
name (``batch``, ``seq``) takes any value in its ``dims`` range, the same in every input that names it.
``mx.compile`` traces the graph once per distinct input shape and keeps each trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxd_daemon.archs._loading import read_json, read_safetensors, storage_dtype
from mlxd_daemon.archs._quant import dequantize_weights
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.export import ops

FORMAT = "mlxd.program"
VERSION = 2  # 2: symbolic axes (dims)
MODEL_TYPE = "mlxd_program"
PROGRAM_FILE = "program.json"
WEIGHTS_FILE = "model.safetensors"
EXAMPLES_FILE = "example_inputs.safetensors"
SOURCE_PT2 = "source.pt2"

MX_DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16,
    "float64": mx.float32,  # MLX computes float32: float64 graphs run at float32 precision
    "int64": mx.int64, "int32": mx.int32, "int16": mx.int16, "int8": mx.int8, "uint8": mx.uint8, "bool": mx.bool_,
}  # fmt: skip
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def check_shape(spec: dict[str, Any], shape: tuple[int, ...], dims: dict[str, Any], bound: dict[str, int]) -> None:
    """BAD_INPUT_SHAPE unless ``shape`` fits ``spec``: static axes equal, each named axis within its range and
    equal to that dim's value in the inputs before (``bound`` collects them)."""
    want = spec["shape"]
    problem = "" if len(shape) == len(want) else f"{len(shape)} axes, not {len(want)}"
    for axis, (got, dim) in enumerate(zip(shape, want, strict=False)):
        if problem:
            break
        if isinstance(dim, int):
            problem = "" if got == dim else f"axis {axis} is {got}; the program was captured for {dim} (static)"
            continue
        lo, hi = dims.get(dim, {}).get("min") or 1, dims.get(dim, {}).get("max")
        if got < lo or (hi is not None and got > hi):
            problem = f"{dim} (axis {axis}) is {got}; the program takes {lo}..{hi if hi is not None else 'any'}"
        elif bound.setdefault(dim, got) != got:
            problem = f"{dim} (axis {axis}) is {got} but {bound[dim]} in an earlier input"
    if problem:
        msg = f"input {spec['name']!r} has shape {list(shape)}: {problem}"
        raise InvalidArgument(msg, reason="BAD_INPUT_SHAPE", input=spec["name"])


def to_channels_last(x: mx.array) -> mx.array:
    """[N, C, *spatial] -> [N, *spatial, C]."""
    return x.transpose(0, *range(2, x.ndim), 1) if x.ndim >= 3 else x


def to_channels_first(x: mx.array) -> mx.array:
    """[N, *spatial, C] -> [N, C, *spatial]."""
    return x.transpose(0, x.ndim - 1, *range(1, x.ndim - 1)) if x.ndim >= 3 else x


def conv_weight_to_mlx(w: mx.array, transposed: bool) -> mx.array:
    """A PyTorch-layout conv weight computed in the graph (pre-transposed ones never come here)."""
    if transposed:
        return w.transpose(1, *range(2, w.ndim), 0)  # [I, O, *k] -> [O, *k, I]
    return w.transpose(0, *range(2, w.ndim), 1)  # [O, I, *k] -> [O, *k, I]


def _ref(value: Any) -> str | None:
    return value["ref"] if isinstance(value, dict) and "ref" in value else None


class _Frame:
    """Values of one run by name; ``channels_last`` names the values stored [N, *spatial, C]."""

    def __init__(self, values: dict[str, Any], pretransposed: frozenset[str]) -> None:
        self.values = values
        self.pretransposed = pretransposed
        self.channels_last: set[str] = set()
        self._converted: dict[tuple[str, bool], mx.array] = {}

    def get(self, ref: str, channels_last: bool = False) -> Any:
        v = self.values[ref]
        if not isinstance(v, mx.array) or v.ndim < 3 or (ref in self.channels_last) == channels_last:
            return v
        key = (ref, channels_last)
        if key not in self._converted:  # convert once, however many consumers want the other layout
            self._converted[key] = to_channels_last(v) if channels_last else to_channels_first(v)
        return self._converted[key]

    def decode(self, value: Any, channels_last: frozenset[str] = frozenset()) -> Any:
        if isinstance(value, dict):
            if "ref" in value:
                return self.get(value["ref"], value["ref"] in channels_last)
            if "dtype" in value:
                return MX_DTYPES[value["dtype"]]
            if "float" in value:
                return float(value["float"])
        if isinstance(value, list):
            return [self.decode(v, channels_last) for v in value]
        return value

    def set(self, name: str, value: Any, channels_last: bool) -> None:
        self.values[name] = value
        if channels_last:
            self.channels_last.add(name)

    def _rank(self, ref: str | None) -> int:
        v = self.values.get(ref) if ref is not None else None
        return v.ndim if isinstance(v, mx.array) else -1

    def step(self, node: dict[str, Any]) -> None:
        op, args, kwargs, out = node["op"], node["args"], node["kwargs"], node["out"]
        first = _ref(args[0]) if args else None
        kw = {k: self.decode(v) for k, v in kwargs.items()}
        if op == "getitem":
            assert first is not None
            v = self.values[first][args[1]]
            self.set(out, v, first in self.channels_last and isinstance(v, mx.array))
        elif op in ops.CHANNELS_LAST and first is not None and self._rank(first) >= 3:
            a = [self.get(first, True), *(self.decode(x) for x in args[1:])]
            if op == "aten.convolution.default" and _ref(args[1]) not in self.pretransposed:
                a[1] = conv_weight_to_mlx(a[1], bool(a[6]))
            self.set(out, ops.OPS[op](*a, **kw), True)
        elif op in ops.CHANNELS_LAST_VARIANT and first in self.channels_last and self._cl_variant_ok(op, args):
            a = [self.get(first, True), *(self.decode(x) for x in args[1:])]
            keep = op != "aten.mean.dim" or bool(a[2] if len(a) > 2 else kw.get("keepdim", False))
            self.set(out, ops.CHANNELS_LAST_VARIANT[op](*a, **kw), keep)
        elif op in ops.ELEMENTWISE and (cl := self._elementwise_channels_last(args)) is not None:
            self.set(out, ops.OPS[op](*(self.decode(x, cl) for x in args), **kw), True)
        else:
            self.set(out, ops.OPS[op](*(self.decode(x) for x in args), **kw), False)

    def _cl_variant_ok(self, op: str, args: list[Any]) -> bool:
        if op == "aten.mean.dim":
            return ops.spatial_reduction(args[1] if len(args) > 1 else None, self._rank(_ref(args[0])))
        return True

    def _elementwise_channels_last(self, args: Sequence[Any]) -> frozenset[str] | None:
        """The refs to read channels-last when an elementwise op can stay channels-last, else None."""
        refs = [r for a in args if (r := _ref(a)) is not None]
        tagged = [r for r in refs if r in self.channels_last]
        if not tagged:
            return None
        rank = self._rank(tagged[0])
        for r in refs:
            v = self.values[r]
            ok = r in self.channels_last or not isinstance(v, mx.array) or v.size == 1 or v.ndim == rank
            if not ok or (r in self.channels_last and v.ndim != rank):
                return None  # e.g. a [W] vector would broadcast along C once channels are last
        return frozenset(r for r in refs if self._rank(r) == rank)


class Program:
    """A loaded program: ``program(inputs) -> outputs`` (lists of ``mx.array`` in the spec's order), compiled."""

    def __init__(self, spec: dict[str, Any], params: dict[str, mx.array]) -> None:
        self.spec = spec
        self.inputs: list[dict[str, Any]] = spec["inputs"]
        self.outputs: list[dict[str, Any]] = spec["outputs"]
        self._names = list(params)
        self._params = [params[n] for n in self._names]
        layouts = spec.get("layouts", {})
        self._pretransposed = frozenset(g for g, t in spec["params"].items() if t in layouts)
        self._compiled = mx.compile(self.forward)

    def forward(self, params: list[mx.array], inputs: list[mx.array]) -> list[mx.array]:
        """Interpret the graph once (``mx.compile`` traces this on the first call per input shape)."""
        frame = _Frame({**dict(zip(self._names, params, strict=True)),
                        **{s["name"]: x for s, x in zip(self.inputs, inputs, strict=True)}},
                       self._pretransposed)  # fmt: skip
        for node in self.spec["nodes"]:
            try:
                frame.step(node)
            except NotImplementedError as e:
                msg = f"{node['op']} ({node['out']}): {e}"
                raise InvalidArgument(msg, reason="UNSUPPORTED_OP_ARGUMENTS", op=node["op"]) from None
        return [frame.get(o["ref"]) for o in self.outputs]

    def __call__(self, inputs: list[mx.array], *, compiled: bool = True) -> list[mx.array]:
        return (self._compiled if compiled else self.forward)(self._params, inputs)


def read_program(model_dir: Path) -> dict[str, Any]:
    """``program.json``, checked for format and version."""
    spec = read_json(Path(model_dir) / PROGRAM_FILE, "program")
    if spec.get("format") != FORMAT or not isinstance(spec.get("version"), int):
        msg = f"{model_dir}/{PROGRAM_FILE} is not an {FORMAT} file"
        raise InvalidArgument(msg, reason="BAD_PROGRAM", path=str(model_dir))
    if spec["version"] > VERSION:
        msg = f"{model_dir} is program format version {spec['version']}; this daemon reads up to {VERSION}: upgrade"
        raise InvalidArgument(msg, reason="PROGRAM_VERSION", version=spec["version"])
    return spec


def load_program(model_dir: Path) -> tuple[Program, str, int]:
    """(program, storage dtype, resident bytes); float weights compute in float32 (the fast CPU dtype)."""
    graphs, dtype, nbytes = load_graphs(model_dir)
    return graphs[""], dtype, nbytes


def load_graphs(model_dir: Path) -> tuple[dict[str, Program], str, int]:
    """({graph name: Program}, storage dtype, resident bytes): one graph named "" for most programs, "encoder"
    and "decoder" (sharing their weights) for an encoder-decoder."""
    model_dir = Path(model_dir)
    spec = read_program(model_dir)
    raw, _ = read_safetensors(model_dir)
    config = read_json(model_dir / "config.json", "program")
    dtype = storage_dtype(raw)
    dequantize_weights(raw, config.get("quantization"))  # a quantized program: dequantize once at load
    graphs = spec["graphs"] if spec.get("kind") == "seq2seq" else {"": spec}
    used = {t for g in graphs.values() for t in g["params"].values()}
    missing = sorted(t for t in used if t not in raw)
    if missing:
        msg = f"{model_dir} lacks {len(missing)} tensor(s) the program reads: {', '.join(missing[:5])}"
        raise InvalidArgument(msg, reason="WEIGHTS_MISMATCH", missing=len(missing))
    tensors = {t: raw[t].astype(mx.float32) if raw[t].dtype in _FLOATS else raw[t] for t in used}
    mx.eval(list(tensors.values()))
    programs = {name: Program(g, {p: tensors[t] for p, t in g["params"].items()}) for name, g in graphs.items()}
    return programs, dtype, sum(a.nbytes for a in tensors.values())
