"""Planning a conversion from tensor metadata alone: names, output dtypes and shapes, quantization, shards.

The plan is complete before any tensor data is read, so a dry run can report it and the writer knows every
file name (``model-0000i-of-0000N.safetensors``) up front.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import torch

from mlxd_daemon.checkpoint import Checkpoint, TensorInfo
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.quantize import (
    QParams,
    QuantSpec,
    choose,
    fit_group,
    layer_params,
    layer_stacks,
    packed_shapes,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

# Tensors that stay float even when quantizing, each with the reason reported in skipped_layers.
# Checked in order on the MLX name; ``layout`` is the arch's DISK_LAYOUT entry (set for conv weights).
KEEP_FLOAT_RULES: tuple[tuple[Any, str], ...] = (
    (lambda name, shape, layout: layout is not None, "convolution weight (stored as {layout})"),
    (lambda name, shape, layout: "norm" in name.lower(), "normalization layer"),
    (lambda name, shape, layout: "position_embedding" in name, "position embedding is kept in float"),
    (lambda name, shape, layout: "class_embedding" in name, "class embedding is kept in float"),
    (lambda name, shape, layout: len(shape) != 2, "not a 2-D Linear/Embedding weight (shape {shape})"),
    (lambda name, shape, layout: not name.endswith(".weight"), "not a layer weight"),
)


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Unit:
    """One source tensor and the output tensor(s) it becomes (two or three when quantized).

    ``candidate``: quantization was considered (the layer is reported); ``note``: why it stayed float, or why
    its group size fell back; ``dequant``: the source is packed and is dequantized with these parameters.
    """

    source: str
    target: str
    dtype: torch.dtype
    quantize: bool
    outputs: tuple[OutTensor, ...]
    src_nbytes: int
    num_parameters: int
    bits: int = 0
    group_size: int = 0
    mode: str = "affine"
    candidate: bool = False
    note: str = ""
    dequant: QParams | None = None

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def params(self) -> QParams | None:
        return QParams(self.bits, self.group_size, self.mode) if self.quantize else None


@dataclass
class Shard:
    file: str
    units: list[Unit] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


@dataclass
class Plan:
    units: list[Unit]
    shards: list[Shard]
    dropped: list[str]
    skipped: list[dict[str, str]]
    layouts: dict[str, str]
    max_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def num_parameters(self) -> int:
        return sum(u.num_parameters for u in self.units)

    def weight_map(self) -> dict[str, str]:
        wm = {o.name: s.file for s in self.shards for u in s.units for o in u.outputs}
        return dict(sorted(wm.items()))

    def estimated_peak_bytes(self) -> int:
        """A shard accumulating, source pages mapped since the last release, one tensor's transient copies."""
        shard = max((s.nbytes for s in self.shards), default=0)
        mapped = min(self.max_bytes, sum(u.src_nbytes for u in self.units))
        # source copy + cast copy; (de)quantization adds float32 staging and round-trip copies.
        worst = max(
            (u.src_nbytes + u.nbytes + (u.num_parameters * 8 if u.quantize or u.dequant else 0) for u in self.units),
            default=0,
        )
        return shard + mapped + worst


def parse_size(size: int | str) -> int:
    """Bytes from ``500MB``, ``2GB`` (decimal), ``2GiB`` (binary) or an int; else InvalidArgument BAD_SIZE."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        unit = m.group(2).upper() if m else ""
        if not m or unit not in _UNITS:
            msg = f"bad size {size!r}: use a number of bytes or units like 500MB, 2GB, 2GiB"
            raise InvalidArgument(msg, reason="BAD_SIZE", size=size)
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        msg = f"bad size {size!r}: must be positive"
        raise InvalidArgument(msg, reason="BAD_SIZE", size=size)
    return value


def keep_float_reason(
    name: str, shape: tuple[int, ...], layout: str | None, group_size: int | None = None
) -> str | None:
    """Why tensor ``name`` is structurally not quantizable (or, given ``group_size``, not at it), else None."""
    for rule, reason in KEEP_FLOAT_RULES:
        if rule(name, shape, layout):
            return reason.format(layout=layout, shape=list(shape))
    if group_size and shape[-1] % group_size:
        return f"input dim {shape[-1]} not divisible by group size {group_size}"
    return None


def make_plan(ckpt: Checkpoint, arch: ModuleType, dtype: torch.dtype, max_bytes: int, quant: QuantSpec | None) -> Plan:
    """Map, type and (optionally) quantize every tensor on paper, then cut the result into shards."""
    layouts: dict[str, str] = dict(getattr(arch, "DISK_LAYOUT", {}))
    units: dict[str, Unit] = {}
    dropped: list[str] = list(getattr(arch, "dropped", ()))  # a sanitizing view drops before planning
    skipped: list[dict[str, str]] = []
    stacks = layer_stacks(t for n in ckpt.tensors if (t := arch.map_weight(n)) is not None) if quant else {}
    for src_name in sorted(ckpt.tensors):
        info = ckpt.tensors[src_name]
        target = arch.map_weight(src_name)
        if target is None:
            dropped.append(src_name)
            continue
        if target in units:
            msg = f"tensors {units[target].source} and {src_name} both map to {target}"
            raise InvalidArgument(msg, reason="DUPLICATE_TENSOR", tensor=target)
        unit, skip = _plan_unit(src_name, target, info, dtype, layouts.get(target), quant, stacks, arch)
        units[target] = unit
        if skip is not None:
            skipped.append(skip)
    if not units:
        msg = f"no {ckpt.model_type} tensors among the {len(dropped)} in {ckpt.path}: wrong checkpoint?"
        raise InvalidArgument(msg, reason="NO_TENSORS", dropped=len(dropped))
    ordered = [units[k] for k in sorted(units)]
    present = {o.name for u in ordered for o in u.outputs}
    return Plan(
        ordered,
        assign_shards(ordered, max_bytes),
        dropped,
        skipped,
        {k: v for k, v in sorted(layouts.items()) if k in present},
        max_bytes,
    )


def _plan_unit(
    src_name: str,
    target: str,
    info: TensorInfo,
    dtype: torch.dtype,
    layout: str | None,
    quant: QuantSpec | None,
    stacks: dict[str, int],
    arch: Any = None,
) -> tuple[Unit, dict[str, str] | None]:
    """One tensor's outputs, and a skipped_layers entry when quantization was asked for but not applied."""
    if not info.dtype.is_floating_point:  # integer ids and masks are kept exactly as they are
        return Unit(
            src_name,
            target,
            info.dtype,
            False,
            (OutTensor(target, info.dtype, info.shape),),
            info.nbytes,
            info.numel,
        ), None
    plain = Unit(src_name, target, dtype, False, (OutTensor(target, dtype, info.shape),), info.nbytes, info.numel)
    # Biases and scalars are not layers: only weights and matrices are quantization candidates.
    if quant is None or not (target.endswith(".weight") or len(info.shape) >= 2):
        return plain, None
    path = target.removesuffix(".weight")
    # An arch may know better what its runtime quantizes (mlx-lm: modules with to_quantized, 3-D experts too).
    reason = getattr(arch, "keep_float_reason", keep_float_reason)(target, info.shape, layout)
    params = None
    if reason is None:
        params, reason = choose(quant, path, stacks, getattr(arch, "quant_params", None))
    note = None
    if params is not None:
        params, note = fit_group(params, (math.prod(info.shape[:-1]), info.shape[-1]))
    if params is None:
        reason = reason or note or ""
        return replace(plain, candidate=True, note=reason), {"name": path, "reason": reason}
    outputs = _quantized_outputs(target, info.shape, dtype, params)
    unit = Unit(src_name, target, dtype, True, outputs, info.nbytes, info.numel, params.bits, params.group_size)
    return replace(unit, mode=params.mode, candidate=True, note=note or ""), None


def assign_shards(units: list[Unit], max_bytes: int) -> list[Shard]:
    """Greedy in name order; a unit over ``max_bytes`` gets a shard of its own; never an empty shard."""
    groups: list[list[Unit]] = []
    size = 0
    for unit in units:
        if not groups or size + unit.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += unit.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    return [Shard(name, group) for name, group in zip(names, groups, strict=True)]


def index_json(plan: Plan) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` content (mlx-lm / transformers layout, weight_map sorted)."""
    return {
        "metadata": {"total_size": plan.total_bytes, "total_parameters": plan.num_parameters},
        "weight_map": plan.weight_map(),
    }


def _quantized_outputs(name: str, shape: tuple[int, ...], dtype: torch.dtype, p: QParams) -> tuple[OutTensor, ...]:
    # mx.quantize packs each row into uint32 words; affine keeps a scale and bias per group in the weight dtype,
    # the MX modes one uint8 (e8m0 / e4m3) scale per group and no bias.
    packed, scales, has_biases = packed_shapes(shape, p)
    base = name.removesuffix(".weight")
    scale_dtype = dtype if has_biases else torch.uint8
    return (
        OutTensor(name, torch.uint32, packed),
        OutTensor(f"{base}.scales", scale_dtype, scales),
        *((OutTensor(f"{base}.biases", dtype, scales),) if has_biases else ()),
    )


def plan_dequantize(
    ckpt: Checkpoint, quantization: dict[str, Any], dtype: torch.dtype, max_bytes: int, layouts: dict[str, str]
) -> Plan:
    """Plan a quantized MLX directory back to float: every ``<p>.weight`` with ``<p>.scales`` becomes one
    ``dtype`` tensor (its scales/biases are consumed); other float tensors are cast, integer ones kept."""
    tensors = ckpt.tensors
    packed = {n.removesuffix(".scales") for n in tensors if n.endswith(".scales")}
    units: list[Unit] = []
    for name in sorted(tensors):
        info = tensors[name]
        prefix = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] in packed:
            continue
        if prefix in packed and info.dtype == torch.uint32:
            p = layer_params(quantization, prefix)
            shape = (*info.shape[:-1], info.shape[-1] * 32 // p.bits)  # [.., out, in]: experts are 3-D
            extra = sum(tensors[f"{prefix}.{k}"].nbytes for k in ("scales", "biases") if f"{prefix}.{k}" in tensors)
            out = OutTensor(name, dtype, shape)
            units.append(Unit(name, name, dtype, False, (out,), info.nbytes + extra, out.nbytes // dtype.itemsize,
                              dequant=p))  # fmt: skip
        else:
            keep = dtype if info.dtype.is_floating_point else info.dtype
            units.append(Unit(name, name, keep, False, (OutTensor(name, keep, info.shape),), info.nbytes, info.numel))
    present = {u.target for u in units}
    return Plan(
        units, assign_shards(units, max_bytes), [], [], {k: v for k, v in layouts.items() if k in present}, max_bytes
    )
