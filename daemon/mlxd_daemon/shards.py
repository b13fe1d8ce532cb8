"""Planning a conversion from tensor metadata alone: names, output dtypes and shapes, quantization, shards.

The plan is complete before any tensor data is read, so a dry run can report it and the writer knows every
file name (``model-0000i-of-0000N.safetensors``) up front.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from mlxd_daemon.checkpoint import Checkpoint, TensorInfo
from mlxd_daemon.errors import InvalidArgument, Unsupported

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)

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
    """One source tensor and the output tensor(s) it becomes (three when quantized)."""

    source: str
    target: str
    dtype: torch.dtype
    quantize: bool
    outputs: tuple[OutTensor, ...]
    src_nbytes: int
    num_parameters: int
    bits: int = 0
    group_size: int = 0

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


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
        # source copy + cast copy, and for quantization a float32 staging copy plus MLX's outputs.
        worst = max(
            (u.src_nbytes + u.nbytes + (u.num_parameters * 4 if u.quantize else 0) for u in self.units),
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


def check_quantization(bits: int, group_size: int, mode: str) -> dict[str, Any]:
    """Validate quantization flags and return the config.json ``quantization`` entry."""
    if mode != "affine":
        msg = f"quantization mode {mode!r} is not supported by convert: use affine"
        raise Unsupported(msg, reason="UNSUPPORTED_QUANT_MODE", mode=mode)
    if bits not in QUANT_BITS:
        msg = f"bad q_bits {bits}: choose one of {', '.join(map(str, QUANT_BITS))}"
        raise InvalidArgument(msg, reason="BAD_QUANT_BITS", bits=bits)
    if group_size not in QUANT_GROUP_SIZES:
        msg = f"bad q_group_size {group_size}: choose one of {', '.join(map(str, QUANT_GROUP_SIZES))}"
        raise InvalidArgument(msg, reason="BAD_QUANT_GROUP_SIZE", group_size=group_size)
    return {"group_size": group_size, "bits": bits, "mode": mode}


def keep_float_reason(name: str, shape: tuple[int, ...], layout: str | None, group_size: int) -> str | None:
    """Why tensor ``name`` is not quantized, or None when it will be."""
    for rule, reason in KEEP_FLOAT_RULES:
        if rule(name, shape, layout):
            return reason.format(layout=layout, shape=list(shape))
    if shape[-1] % group_size:
        return f"input dim {shape[-1]} not divisible by group size {group_size}"
    return None


def make_plan(
    ckpt: Checkpoint, arch: ModuleType, dtype: torch.dtype, max_bytes: int, quant: dict[str, Any] | None
) -> Plan:
    """Map, type and (optionally) quantize every tensor on paper, then cut the result into shards."""
    layouts: dict[str, str] = dict(getattr(arch, "DISK_LAYOUT", {}))
    units: dict[str, Unit] = {}
    dropped: list[str] = []
    skipped: list[dict[str, str]] = []
    for src_name in sorted(ckpt.tensors):
        info = ckpt.tensors[src_name]
        target = arch.map_weight(src_name)
        if target is None:
            dropped.append(src_name)
            continue
        if target in units:
            msg = f"tensors {units[target].source} and {src_name} both map to {target}"
            raise InvalidArgument(msg, reason="DUPLICATE_TENSOR", tensor=target)
        unit, skip = _plan_unit(src_name, target, info, dtype, layouts.get(target), quant)
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
    quant: dict[str, Any] | None,
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
    reason = keep_float_reason(target, info.shape, layout, quant["group_size"])
    if reason is not None:
        return plain, {"name": target.removesuffix(".weight"), "reason": reason}
    outputs = _quantized_outputs(target, info.shape, dtype, quant)
    return Unit(
        src_name, target, dtype, True, outputs, info.nbytes, info.numel, quant["bits"], quant["group_size"]
    ), None


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


def _quantized_outputs(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, quant: dict[str, Any]
) -> tuple[OutTensor, ...]:
    # mx.quantize packs each row into uint32 words and keeps one scale and bias per group, in the weight dtype
    rows, cols = shape
    base = name.removesuffix(".weight")
    groups = cols // quant["group_size"]
    return (
        OutTensor(name, torch.uint32, (rows, cols * quant["bits"] // 32)),
        OutTensor(f"{base}.scales", dtype, (rows, groups)),
        OutTensor(f"{base}.biases", dtype, (rows, groups)),
    )
