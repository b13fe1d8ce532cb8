"""``export_program``: any ``torch.export``-able model -> an MLX program directory; and the Convert routing.

Order of work: capture + decompose + check every op has a mapping (``Unsupported`` UNSUPPORTED_OPS before
anything is written) → check the output path → lower → write into a temp dir beside ``dst`` → rename into
place. On any failure the temp dir is removed and ``dst`` is left as it was (the rules of ``convert``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import mlxd_daemon
from mlxd_daemon.archs import MODEL_REMAPPING, SUPPORTED
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.export import program as fmt
from mlxd_daemon.export.capture import Captured, capture
from mlxd_daemon.export.lower import Lowered, dtype_name, lower
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.shards import DTYPES
from mlxd_daemon.staging import check_destination, needed_bytes, staged
from mlxd_daemon.writer import FLOAT16_MAX, MANIFEST


def export_program(
    source: Path | str | torch.nn.Module,
    dst: Path | str,
    *,
    input_spec: list[dict[str, Any]] | None = None,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    reporter: Reporter = NULL_REPORTER,
) -> dict[str, Any]:
    """Capture ``source`` with ``torch.export`` and write the MLX program directory ``dst`` (``program.FORMAT``).

    ``source``: a ``.pt2`` file, a ``module:factory`` entry point (with ``input_spec``), a local Hugging Face
    directory, or an ``nn.Module`` (with ``example_inputs``). ``dtype``: float32, float16, bfloat16 or auto
    (the weights' own). Returns dst, ops_seen, ops_mapped, op_coverage {op: count}, missing_ops,
    num_parameters, total_bytes, seconds, plus the keys of ``convert``'s result the servicer reads.
    """
    started = time.monotonic()
    dst = Path(dst).expanduser()
    if dtype != "auto" and dtype not in DTYPES:
        msg = f"bad dtype {dtype!r}: choose auto, {', '.join(DTYPES)}"
        raise InvalidArgument(msg, reason="BAD_DTYPE", dtype=dtype)
    reporter.begin("capture", total_items=1, message=f"torch.export of {_describe(source)}")
    captured = capture(source, example_inputs=example_inputs, input_spec=input_spec)
    reporter.report(1)
    reporter.end(f"{sum(captured.ops.values())} nodes, {len(captured.ops)} distinct ops, all mapped")
    src = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    check_destination(src if src is not None and src.exists() else None, dst, overwrite)
    lowered = lower(captured.decomposed)
    target = _target_dtype(dtype, lowered.weights)

    weights = sum(t.numel() * target.itemsize if t.is_floating_point() else t.nbytes for t in lowered.weights.values())
    examples = sum(t.nbytes for t in captured.example.values())
    with staged(dst, needed_bytes(weights + examples), overwrite) as tmp:
        summary = _write(tmp, captured, lowered, target, reporter)
    coverage = dict(sorted(captured.ops.items()))
    return {
        "dst": str(dst),
        "model_type": fmt.MODEL_TYPE,
        "source_format": captured.source["kind"],
        "dtype": dtype_name(target),
        **summary,
        "ops_seen": len(coverage),
        "ops_mapped": len(coverage) - len(captured.missing),
        "op_coverage": coverage,
        "missing_ops": captured.missing,
        "inputs": lowered.inputs,
        "outputs": [{k: v for k, v in o.items() if k != "ref"} for o in lowered.outputs],
        "copied_files": [],
        "dropped_tensors": [],
        "quantization": None,
        "dry_run": False,
        "seconds": round(time.monotonic() - started, 3),
    }


def maybe_export(src: Path | str) -> bool:
    """Whether ``Convert`` should route ``src`` to ``export_program``: a ``.pt2`` file, or a HF directory whose
    model_type has no hand-written module but is known to transformers."""
    path = Path(src).expanduser()
    if path.suffix == ".pt2":
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError):
        return False  # let convert report the broken config
    if not model_type or model_type in SUPPORTED or model_type in MODEL_REMAPPING or model_type == fmt.MODEL_TYPE:
        return False
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def convert_via_export(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """``ops.convert``'s branch for exported programs: Convert's arguments in, Convert's result keys out."""
    if args.get("quantize"):
        msg = "quantizing while exporting a program is not implemented yet: convert in float, then quantize"
        raise Unsupported(msg, reason="UNSUPPORTED_OPTION", option="quantize")
    if args.get("dry_run"):
        msg = "--dry-run is not implemented for exported programs (capturing the graph is most of the work)"
        raise Unsupported(msg, reason="UNSUPPORTED_OPTION", option="dry_run")
    return export_program(
        args["src"],
        Path(args["dst"]),
        dtype=args.get("dtype", "auto"),
        overwrite=bool(args.get("overwrite", False)),
        reporter=reporter,
    )


def _describe(source: Any) -> str:
    return type(source).__name__ if isinstance(source, torch.nn.Module) else str(source)


def _target_dtype(dtype: str, weights: dict[str, torch.Tensor]) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    sizes: dict[torch.dtype, int] = {}
    for t in weights.values():
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel() * t.element_size()
    best = max(sizes, key=sizes.__getitem__) if sizes else torch.float32
    return best if best in DTYPES.values() else torch.float32


def _cast(name: str, t: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    if t.is_floating_point() and t.dtype != target:
        if target == torch.float16 and t.numel() and float(t.abs().nan_to_num(0, 0, 0).max()) > FLOAT16_MAX:
            msg = f"{name} exceeds the float16 range ±{FLOAT16_MAX:g} and would become inf: choose bfloat16 or float32"
            raise InvalidArgument(msg, reason="FLOAT16_OVERFLOW", tensors=name)
        t = t.to(target)
    return t.contiguous().clone()  # own the memory: safetensors refuses views of shared storage


def _write(out: Path, captured: Captured, lowered: Lowered, target: torch.dtype, reporter: Reporter) -> dict[str, Any]:
    """Weights, example inputs, (source.pt2), program.json, config.json, manifest; returns the size summary."""
    reporter.begin("write", total_items=len(lowered.weights))
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, t) in enumerate(lowered.weights.items()):
        tensors[name] = _cast(name, t, target)
        reporter.report(i + 1, message=name)
    metadata = {"format": "mlx", "mlxd.layout": json.dumps(lowered.layouts, sort_keys=True)}
    save_file(tensors, str(out / fmt.WEIGHTS_FILE), metadata=metadata)
    save_file({k: v.contiguous() for k, v in captured.example.items()}, str(out / fmt.EXAMPLES_FILE))
    source = dict(captured.source)
    if source["kind"] in ("module", "factory"):
        # A module built in-process (random init, local code) cannot be rebuilt later: keep what was captured.
        torch.export.save(captured.exported, str(out / fmt.SOURCE_PT2))
        source["pt2"] = fmt.SOURCE_PT2
    inputs = [dict(i, **({"range": captured.ranges[i["name"]]} if i["name"] in captured.ranges else {}))
              for i in lowered.inputs]  # fmt: skip
    spec = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "inputs": inputs,
        "outputs": lowered.outputs,
        "nodes": lowered.nodes,
        "params": lowered.params,
        "layouts": lowered.layouts,
        "source": source,
        "op_coverage": dict(sorted(captured.ops.items())),
        "torch_version": torch.__version__,
    }
    (out / fmt.PROGRAM_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    config = {"model_type": fmt.MODEL_TYPE, "program": fmt.PROGRAM_FILE, "dtype": dtype_name(target)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    num_parameters = sum(t.numel() for t in tensors.values())
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    manifest: dict[str, Any] = {
        "mlxd_version": mlxd_daemon.__version__,
        "source": source,
        "model_type": fmt.MODEL_TYPE,
        "format": {"name": fmt.FORMAT, "version": fmt.VERSION},
        "dtype": dtype_name(target),
        "layouts": lowered.layouts,
        "dropped_tensors": [],
        "quantization": None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    reporter.end(f"wrote {len(tensors)} tensors")
    return {
        "num_tensors": len(tensors),
        "num_parameters": num_parameters,
        "total_bytes": total_bytes,
        "shards": [{"file": fmt.WEIGHTS_FILE, "bytes": total_bytes, "tensors": len(tensors)}],
        "tensor_dtypes": dict(sorted(Counter(dtype_name(t.dtype) for t in tensors.values()).items())),
    }
