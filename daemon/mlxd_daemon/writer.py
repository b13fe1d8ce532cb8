"""Writing a planned conversion's weights: every tensor in row blocks through a small pool of threads, into the
temp dir ``staging.staged`` publishes (config.json and the manifest: ``manifest``). Used by every entry point in
``convert`` and by the diffusion pipelines.

The pipeline is bounded: at most ``DEPTH`` blocks are in flight, each at most ``BLOCK_BYTES`` (times
``QUANTIZED_BLOCK_SCALE`` when quantized) read and as much written. The main thread walks the plan in order and
submits one task per block; a task reads its rows by position into its thread's reused buffer (``blockio``),
scans them for NaN/Inf and float16 overflow, casts them with torch or quantizes them (``affine_kernel``: MLX's
affine quantization byte for byte, vectorised; other modes, and blocks holding NaN/Inf, through ``mx.quantize``
on the thread's own MLX stream) and writes the result at its planned offset. So the next blocks are read and
converted while earlier ones are written, on every core. The main thread takes the results back in plan order:
per-tensor NaN/Inf, overflow, quantization error, progress and cancellation. Quantization groups run along rows,
so a block of whole rows quantizes exactly as the whole matrix.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch

from mlxd_daemon.blockio import Buffers, Flusher, ShardFile, SourceFiles
from mlxd_daemon.checkpoint import Checkpoint
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.malloc import pin_mmap_threshold
from mlxd_daemon.progress import Reporter
from mlxd_daemon.quantize import QParams
from mlxd_daemon.shards import Plan, Unit, index_json
from mlxd_daemon.torch_mlx import to_mlx as _to_mlx
from mlxd_daemon.torch_mlx import to_torch as _to_torch

FLOAT16_MAX = 65504.0
RELEASE_MAPPED_BYTES = 256 << 20  # unmap the source after this much is read: mapped pages count as RSS
# A task reads (and writes) at most about this much: whole rows of one tensor. Small enough that a cast block is
# still in the CPU cache when written: pwrite from a cache-cold 16 MB buffer took ~3x the CPU of one from a 4 MB
# buffer, and Llama-1B bf16 -> float16 converted in 5.7 s with 4 MB blocks vs 7.1 s with 16 MB (2026-12-04).
BLOCK_BYTES = 4 << 20
# Quantized blocks are this many times larger: they are bound by the quantize kernel, not the copies, and each
# block pays a fixed cost for its error sample (2 MB blocks: 2.4 thread-s of error sampling vs 0.8 at 16 MB).
QUANTIZED_BLOCK_SCALE = 4
WORKERS = max(1, min(4, os.cpu_count() or 1))  # block tasks run in parallel; each holds one block in, one out
DEPTH = WORKERS + 2  # blocks in flight: every worker busy while the main thread takes a result back
ERROR_SAMPLE_ROWS = 64  # rows of a weight used to measure its quantization error
PHASES = ("read", "scan", "convert", "error", "write")  # per-block thread-seconds, summed (see write_weights)
Bad = tuple[int, int, list[int]]  # a tensor's NaN count, Inf count, index of its first non-finite value
_buffers = Buffers()


@dataclass
class _Block:
    """What one block task reports back: its scan, its share of the quantization error, its phase times."""

    peak: float | None
    bad: Bad | None
    err2: float = 0.0
    ref2: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Tensor:
    """One unit while its blocks are in flight: what its blocks found so far."""

    unit: Unit
    blocks: int
    peaks: list[float] = field(default_factory=list)
    bad: Bad | None = None
    err2: float = 0.0
    ref2: float = 0.0
    error: float | None = None  # given by calibration


def write_weights(
    ckpt: Checkpoint,
    plan: Plan,
    out: Path,
    reporter: Reporter,
    stage: str,
    precomputed: dict[str, tuple[dict[str, torch.Tensor], float | None]] | None = None,
    strict: bool = False,
    non_finite: list[dict[str, Any]] | None = None,
    phases: dict[str, float] | None = None,
) -> dict[str, float]:
    """Stream tensors in blocks (see the module doc); with a float16 target, scan everything before refusing an
    overflow.

    Every floating source tensor is checked for NaN/Inf on the blocks read; each one that has any is appended to
    ``non_finite`` ({name, nan, inf, first_index}). With ``strict`` those refuse the conversion (InvalidArgument
    NON_FINITE_WEIGHTS, after scanning the rest), like a float16 overflow does.
    ``precomputed`` (calibrated quantization) maps a unit's target to its final output tensors and weight error;
    those units are written as given (and dropped from the dict) instead of converted from the source.
    ``phases`` (optional) receives the thread-seconds spent per phase (``PHASES``) over all blocks.
    Returns each quantized layer's relative reconstruction error ||W - dequant(q(W))|| / ||W||.
    """
    pin_mmap_threshold()  # so each freed tensor is returned to the system
    reporter.begin(stage, len(plan.units), plan.total_bytes)
    run = _Run(ckpt, strict, non_finite if non_finite is not None else [], reporter, phases)
    # Leaving the block stops the workers first, then closes the shard files, then the source files.
    inflight: deque[tuple[Future[_Block], _Tensor]] = deque()
    with contextlib.closing(run.files), _shard_files(plan, out, run) as files, _pool(inflight) as pool:
        for shard, writer in zip(plan.shards, files, strict=True):
            for unit in shard.units:
                tasks, error = _tasks(ckpt, unit, writer, run, precomputed)
                state = _Tensor(unit, len(tasks), error=error)
                for task in tasks:
                    inflight.append((pool.submit(task), state))
                    while len(inflight) >= DEPTH:
                        run.absorb(*_result(inflight.popleft()))
                run.mapped += 0 if ckpt.tensors[unit.source].offset is not None else unit.src_nbytes
                if run.mapped >= min(plan.max_bytes, RELEASE_MAPPED_BYTES):
                    # Read pages of mapped source files count as resident until unmapped: cap them too.
                    ckpt.release()
                    run.mapped = 0
        while inflight:
            run.absorb(*_result(inflight.popleft()))
    ckpt.release()
    run.raise_refusal()
    if len(plan.shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json(plan), indent=2) + "\n")
    reporter.end(f"wrote {len(plan.shards)} shard(s)")
    return run.errors


def _result(item: tuple[Future[_Block], _Tensor]) -> tuple[_Block, _Tensor]:
    return item[0].result(), item[1]


class _Run:
    """The main thread's bookkeeping: what the scans found, the errors, progress; ``doomed`` (the output will be
    refused: keep scanning, stop converting) is read by the block tasks."""

    def __init__(self, ckpt: Checkpoint, strict: bool, found: list[dict[str, Any]], reporter: Reporter,
                 phases: dict[str, float] | None) -> None:  # fmt: skip
        self.ckpt, self.strict, self.found, self.reporter = ckpt, strict, found, reporter
        self.phases = phases if phases is not None else {}
        self.overflow: list[dict[str, Any]] = []
        self.errors: dict[str, float] = {}
        self.done = self.done_bytes = self.mapped = 0
        self.doomed = False
        self.files = SourceFiles()

    def absorb(self, block: _Block, t: _Tensor) -> None:
        """One block's result (in plan order); the last block of a tensor settles the tensor."""
        for k, v in block.seconds.items():
            self.phases[k] = self.phases.get(k, 0.0) + v
        if block.peak is not None:
            t.peaks.append(block.peak)
        if block.bad is not None:
            t.bad = block.bad if t.bad is None else (t.bad[0] + block.bad[0], t.bad[1] + block.bad[1], t.bad[2])
        t.err2, t.ref2 = t.err2 + block.err2, t.ref2 + block.ref2
        t.blocks -= 1
        if t.blocks:
            return
        unit = t.unit
        if t.peaks:
            self.overflow.append({"name": unit.source, "max_abs": max(t.peaks)})  # doomed output: scan on
        if t.bad is not None:
            self.found.append(_non_finite_entry(unit, t.bad))
        self.doomed = bool(self.overflow) or (self.strict and bool(self.found))
        if t.error is not None:
            self.errors[unit.target.removesuffix(".weight")] = t.error
        elif unit.quantize and not t.peaks:
            self.errors[unit.target.removesuffix(".weight")] = math.sqrt(t.err2 / max(t.ref2, 1e-60))
        self.done, self.done_bytes = self.done + 1, self.done_bytes + unit.nbytes
        self.reporter.report(self.done, self.done_bytes, unit.target)

    def raise_refusal(self) -> None:
        """A float16 overflow, or NaN/Inf with ``strict``: InvalidArgument naming the tensors."""
        if self.overflow:
            worst = ", ".join(f"{o['name']} (max |x| {o['max_abs']:.6g})" for o in self.overflow[:10])
            msg = (
                f"{len(self.overflow)} tensor(s) exceed the float16 range ±{FLOAT16_MAX:g} and would become inf: "
                f"{worst}; choose bfloat16 or float32"
            )
            raise InvalidArgument(
                msg,
                reason="FLOAT16_OVERFLOW",
                tensors=",".join(o["name"] for o in self.overflow),
                float16_overflow=json.dumps(self.overflow),
            )
        if self.strict and self.found:
            listed = ", ".join(f"{b['name']} ({b['nan']} NaN, {b['inf']} Inf, first at {b['first_index']})"
                               for b in self.found[:10])  # fmt: skip
            msg = (
                f"{len(self.found)} tensor(s) hold NaN or Inf values: {listed}; the checkpoint is damaged "
                "(convert without --strict to write it anyway, with the tensors listed in the result)"
            )
            raise InvalidArgument(msg, reason="NON_FINITE_WEIGHTS", tensors=",".join(b["name"] for b in self.found),
                                  non_finite=json.dumps(self.found))  # fmt: skip


@contextlib.contextmanager
def _shard_files(plan: Plan, out: Path, run: _Run) -> Iterator[list[ShardFile]]:
    """Every shard file of the plan, open (headers written) for the whole run; each must be complete at the end
    unless the output is refused or an error stopped the run."""
    files: list[ShardFile] = []
    flusher = Flusher()
    try:
        for shard in plan.shards:
            files.append(ShardFile(out / shard.file, shard, plan.layouts, flusher))
        yield files
    except BaseException:
        for f in files:
            f.complete = False
        raise
    finally:
        flusher.close()
        for f in files:
            f.complete = f.complete and not run.doomed
            f.close()


@contextlib.contextmanager
def _pool(inflight: deque[tuple[Future[_Block], _Tensor]]) -> Iterator[ThreadPoolExecutor]:
    """The block workers, with torch single-threaded inside each (the workers are the parallelism) and MLX
    allowed to keep a few blocks' buffers for reuse; both restored afterwards. Leaving cancels the blocks not
    started and waits for the running ones (an error or a cancel: nothing writes after the files are closed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = mx.set_cache_limit(2 * WORKERS * BLOCK_BYTES * QUANTIZED_BLOCK_SCALE)
    try:
        yield _workers()
    finally:
        for future, _ in inflight:
            future.cancel()
        wait([f for f, _ in inflight])
        torch.set_num_threads(threads)
        mx.set_cache_limit(cache)
        mx.clear_cache()


@functools.cache
def _workers() -> ThreadPoolExecutor:
    # One pool per process: each thread that runs MLX gets its own stream (and stream thread), kept for reuse.
    return ThreadPoolExecutor(WORKERS, thread_name_prefix="convert-block")


def _tasks(
    ckpt: Checkpoint,
    unit: Unit,
    writer: ShardFile,
    run: _Run,
    precomputed: dict[str, tuple[dict[str, torch.Tensor], float | None]] | None,
) -> tuple[list[Callable[[], _Block]], float | None]:
    """One callable per block of ``unit`` (and the calibrated error when it was precomputed): rows read by
    position (a safetensors tensor, also one an mlx-lm sanitize left untouched), else row views of the tensor
    read (or evaluated, or dequantized) here on the main thread, once."""
    if precomputed and unit.target in precomputed and not run.doomed:
        given, error = precomputed.pop(unit.target)
        return [lambda: _write_given(writer, unit, given)], error
    info = ckpt.tensors[unit.source]
    shape = info.shape
    rows = shape[0] if shape else 1
    row_elems = math.prod(shape[1:])
    row_bytes = max(1, row_elems * max(info.dtype.itemsize, unit.dtype.itemsize))
    step = max(1, BLOCK_BYTES * (QUANTIZED_BLOCK_SCALE if unit.quantize else 1) // row_bytes)
    spans = [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]
    rows_2d = max(1, math.prod(shape[:-1]))
    per_row_2d = rows_2d // max(rows, 1)

    def sample(a: int, b: int) -> int:  # about ERROR_SAMPLE_ROWS evenly spread over the whole tensor
        if rows_2d <= ERROR_SAMPLE_ROWS:
            return ERROR_SAMPLE_ROWS
        return max(1, round(ERROR_SAMPLE_ROWS * (b - a) * per_row_2d / rows_2d))

    if info.offset is not None and unit.dequant is None:
        path, offset, in_row = ckpt.path / info.file, info.offset, row_elems * info.dtype.itemsize

        def reader(a: int, b: int) -> Callable[[], torch.Tensor]:
            return lambda: _read_rows(run.files, path, offset + a * in_row, info.dtype, (b - a, *shape[1:]), shape)

        return [_block_task(run, unit, writer, a, reader(a, b), sample(a, b)) for a, b in spans], None
    source = ckpt.get(unit.source)
    if unit.dequant is not None:
        source = _dequantize_unit(ckpt, unit, unit.dequant, source)

    def view(a: int, b: int) -> Callable[[], torch.Tensor]:
        part = source[a:b] if source.ndim else source
        return lambda: part

    return [_block_task(run, unit, writer, a, view(a, b), sample(a, b)) for a, b in spans], None


def _read_rows(files: SourceFiles, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
               whole: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    """Rows of a tensor (``shape``; ``()`` when ``whole`` is a scalar) into this thread's input buffer."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf = _buffers.get("in", nbytes)
    files.read_into(path, offset, buf.numpy().data)
    return buf.view(dtype).reshape(shape if whole else ())


def _block_task(run: _Run, unit: Unit, writer: ShardFile, row0: int, read: Callable[[], torch.Tensor],
                sample_rows: int) -> Callable[[], _Block]:  # fmt: skip
    def task() -> _Block:
        clock = _Clock()
        part = read()
        clock.lap("read")
        kernel = _kernel() if unit.quantize and not run.doomed and part.is_floating_point() else None
        if kernel and kernel.supported(unit.mode, unit.bits, unit.group_size, tuple(part.shape), unit.dtype):
            w = _cast(part, unit.dtype)
            packed = kernel.quantize(w, unit.bits, unit.group_size)
            clock.lap("convert")
            if packed is not None:  # else a group holds NaN/Inf (or float16 overflowed): scan and take MLX's path
                return _finish_quantized(
                    writer, unit, row0, w, packed, sample_rows, _Block(None, None, seconds=clock.seconds), clock
                )
        peak, bad = _scan(part, unit.dtype, row0)
        clock.lap("scan")
        block = _Block(peak, bad, seconds=clock.seconds)
        if run.doomed or peak is not None or (run.strict and bad is not None):
            return block  # the output will be refused: scan only
        if not unit.quantize:
            cast = _cast(part, unit.dtype)
            clock.lap("convert")
            writer.write_rows(unit.target, row0, cast)
            clock.lap("write")
            return block
        w = part.to(unit.dtype)
        arrays = mx.quantize(_to_mlx(w), group_size=unit.group_size, bits=unit.bits, mode=unit.mode)
        mx.eval(arrays)
        clock.lap("convert")
        return _finish_quantized(writer, unit, row0, w, tuple(_to_torch(a, copy=False) for a in arrays),
                                 sample_rows, block, clock)  # fmt: skip

    return task


def _kernel() -> Any:
    # numba (~170 MB of RSS once loaded) is imported by the first quantized block, not by every converting process
    from mlxd_daemon import affine_kernel

    return affine_kernel


def _finish_quantized(writer: ShardFile, unit: Unit, row0: int, w: torch.Tensor, packed: tuple[torch.Tensor, ...],
                      sample_rows: int, block: _Block, clock: _Clock) -> _Block:  # fmt: skip
    """Measure a quantized block's error on its row sample and write its packed weight, scales (and biases);
    ``block`` times its phases with ``clock``."""
    block.err2, block.ref2 = _squared_error(w, packed, unit, rows=sample_rows)
    clock.lap("error")
    for o, a in zip(unit.outputs, packed, strict=True):
        writer.write_rows(o.name, row0, a)
    clock.lap("write")
    return block


def _write_given(writer: ShardFile, unit: Unit, given: dict[str, torch.Tensor]) -> _Block:
    for o in unit.outputs:
        writer.write_rows(o.name, 0, given[o.name])
    return _Block(None, None)


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.t
        self.t = now


def _cast(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``part`` as ``dtype``: itself when it already is, else cast into this thread's output buffer."""
    if part.dtype == dtype:
        return part
    out = _buffers.get("out", part.numel() * dtype.itemsize).view(dtype).reshape(part.shape)
    return out.copy_(part)


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


def _squared_error(w: torch.Tensor, packed: tuple[torch.Tensor, ...], unit: Unit, rows: int) -> tuple[float, float]:
    """(||W - dequant(q(W))||², ||W||²) over at most ``rows`` evenly spaced rows of W as a matrix (groups run
    along rows, so a row sample is an unbiased estimate; dequantizing everything would cost more than the
    quantization itself). Only the sampled rows move to MLX."""
    w, packed = w.reshape(-1, w.shape[-1]), tuple(a.reshape(-1, a.shape[-1]) for a in packed)
    if w.shape[0] > rows:
        idx = torch.from_numpy(np.linspace(0, w.shape[0] - 1, rows).astype(np.int64))
        w, packed = w[idx], tuple(a[idx] for a in packed)
    q = tuple(_to_mlx(a.contiguous()) for a in packed)
    biases = q[2] if len(q) > 2 else None  # the microscaling modes have no biases
    restored = mx.dequantize(q[0], q[1], biases, group_size=unit.group_size, bits=unit.bits, mode=unit.mode,
                             dtype=mx.float32)  # fmt: skip
    w32 = _to_mlx(w.contiguous()).astype(mx.float32)
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
