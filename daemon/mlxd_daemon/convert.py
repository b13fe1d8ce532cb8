"""Convert a local Hugging Face checkpoint to the MLX on-disk format, streaming one tensor at a time.

Order of work: validate flags → read config → resolve the architecture (before any weight is read) → check the
output path → scan tensor headers → plan shards → write into a temp dir beside ``dst`` → rename into place.
On any failure, including ``Cancelled``, the temp dir is removed and ``dst`` is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import secrets
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from safetensors.torch import save_file

import mlxd_daemon
from mlxd_daemon import archs
from mlxd_daemon.checkpoint import Checkpoint, dominant_float_dtype, open_checkpoint, read_config
from mlxd_daemon.errors import FailedPrecondition, InvalidArgument
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.shards import (
    DTYPE_NAMES,
    DTYPES,
    Plan,
    Shard,
    Unit,
    check_quantization,
    index_json,
    make_plan,
    parse_size,
)

__all__ = ["convert", "parse_size"]

# Copied byte-for-byte: re-serialising a tokenizer can silently lose special or added tokens.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
)
FLOAT16_MAX = 65504.0
MANIFEST = "mlxd_manifest.json"
_HASH_LIMIT = 64 << 20  # sha256 only for small files; hashing multi-GB weights would double the run time.


def convert(
    src: Path,
    dst: Path,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_mode: str = "affine",
    reporter: Reporter = NULL_REPORTER,
) -> dict[str, Any]:
    """Convert the HF model directory ``src`` into an MLX model directory ``dst``; return a JSON-able summary.

    ``dtype`` is float32, float16, bfloat16 or auto (the checkpoint's own floating dtype, majority by bytes).
    With ``dry_run`` nothing is written and the returned dict is the plan.
    """
    started = time.monotonic()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dtype != "auto" and dtype not in DTYPES:
        msg = f"bad dtype {dtype!r}: choose auto, {', '.join(DTYPES)}"
        raise InvalidArgument(msg, reason="BAD_DTYPE", dtype=dtype)
    max_bytes = parse_size(max_shard_size)
    quant = check_quantization(q_bits, q_group_size, q_mode) if quantize else None

    config = read_config(src)
    arch = archs.get_arch(config["model_type"])
    _check_destination(src, dst, overwrite)
    ckpt = open_checkpoint(src, config)
    target = dominant_float_dtype(ckpt.tensors) if dtype == "auto" else DTYPES[dtype]
    plan = make_plan(ckpt, arch, target, max_bytes, quant)
    result = _summary(ckpt, plan, dst, target, quant, dry_run)
    if dry_run:
        return _finish(result, started)

    tmp = dst.parent / f".{dst.name}.mlxd-tmp-{secrets.token_hex(4)}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        _write_weights(ckpt, plan, tmp, reporter)
        _write_config(config, quant, tmp)
        for name in result["copied_files"]:
            shutil.copyfile(src / name, tmp / name)
        _write_manifest(ckpt, plan, target, quant, result["copied_files"], tmp)
        _sync_tree(tmp)
        _publish(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.release()
    return _finish(result, started)


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if src.resolve() == dst.resolve() or dst.resolve() in src.resolve().parents:
        msg = f"output {dst} is or contains the source directory: choose another path"
        raise InvalidArgument(msg, reason="OUTPUT_IS_SOURCE", path=dst)
    if dst.exists() and not overwrite:
        msg = f"output {dst} already exists: pass --overwrite or choose another path"
        raise FailedPrecondition(msg, reason="OUTPUT_EXISTS", path=dst)


def _write_weights(ckpt: Checkpoint, plan: Plan, out: Path, reporter: Reporter) -> None:
    """Stream tensors shard by shard; with a float16 target, scan everything before refusing an overflow."""
    reporter.begin("convert", len(plan.units), plan.total_bytes)
    done = done_bytes = mapped = 0
    overflow: list[dict[str, Any]] = []
    for shard in plan.shards:
        tensors: dict[str, torch.Tensor] = {}
        for unit in shard.units:
            source = ckpt.get(unit.source)
            peak = _float16_overflow(source, unit.dtype)
            if peak is not None:
                overflow.append({"name": unit.source, "max_abs": peak})
                tensors.clear()  # the output is doomed: stop holding converted data, keep scanning
            if not overflow:
                tensors.update(_convert_unit(source, unit))
            del source
            done, done_bytes, mapped = done + 1, done_bytes + unit.nbytes, mapped + unit.src_nbytes
            if mapped >= plan.max_bytes:
                # Read pages of mapped source files count as resident until unmapped: cap them too.
                ckpt.release()
                mapped = 0
            reporter.report(done, done_bytes, unit.target)
        if not overflow:
            _save_shard(tensors, shard, plan.layouts, out)
        tensors.clear()
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
    if len(plan.shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json(plan), indent=2) + "\n")
    reporter.end(f"wrote {len(plan.shards)} shard(s)")


def _float16_overflow(t: torch.Tensor, out_dtype: torch.dtype) -> float | None:
    """Largest finite |x| when casting ``t`` to float16 would overflow it, else None."""
    if out_dtype != torch.float16 or not t.is_floating_point() or t.dtype == torch.float16 or t.numel() == 0:
        return None
    magnitude = t.abs().masked_fill_(~torch.isfinite(t), 0)
    peak = float(magnitude.max())
    return peak if peak > FLOAT16_MAX else None


def _convert_unit(source: torch.Tensor, unit: Unit) -> dict[str, torch.Tensor]:
    """Cast (and optionally quantize) one tensor into tensors that own their memory."""
    out = source.to(unit.dtype)
    if out.data_ptr() == source.data_ptr() and not unit.quantize:
        out = out.clone()  # same dtype: still a view of the mapped source file
    out = out.contiguous()
    if not unit.quantize:
        return {unit.target: out}
    weight, scales, biases = mx.quantize(_to_mlx(out), group_size=unit.group_size, bits=unit.bits)
    names = [o.name for o in unit.outputs]
    return dict(zip(names, (_to_torch(weight), _to_torch(scales), _to_torch(biases)), strict=True))


def _to_mlx(t: torch.Tensor) -> mx.array:
    # numpy has no bfloat16: move the raw bits and reinterpret them on the MLX side.
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def _to_torch(a: mx.array) -> torch.Tensor:
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _save_shard(tensors: dict[str, torch.Tensor], shard: Shard, layouts: dict[str, str], out: Path) -> None:
    names = set(tensors)
    metadata = {
        "format": "mlx",
        "mlxd.layout": json.dumps({k: v for k, v in layouts.items() if k in names}, sort_keys=True),
    }
    save_file(tensors, str(out / shard.file), metadata=metadata)


def _write_config(config: dict[str, Any], quant: dict[str, Any] | None, out: Path) -> None:
    config = dict(config)
    if quant is not None:
        config["quantization"] = dict(quant)
        config["quantization_config"] = dict(quant)  # the key transformers-style loaders look for
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_manifest(
    ckpt: Checkpoint,
    plan: Plan,
    dtype: torch.dtype,
    quant: dict[str, Any] | None,
    copied: list[str],
    out: Path,
) -> None:
    names = ["config.json", *([ckpt.index_file] if ckpt.index_file else []), *ckpt.weight_files, *copied]
    files = []
    for name in names:
        path = ckpt.path / name
        entry: dict[str, Any] = {"name": name, "bytes": path.stat().st_size}
        if name not in ckpt.weight_files and entry["bytes"] <= _HASH_LIMIT:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        files.append(entry)
    manifest = {
        "mlxd_version": mlxd_daemon.__version__,
        "source": {"path": str(ckpt.path.resolve()), "weight_format": ckpt.weight_format, "files": files},
        "model_type": ckpt.model_type,
        "dtype": DTYPE_NAMES[dtype],
        "layouts": plan.layouts,
        "dropped_tensors": plan.dropped,
        "quantization": quant,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sync_tree(path: Path) -> None:
    """fsync every file and the directory, so the rename never publishes files that are not on disk yet."""
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished output into place; an old ``dst`` is removed only once the new one is there."""
    if not dst.exists() and not dst.is_symlink():
        tmp.rename(dst)
        return
    if not overwrite:  # someone created dst while we were converting
        msg = f"output {dst} already exists: pass --overwrite or choose another path"
        raise FailedPrecondition(msg, reason="OUTPUT_EXISTS", path=dst)
    old = dst.parent / f".{dst.name}.mlxd-old-{secrets.token_hex(4)}"
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _summary(
    ckpt: Checkpoint, plan: Plan, dst: Path, dtype: torch.dtype, quant: dict[str, Any] | None, dry_run: bool
) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for unit in plan.units:
        for o in unit.outputs:
            key = str(o.dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + 1
    return {
        "dst": str(dst),
        "model_type": ckpt.model_type,
        "source_format": ckpt.weight_format,
        "dtype": DTYPE_NAMES[dtype],
        "num_tensors": sum(len(u.outputs) for u in plan.units),
        "num_parameters": plan.num_parameters,
        "total_bytes": plan.total_bytes,
        "shards": [
            {"file": s.file, "bytes": s.nbytes, "tensors": sum(len(u.outputs) for u in s.units)} for s in plan.shards
        ],
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "copied_files": [n for n in TOKENIZER_FILES if (ckpt.path / n).is_file()],
        "dropped_tensors": plan.dropped,
        "quantization": quant,
        "quantized_layers": [u.target.removesuffix(".weight") for u in plan.units if u.quantize],
        "skipped_layers": plan.skipped,
        "float16_overflow": [],
        "estimated_peak_bytes": plan.estimated_peak_bytes(),
        "dry_run": dry_run,
    }


def _finish(result: dict[str, Any], started: float) -> dict[str, Any]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["seconds"] = round(time.monotonic() - started, 3)
    result["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    return result
