"""Writing a planned conversion: tensors shard by shard (cast, quantize or dequantize one at a time), config.json
and the manifest, into the temp dir ``staging.staged`` publishes. Used by every entry point in ``convert``.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import struct
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch

import mlxd_daemon
from mlxd_daemon.checkpoint import Checkpoint
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.malloc import pin_mmap_threshold
from mlxd_daemon.progress import Reporter
from mlxd_daemon.quantize import QParams, QuantSpec, config_entry
from mlxd_daemon.shards import DTYPE_NAMES, Plan, Shard, Unit, index_json
from mlxd_daemon.torch_mlx import to_mlx as _to_mlx
from mlxd_daemon.torch_mlx import to_torch as _to_torch

FLOAT16_MAX = 65504.0
RELEASE_MAPPED_BYTES = 256 << 20  # unmap the source after this much is read: mapped pages count as RSS
CHUNK_BYTES = 64 << 20  # plain casts of bigger tensors stream in row blocks of about this size
ERROR_SAMPLE_ROWS = 64  # rows of a weight used to measure its quantization error
MANIFEST = "mlxd_manifest.json"
Bad = tuple[int, int, list[int]]  # a tensor's NaN count, Inf count, index of its first non-finite value
_HASH_LIMIT = 64 << 20  # sha256 only for small files; hashing multi-GB weights would double the run time.
_MANIFEST_RESULT_KEYS = (
    "quantization", "skipped_layers", "layer_reports", "bits_per_weight", "bytes_before", "non_finite"
)  # fmt: skip


def write_weights(
    ckpt: Checkpoint,
    plan: Plan,
    out: Path,
    reporter: Reporter,
    stage: str,
    precomputed: dict[str, tuple[dict[str, torch.Tensor], float | None]] | None = None,
    strict: bool = False,
    non_finite: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Stream tensors shard by shard; with a float16 target, scan everything before refusing an overflow.

    Every floating source tensor is checked for NaN/Inf on the blocks already read; each one that has any is
    appended to ``non_finite`` ({name, nan, inf, first_index}). With ``strict`` those refuse the conversion
    (InvalidArgument NON_FINITE_WEIGHTS, after scanning the rest), like a float16 overflow does.
    ``precomputed`` (calibrated quantization) maps a unit's target to its final output tensors and weight error;
    those units are written as given (and dropped from the dict) instead of converted from the source.
    Returns each quantized layer's relative reconstruction error ||W - dequant(q(W))|| / ||W||.
    """
    pin_mmap_threshold()  # so each freed tensor is returned to the system
    reporter.begin(stage, len(plan.units), plan.total_bytes)
    done = done_bytes = mapped = 0
    overflow: list[dict[str, Any]] = []
    found = non_finite if non_finite is not None else []
    errors: dict[str, float] = {}

    def doomed() -> bool:  # the output will be refused: keep scanning, stop writing
        return bool(overflow) or (strict and bool(found))

    for shard in plan.shards:
        # Each tensor goes to disk as soon as it is converted: memory holds one tensor, not one shard.
        with ShardFile(out / shard.file, shard, plan.layouts) as writer:
            for unit in shard.units:
                if precomputed and unit.target in precomputed and not doomed():
                    given, error = precomputed.pop(unit.target)
                    for o in unit.outputs:
                        writer.write(o.name, given[o.name])
                    if error is not None:
                        errors[unit.target.removesuffix(".weight")] = error
                    done, done_bytes = done + 1, done_bytes + unit.nbytes
                    reporter.report(done, done_bytes, unit.target)
                    continue
                if _streamable(ckpt, unit):  # a big tensor: row blocks, never the whole tensor in memory
                    peaks: list[float] = []
                    error = _stream_unit(ckpt, unit, writer, peaks, found, write=not doomed(), strict=strict)
                    if peaks:
                        overflow.append({"name": unit.source, "max_abs": max(peaks)})
                    elif error is not None:
                        errors[unit.target.removesuffix(".weight")] = error
                    done, done_bytes = done + 1, done_bytes + unit.nbytes
                    reporter.report(done, done_bytes, unit.target)
                    continue
                source = ckpt.get(unit.source)
                if unit.dequant is not None:
                    source = _dequantize_unit(ckpt, unit, unit.dequant, source)
                peak, bad = _scan(source, unit.dtype)
                if peak is not None:
                    overflow.append({"name": unit.source, "max_abs": peak})  # doomed output: keep scanning only
                if bad is not None:
                    found.append(_non_finite_entry(unit, bad))
                if not doomed():
                    converted, error = _convert_unit(source, unit)
                    for name, tensor in converted.items():
                        writer.write(name, tensor)
                    del converted
                    if error is not None:
                        errors[unit.target.removesuffix(".weight")] = error
                del source
                done, done_bytes, mapped = done + 1, done_bytes + unit.nbytes, mapped + unit.src_nbytes
                if mapped >= min(plan.max_bytes, RELEASE_MAPPED_BYTES):
                    # Read pages of mapped source files count as resident until unmapped: cap them too.
                    ckpt.release()
                    mapped = 0
                reporter.report(done, done_bytes, unit.target)
            writer.complete = not doomed()
    ckpt.release()
    if overflow:
        worst = ", ".join(f"{o['name']} (max |x| {o['max_abs']:.6g})" for o in overflow[:10])
        msg = (
            f"{len(overflow)} tensor(s) exceed the float16 range ±{FLOAT16_MAX:g} and would become inf: "
            f"{worst}; choose bfloat16 or float32"
        )
        raise InvalidArgument(
            msg,
            reason="FLOAT16_OVERFLOW",
            tensors=",".join(o["name"] for o in overflow),
            float16_overflow=json.dumps(overflow),
        )
    if strict and found:
        listed = ", ".join(f"{b['name']} ({b['nan']} NaN, {b['inf']} Inf, first at {b['first_index']})"
                           for b in found[:10])  # fmt: skip
        msg = (
            f"{len(found)} tensor(s) hold NaN or Inf values: {listed}; the checkpoint is damaged "
            "(convert without --strict to write it anyway, with the tensors listed in the result)"
        )
        raise InvalidArgument(
            msg, reason="NON_FINITE_WEIGHTS", tensors=",".join(b["name"] for b in found), non_finite=json.dumps(found)
        )
    if len(plan.shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json(plan), indent=2) + "\n")
    reporter.end(f"wrote {len(plan.shards)} shard(s)")
    return errors


def _streamable(ckpt: Checkpoint, unit: Unit) -> bool:
    """Large safetensors matrices go through in row blocks (peak memory: one block). Quantization groups run
    along rows, so quantizing a block of whole rows gives exactly the rows of quantizing the whole matrix."""
    info = ckpt.tensors[unit.source]
    return (unit.dequant is None and ckpt.weight_format == "safetensors" and len(info.shape) == 2
            and unit.src_nbytes > CHUNK_BYTES)  # fmt: skip


def _stream_unit(
    ckpt: Checkpoint,
    unit: Unit,
    writer: ShardFile,
    peaks: list[float],
    found: list[dict[str, Any]],
    write: bool,
    strict: bool,
) -> float | None:
    """Cast (or quantize) ``unit`` block by block straight into ``writer``; returns the quantization error
    (over a row sample of every block). A float16 overflow is added to ``peaks`` and stops the writing; NaN/Inf
    are counted over all blocks into one ``found`` entry (and stop the writing when ``strict``)."""
    side: list[list[torch.Tensor]] = [[] for _ in unit.outputs[1:]]  # scales/biases: small, written after
    err2 = ref2 = 0.0
    row = 0
    bad: Bad | None = None
    for part in ckpt.iter_rows(unit.source, CHUNK_BYTES):
        peak, part_bad = _scan(part, unit.dtype, row)
        row += part.shape[0]
        if peak is not None:
            peaks.append(peak)
        if part_bad is not None:
            bad = part_bad if bad is None else (bad[0] + part_bad[0], bad[1] + part_bad[1], bad[2])
        if not write or peaks or (strict and bad):
            continue
        cast = part.to(unit.dtype)
        if not unit.quantize:
            writer.write_part(unit.target, cast)
            continue
        w = _to_mlx(cast)
        packed = mx.quantize(w, group_size=unit.group_size, bits=unit.bits, mode=unit.mode)
        mx.eval(packed)
        e2, r2 = _squared_error(w, packed, unit, rows=max(1, ERROR_SAMPLE_ROWS * part.shape[0] // 4096))
        err2, ref2 = err2 + e2, ref2 + r2
        tensors = [_to_torch(a) for a in packed]
        writer.write_part(unit.outputs[0].name, tensors[0])
        for pieces, t in zip(side, tensors[1:], strict=True):
            pieces.append(t)
        del w, packed, tensors
        mx.clear_cache()
    if bad is not None:
        found.append(_non_finite_entry(unit, bad))
    if write and not peaks and not (strict and bad):
        for out, pieces in zip(unit.outputs[1:], side, strict=True):
            writer.write(out.name, torch.cat(pieces))
    return math.sqrt(err2 / max(ref2, 1e-60)) if unit.quantize and not peaks else None


def _scan(t: torch.Tensor, out_dtype: torch.dtype, row0: int = 0) -> tuple[float | None, Bad | None]:
    """One min/max pass over a floating tensor (``row0``: its first row in the whole tensor). Returns the largest
    finite |x| when casting to ``out_dtype`` float16 would overflow (else None), and (NaN count, Inf count, index
    of the first) when it holds non-finite values (else None); both counted only in that rare case."""
    if not t.is_floating_point() or t.numel() == 0:
        return None, None
    lo, hi = (float(x) for x in torch.aminmax(t))  # no copy of the tensor in the common, all-finite case
    bad = None
    if not (math.isfinite(lo) and math.isfinite(hi)):  # aminmax propagates NaN, so this sees every NaN/Inf
        finite = torch.isfinite(t)
        nan = int(torch.isnan(t).sum())
        first = int((~finite).reshape(-1).nonzero()[0, 0])
        index = [int(i) for i in np.unravel_index(first, tuple(t.shape))]
        index[0] += row0
        bad = (nan, int(finite.numel() - finite.sum()) - nan, index)
    if out_dtype != torch.float16 or t.dtype == torch.float16:
        return None, bad
    peak = max(-lo, hi)
    if not math.isfinite(peak):  # inf/nan already there are not an overflow of ours: look past them
        peak = float(t.abs().masked_fill_(~torch.isfinite(t), 0).max())
    return (peak if peak > FLOAT16_MAX else None), bad


def _non_finite_entry(unit: Unit, bad: Bad) -> dict[str, Any]:
    """The report of one tensor with NaN/Inf; a quantized one names its first bad quantization group too."""
    nan, inf, index = bad
    entry: dict[str, Any] = {"name": unit.source, "nan": nan, "inf": inf, "first_index": index}
    if unit.quantize:
        entry["note"] = (
            f"quantized {unit.bits}-bit {unit.mode} g{unit.group_size}: group {index[-1] // unit.group_size} of row "
            f"{index[0]} holds it, so that group's scale is computed from NaN/Inf and all its values are wrong"
        )
    return entry


def _convert_unit(source: torch.Tensor, unit: Unit) -> tuple[dict[str, torch.Tensor], float | None]:
    """Cast (and optionally quantize) one tensor into tensors that own their memory; with quantization, also
    the relative reconstruction error of the cast weight."""
    out = source.to(unit.dtype)
    if out.data_ptr() == source.data_ptr() and not unit.quantize:
        out = out.clone()  # same dtype: still a view of the mapped source file
    out = out.contiguous()
    if not unit.quantize:
        return {unit.target: out}, None
    w = _to_mlx(out)
    packed = mx.quantize(w, group_size=unit.group_size, bits=unit.bits, mode=unit.mode)
    mx.eval(packed)
    error = _relative_error(w, packed, unit)
    names = [o.name for o in unit.outputs]
    result = dict(zip(names, (_to_torch(a) for a in packed), strict=True))
    del w, packed
    mx.clear_cache()  # MLX keeps freed buffers for reuse: give them back, a model's worth would pile up
    return result, error


def _relative_error(w: mx.array, packed: tuple[mx.array, ...], unit: Unit) -> float:
    """||W - dequant(q(W))|| / ||W||, exact up to ``ERROR_SAMPLE_ROWS`` rows, else over evenly spaced rows
    (groups run along rows, so a row sample is an unbiased estimate; dequantizing everything on the CPU
    would cost more than the quantization itself)."""
    err2, ref2 = _squared_error(w, packed, unit, rows=ERROR_SAMPLE_ROWS)
    return math.sqrt(err2 / max(ref2, 1e-60))


def _squared_error(w: mx.array, packed: tuple[mx.array, ...], unit: Unit, rows: int) -> tuple[float, float]:
    """(||W - dequant(q(W))||², ||W||²) over at most ``rows`` evenly spaced rows."""
    if w.ndim > 1 and w.shape[0] > rows:
        idx = mx.array(np.linspace(0, w.shape[0] - 1, rows).astype(np.int32))
        w, packed = w[idx], tuple(a[idx] for a in packed)
    biases = packed[2] if len(packed) > 2 else None  # the microscaling modes have no biases
    restored = mx.dequantize(packed[0], packed[1], biases, group_size=unit.group_size, bits=unit.bits,
                             mode=unit.mode, dtype=mx.float32)  # fmt: skip
    w32 = w.astype(mx.float32)
    err2, ref2 = mx.sum(mx.square(w32 - restored)), mx.sum(mx.square(w32))
    mx.eval(err2, ref2)
    return float(np.asarray(err2)), float(np.asarray(ref2))


def _dequantize_unit(ckpt: Checkpoint, unit: Unit, p: QParams, packed: torch.Tensor) -> torch.Tensor:
    """A packed ``<p>.weight`` and its scales/biases -> the float32 weight (cast to the target afterwards)."""
    prefix = unit.source.removesuffix(".weight")
    scales = ckpt.get(f"{prefix}.scales")
    biases = ckpt.get(f"{prefix}.biases") if f"{prefix}.biases" in ckpt.tensors else None
    w = mx.dequantize(
        _to_mlx(packed),
        _to_mlx(scales),
        None if biases is None else _to_mlx(biases),
        group_size=p.group_size,
        bits=p.bits,
        mode=p.mode,
        dtype=mx.float32,
    )
    return _to_torch(w)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.uint32: "U32", torch.uint16: "U16", torch.uint64: "U64", torch.bool: "BOOL"}  # fmt: skip


class ShardFile:
    """A safetensors file written tensor by tensor, in plan order. The header is computed from the plan (names,
    dtypes, shapes) before any data, so the shard never has to be gathered in memory (mlx-lm#876)."""

    def __init__(self, path: Path, shard: Shard, layouts: dict[str, str]) -> None:
        self.expected = [o for u in shard.units for o in u.outputs]
        names = {o.name for o in self.expected}
        metadata = {"format": "mlx", "mlxd.layout": json.dumps({k: v for k, v in layouts.items() if k in names},
                                                               sort_keys=True)}  # fmt: skip
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for o in self.expected:
            header[o.name] = {"dtype": _ST_DTYPES[o.dtype], "shape": list(o.shape),
                              "data_offsets": [offset, offset + o.nbytes]}  # fmt: skip
            offset += o.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path, self.next, self.complete = path, 0, True
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in __exit__); big writes need no buffer
        _write_all(self.file, memoryview(struct.pack("<Q", len(blob)) + blob))
        # Disk writes overlap the next tensor's read and conversion; at most 2 tensors wait (bounded memory).
        self._pending: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._rows = 0  # rows of the current tensor already queued (write_part)
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (tensor := self._pending.get()) is not None:
            try:
                if self._error is None:
                    _write_all(self.file, tensor.reshape(-1).view(torch.uint8).numpy().data)
            except BaseException as e:  # reported by write() / __exit__ on the caller's thread
                self._error = e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the one the plan said comes next, with its dtype and shape."""
        want = self.expected[self.next]
        if tuple(tensor.shape) != want.shape:
            msg = f"writer expected {want.name} {want.shape}, got {name} {tuple(tensor.shape)}"
            raise RuntimeError(msg)
        self.write_part(name, tensor)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Append the next rows of the planned tensor ``name``; it is complete once all its rows arrived."""
        want = self.expected[self.next]
        if (name, part.dtype, tuple(part.shape[1:])) != (want.name, want.dtype, want.shape[1:]) or (
            self._rows + (part.shape[0] if part.ndim else 1) > (want.shape[0] if want.shape else 1)
        ):
            got = f"{name} {part.dtype} {tuple(part.shape)}"
            msg = f"writer expected {want.name} {want.dtype} {want.shape} (row {self._rows}), got {got}"
            raise RuntimeError(msg)
        if self._error is not None:
            raise self._error
        self._pending.put(part.contiguous())
        self._rows += part.shape[0] if part.ndim else 1
        if self._rows == (want.shape[0] if want.shape else 1):
            self.next, self._rows = self.next + 1, 0

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._pending.put(None)
        self._thread.join()
        self.file.close()
        if exc_type is None and self._error is not None:
            raise self._error
        if exc_type is None and self.complete and self.next != len(self.expected):
            msg = f"{self.path.name}: wrote {self.next} of {len(self.expected)} planned tensors"
            raise RuntimeError(msg)


def _write_all(file: Any, data: memoryview) -> None:
    """An unbuffered write may stop short (a file size limit, a filling disk): write the rest, so the shortage
    surfaces as its OSError (EFBIG, ENOSPC) instead of a silently truncated shard."""
    while data:
        data = data[file.write(data) :]


def write_config(config: dict[str, Any], spec: QuantSpec | None, plan: Plan, out: Path) -> None:
    """config.json with mlx-lm's ``quantization`` (defaults + per-layer entries that differ), also copied to
    ``quantization_config`` (the key transformers-style loaders look for); float layers are absent."""
    config = dict(config)
    if spec is not None:
        layers = {u.target.removesuffix(".weight"): p for u in plan.units if (p := u.params) is not None}
        entry = config_entry(spec.default, layers)
        config["quantization"] = entry
        config["quantization_config"] = dict(entry)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_manifest(ckpt: Checkpoint, plan: Plan, dtype: torch.dtype, result: dict[str, Any], out: Path) -> None:
    copied = result["copied_files"]
    names = ["config.json", *([ckpt.index_file] if ckpt.index_file else []), *ckpt.weight_files, *copied]
    files = []
    for name in names:
        path = ckpt.path / name
        entry: dict[str, Any] = {"name": name, "bytes": path.stat().st_size}
        if name not in ckpt.weight_files and entry["bytes"] <= _HASH_LIMIT:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        files.append(entry)
    import safetensors

    manifest = {
        "mlxd_version": mlxd_daemon.__version__,
        "versions": {
            "mlx": getattr(mx, "__version__", ""),
            "torch": torch.__version__,
            "safetensors": getattr(safetensors, "__version__", ""),
        },
        # hub: the Hugging Face Hub id, revision and commit the source snapshot came from (None for a directory)
        "source": {
            "path": str(ckpt.path.resolve()),
            "weight_format": ckpt.weight_format,
            "files": files,
            "hub": result.get("hub"),
        },
        "model_type": ckpt.model_type,
        "dtype": DTYPE_NAMES[dtype],
        "tensor_dtypes": result.get("tensor_dtypes", {}),
        "layouts": plan.layouts,
        "dropped_tensors": plan.dropped,
        **{k: result[k] for k in _MANIFEST_RESULT_KEYS},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
