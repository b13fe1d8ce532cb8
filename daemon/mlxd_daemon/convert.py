"""Convert a local Hugging Face checkpoint to the MLX on-disk format, streaming one tensor at a time.

Order of work: validate flags → read config → resolve the architecture (before any weight is read) → check the
output path → scan tensor headers → plan shards → write into a temp dir beside ``dst`` → rename into place.
On any failure, including ``Cancelled``, the temp dir is removed and ``dst`` is left as it was.
``quantize`` (an MLX directory → quantized) and ``dequantize`` (the reverse) run through the same writer.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mlxd_daemon import archs
from mlxd_daemon.calibrate import calibrate, check_method
from mlxd_daemon.checkpoint import Checkpoint, dominant_float_dtype, open_checkpoint, read_config
from mlxd_daemon.errors import FailedPrecondition, InvalidArgument, MlxdError
from mlxd_daemon.malloc import peak_rss_bytes
from mlxd_daemon.manifest import MANIFEST, write_config, write_manifest
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.quantize import QuantOptions, QuantSpec
from mlxd_daemon.shards import DTYPE_NAMES, DTYPES, Plan, make_plan, parse_size, plan_dequantize
from mlxd_daemon.staging import check_destination, needed_bytes, staged
from mlxd_daemon.writer import write_weights

__all__ = ["convert", "dequantize", "parse_size", "quantize"]

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
    # exported torch programs (mlxd_program): the graph and what validates it
    "program.json",
    "example_inputs.safetensors",
    "source.pt2",
    # sentence-transformers: the pipeline (pooling, normalisation) around the encoder
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# sentence-transformers module folders such as 1_Pooling/ and 2_Normalize/ (small JSON files).
MODULE_DIR = re.compile(r"\d+_[A-Za-z]+")
PROBE_TEXT = "Hello, world! Ünïcödé 日本語 <s> [CLS] 1234 — the probe text."


def files_to_copy(src: Path) -> list[str]:
    """Relative paths copied byte-for-byte: tokenizer/processor/generation files and pipeline module folders."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and MODULE_DIR.fullmatch(p.name)):
        names += [
            str(f.relative_to(src)) for f in sorted(folder.rglob("*")) if f.is_file() and f.stat().st_size < 1 << 20
        ]
    return names


def check_tokenizer(src: Path, dst: Path) -> None:
    """Token ids of a probe text must be the same from the copied tokenizer as from the source's."""
    if not (src / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer

    try:
        before = Tokenizer.from_file(str(src / "tokenizer.json")).encode(PROBE_TEXT).ids
    except Exception:  # a tokenizer.json this tokenizers version cannot read: the byte copy is all we can vouch for
        return
    after = Tokenizer.from_file(str(dst / "tokenizer.json")).encode(PROBE_TEXT).ids
    if before != after:
        msg = f"the tokenizer copied to {dst} encodes differently from the source's: refusing to publish it"
        raise MlxdError(msg, reason="TOKENIZER_CHANGED")


def convert(
    src: Path,
    dst: Path,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    quantize: QuantOptions | None = None,
    strict: bool = False,
    reporter: Reporter = NULL_REPORTER,
    hub: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Convert the HF model directory ``src`` into an MLX model directory ``dst``; return a JSON-able summary.

    ``dtype`` is float32, float16, bfloat16 or auto (the checkpoint's own floating dtype, majority by bytes).
    ``quantize`` (``QuantOptions``: bits, group size, mode, overrides, recipe, rtn/awq/gptq) quantizes while
    converting. With ``dry_run`` nothing is written and the returned dict is the plan. ``hub`` (the resolved hub id
    ``src`` came from) is recorded in the result and the manifest. Tensors holding NaN/Inf are listed in
    ``non_finite``; with ``strict`` they refuse the conversion (InvalidArgument NON_FINITE_WEIGHTS).
    """
    started = time.monotonic()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    target_name = _check_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    spec = quantize.spec() if quantize else None
    calib = _Calibration.of(quantize, spec) if quantize and spec else None

    config = read_config(src)
    arch: Any = archs.get_arch(config["model_type"])  # the route is decided before any weight is read
    route = getattr(arch, "ROUTE", f"mlxd:{arch.__name__.rsplit('.', 1)[-1]}")
    notes: list[str] = []
    if route == archs.MLX_LM:
        from mlxd_daemon.archs._lm_convert import LmCheckpoint, fix_config, model_fields

        config, notes = fix_config(config, model_fields(config))
        check_destination(src, dst, overwrite)
        ckpt: Any = LmCheckpoint(open_checkpoint(src, config), config)
        arch = ckpt  # the sanitized view names every tensor as mlx-lm loads it
    else:
        check_destination(src, dst, overwrite)
        ckpt = open_checkpoint(src, config)
    target = dominant_float_dtype(ckpt.tensors) if target_name == "auto" else DTYPES[target_name]
    plan = make_plan(ckpt, arch, target, max_bytes, spec)
    result = _execute(
        ckpt, plan, config, dst, target, spec, overwrite, dry_run, started, reporter, calib=calib, hub=hub,
        strict=strict,
    )  # fmt: skip
    return {**result, "path": route, "config_fixes": notes}


def quantize(
    src: Path,
    dst: Path,
    *,
    options: QuantOptions = QuantOptions(),
    overwrite: bool = False,
    dry_run: bool = False,
    max_shard_size: int | str = "5GB",
    strict: bool = False,
    reporter: Reporter = NULL_REPORTER,
    hub: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Quantize the float MLX model directory ``src`` into ``dst`` (``options`` and the result as ``convert``'s).

    Names are already MLX names, so no arch mapping applies and any model_type works; layouts recorded by the
    conversion are kept. FailedPrecondition ALREADY_QUANTIZED when ``src`` is quantized.
    """
    started = time.monotonic()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    max_bytes = parse_size(max_shard_size)
    spec = options.spec()
    calib = _Calibration.of(options, spec)
    config = read_config(src)
    if "quantization" in config:
        msg = f"{src} is already quantized; quantize its float source instead (or dequantize it first)"
        raise FailedPrecondition(msg, reason="ALREADY_QUANTIZED", path=src)
    check_destination(src, dst, overwrite)
    ckpt = open_checkpoint(src, config)
    identity = types.SimpleNamespace(map_weight=lambda name: name, DISK_LAYOUT=_source_layouts(ckpt))
    plan = make_plan(ckpt, identity, dominant_float_dtype(ckpt.tensors), max_bytes, spec)  # type: ignore[arg-type]
    return _execute(
        ckpt, plan, config, dst, None, spec, overwrite, dry_run, started, reporter,
        stage="quantize", calib=calib, hub=hub, strict=strict,
    )  # fmt: skip


def dequantize(
    src: Path,
    dst: Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    dry_run: bool = False,
    max_shard_size: int | str = "5GB",
    strict: bool = False,
    reporter: Reporter = NULL_REPORTER,
    hub: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Turn the quantized MLX directory ``src`` back into float: ``dtype`` auto keeps the float dtype the model
    was stored in (its scales' for affine), or float32 / float16 / bfloat16. config.json loses its quantization
    keys. FailedPrecondition NOT_QUANTIZED when there is nothing to dequantize."""
    started = time.monotonic()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    target_name = _check_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    config = read_config(src)
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict) or "bits" not in quant:
        msg = f"{src} is not quantized (config.json has no quantization entry): nothing to dequantize"
        raise FailedPrecondition(msg, reason="NOT_QUANTIZED", path=src)
    check_destination(src, dst, overwrite)
    ckpt = open_checkpoint(src, config)
    target = dominant_float_dtype(ckpt.tensors) if target_name == "auto" else DTYPES[target_name]
    plan = plan_dequantize(ckpt, quant, target, max_bytes, _source_layouts(ckpt))
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return _execute(
        ckpt, plan, config, dst, target, None, overwrite, dry_run, started, reporter,
        stage="dequantize", hub=hub, strict=strict,
    )  # fmt: skip


def _execute(
    ckpt: Checkpoint,
    plan: Plan,
    config: dict[str, Any],
    dst: Path,
    target: torch.dtype | None,
    spec: QuantSpec | None,
    overwrite: bool,
    dry_run: bool,
    started: float,
    reporter: Reporter,
    stage: str = "convert",
    calib: _Calibration | None = None,
    hub: dict[str, str] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Write ``plan`` into a temp dir beside ``dst`` and publish it; the shared tail of every entry point."""
    target = target or dominant_float_dtype(ckpt.tensors)
    result = {**_summary(ckpt, plan, dst, target, spec, dry_run), "hub": hub}
    calibrated = None
    if calib is not None and calib.method != "rtn":
        result["quantization"].update(calib.describe())
        if not dry_run:
            # Calibrated path: every calibrated Linear is quantized (and kept packed) before writing starts.
            calibrated = calibrate(ckpt, plan, config, calib.method, calib.data, calib.seed, reporter)
            result["quantization"]["calibration"] = calibrated.calibration
            result["calibration_seconds"] = calibrated.seconds
            for report in result["layer_reports"]:
                report["method"] = calibrated.notes.get(report["name"], "rtn") if report["bits"] else ""
    if dry_run:
        return _finish(result, started)
    needed = needed_bytes(plan.total_bytes, [ckpt.path / name for name in result["copied_files"]])
    phases: dict[str, float] = {}  # where the time went (writer.PHASES, summed over threads; walls)
    try:
        with staged(dst, needed, overwrite) as tmp:
            begun = time.monotonic()
            errors = write_weights(ckpt, plan, tmp, reporter, stage, calibrated.tensors if calibrated else None,
                                   strict=strict, non_finite=result["non_finite"], phases=phases)  # fmt: skip
            phases["weights_wall"] = time.monotonic() - begun
            for report in result["layer_reports"]:
                error = errors.get(report["name"], 0.0)
                report["rel_error"] = error if math.isfinite(error) else None  # NaN/Inf weights: not measurable
            write_config(config, spec, plan, tmp)
            for name in result["copied_files"]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ckpt.path / name, tmp / name)
            check_tokenizer(ckpt.path, tmp)
            write_manifest(ckpt, plan, target, result, tmp)
            synced = time.monotonic()
        phases["sync_wall"] = time.monotonic() - synced  # staged's fsync of every file, and the rename
    finally:
        ckpt.release()
    result["phases"] = {k: round(v, 3) for k, v in phases.items()}
    return _finish(result, started)


@dataclass(frozen=True)
class _Calibration:
    method: str
    data: str | Path | None
    seed: int

    @classmethod
    def of(cls, options: QuantOptions, spec: QuantSpec) -> _Calibration:
        """The method (validated against the spec's mode), data and seed of ``options``."""
        return cls(check_method(options.method, spec), options.calibration_data, options.calibration_seed)

    def describe(self) -> dict[str, Any]:
        """Recorded in ``quantization`` (result and manifest) for calibrated methods."""
        return {"method": self.method, "calibration_data": str(self.data or ""), "calibration_seed": self.seed}


def _check_dtype(dtype: str) -> str:
    if dtype != "auto" and dtype not in DTYPES:
        msg = f"bad dtype {dtype!r}: choose auto, {', '.join(DTYPES)}"
        raise InvalidArgument(msg, reason="BAD_DTYPE", dtype=dtype)
    return dtype


def _source_layouts(ckpt: Checkpoint) -> dict[str, str]:
    """Layouts an MLX source directory recorded (manifest, else safetensors metadata), kept on re-writing."""
    manifest = ckpt.path / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("layouts")
        if isinstance(recorded, dict):
            return {str(k): str(v) for k, v in recorded.items()}
    layouts: dict[str, str] = {}
    for file in ckpt.weight_files:
        if file.endswith(".safetensors"):
            with safe_open(str(ckpt.path / file), framework="pt") as f:
                layouts.update(json.loads((f.metadata() or {}).get("mlxd.layout", "{}")))
    return layouts


def _summary(
    ckpt: Checkpoint, plan: Plan, dst: Path, dtype: torch.dtype, spec: QuantSpec | None, dry_run: bool
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
        "copied_files": files_to_copy(ckpt.path),
        "dropped_tensors": plan.dropped,
        "quantization": spec.to_dict() if spec else None,
        "quantized_layers": [u.target.removesuffix(".weight") for u in plan.units if u.quantize],
        "skipped_layers": plan.skipped,
        **_layer_reports(plan),
        "dequantized_layers": [u.target.removesuffix(".weight") for u in plan.units if u.dequant],
        "float16_overflow": [],
        "non_finite": [],  # tensors holding NaN/Inf, filled in by the writer
        "estimated_peak_bytes": plan.estimated_peak_bytes(),
        "dry_run": dry_run,
    }


def _layer_reports(plan: Plan) -> dict[str, Any]:
    """Per candidate layer: bits (0 = float), group, mode, bytes before/after, reason; overall bits per weight.

    ``rel_error`` is filled in by the writer (None in a dry run, or for a weight holding NaN/Inf).
    """
    reports: list[dict[str, Any]] = []
    for u in plan.units:
        if not u.candidate:
            continue
        before = u.num_parameters * u.dtype.itemsize
        reports.append(
            {
                "name": u.target.removesuffix(".weight"),
                "bits": u.bits if u.quantize else 0,
                "group_size": u.group_size if u.quantize else 0,
                "mode": u.mode if u.quantize else "",
                "rel_error": None if u.quantize else 0.0,
                "bytes_before": before,
                "bytes_after": u.nbytes,
                "reason": u.note,
            }
        )
    weights = sum(u.num_parameters for u in plan.units if u.candidate)
    after = sum(r["bytes_after"] for r in reports)
    return {
        "layer_reports": reports,
        "bits_per_weight": round(8 * after / weights, 4) if weights else 0.0,
        "bytes_before": sum(r["bytes_before"] for r in reports),
    }


def _finish(result: dict[str, Any], started: float) -> dict[str, Any]:
    result["seconds"] = round(time.monotonic() - started, 3)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result
