"""``export_program``: any ``torch.export``-able model -> an MLX program directory; and the Convert routing.

Order of work: capture + decompose + check every op has a mapping (``Unsupported`` UNSUPPORTED_OPS before
anything is written) → check the output path → lower → write into a temp dir beside ``dst`` → rename into
place. On any failure the temp dir is removed and ``dst`` is left as it was (the rules of ``convert``).
"""

from __future__ import annotations

import json
import shutil
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
from mlxd_daemon.export.seq2seq import capture_seq2seq, generation_config, is_seq2seq_dir
from mlxd_daemon.manifest import MANIFEST
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.shards import DTYPES
from mlxd_daemon.staging import check_destination, needed_bytes, staged
from mlxd_daemon.writer import FLOAT16_MAX


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
    parts, record, example = _capture(source, example_inputs, input_spec)
    ops = sum((c.ops for c in parts.values()), Counter())
    reporter.report(1)
    reporter.end(f"{sum(ops.values())} nodes, {len(ops)} distinct ops, all mapped")
    src = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    check_destination(src if src is not None and src.exists() else None, dst, overwrite)
    lowered = {name: lower(c.decomposed, c.source.get("dim_names"), c.source.get("max_lengths"))
               for name, c in parts.items()}  # fmt: skip
    weights = shared_weights(lowered)
    target = _target_dtype(dtype, weights)

    size = sum(t.numel() * target.itemsize if t.is_floating_point() else t.nbytes for t in weights.values())
    examples = sum(t.nbytes for t in example.values())
    with staged(dst, needed_bytes(size + examples), overwrite) as tmp:
        summary = _write(tmp, parts, lowered, weights, example, record, target, reporter)
        summary["copied_files"] = _copy_side_files(source, tmp)
    coverage = dict(sorted(ops.items()))
    first = next(iter(lowered.values()))
    return {
        "dst": str(dst),
        "model_type": fmt.MODEL_TYPE,
        "source_format": record["kind"],
        "program_kind": "seq2seq" if "encoder" in parts else "single",
        "dtype": dtype_name(target),
        **summary,
        "ops_seen": len(coverage),
        "ops_mapped": len(coverage),
        "op_coverage": coverage,
        "missing_ops": [],
        "inputs": [i for low in lowered.values() for i in low.inputs],
        "dims": {k: v for low in lowered.values() for k, v in low.dims.items()},
        "static_reason": "; ".join(r for c in parts.values() if (r := c.source.get("static_reason", ""))),
        "outputs": [{k: v for k, v in o.items() if k != "ref"} for o in first.outputs],
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
        input_spec=parse_input_spec(args.get("input_spec") or ""),
        dtype=args.get("dtype", "auto"),
        overwrite=bool(args.get("overwrite", False)),
        reporter=reporter,
    )


def shared_weights(lowered: dict[str, Lowered]) -> dict[str, torch.Tensor]:
    """One tensor per name across the graphs (an encoder-decoder's graphs share the model's weights): the graph
    that pre-transposed a weight for its convolutions wins; the others lift it without reading it."""
    weights: dict[str, torch.Tensor] = {}
    for low in lowered.values():
        for name, tensor in low.weights.items():
            if name not in weights or name in low.layouts:
                weights[name] = tensor
    return weights


def parse_input_spec(text: str) -> list[dict[str, Any]] | None:
    """``--input-spec`` JSON -> a list of input entries; BAD_INPUT_SPEC when it is not a list of objects."""
    if not text:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f'--input-spec is not valid JSON ({e}): want [{{"name": ..., "shape": [...], "dtype": ...}}]'
        raise InvalidArgument(msg, reason="BAD_INPUT_SPEC") from None
    if not isinstance(spec, list) or not all(isinstance(s, dict) for s in spec):
        msg = '--input-spec must be a JSON list of objects like {"name": "x", "shape": [1, 3]}'
        raise InvalidArgument(msg, reason="BAD_INPUT_SPEC")
    return spec


def _capture(
    source: Any, example_inputs: Any, input_spec: list[dict[str, Any]] | None
) -> tuple[dict[str, Captured], dict[str, Any], dict[str, torch.Tensor]]:
    """({graph name: Captured}, source record, example inputs of the whole model). One graph named "" for most
    models; "encoder" and "decoder" for a generating encoder-decoder directory."""
    if isinstance(source, (str, Path)) and is_seq2seq_dir(Path(source).expanduser()):
        model_dir = Path(source).expanduser().resolve()
        parts, record, example = capture_seq2seq(model_dir, input_spec)
        record["generation"] = generation_config(model_dir)
        return parts, record, example
    captured = capture(source, example_inputs=example_inputs, input_spec=input_spec)
    return {"": captured}, captured.source, captured.example


# Files a program keeps from its Hugging Face source: tokenizer and generation settings, for Generate.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "preprocessor_config.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model")  # fmt: skip


def _copy_side_files(source: Any, out: Path) -> list[str]:
    if not isinstance(source, (str, Path)) or not Path(source).expanduser().is_dir():
        return []
    copied = []
    for name in SIDE_FILES:
        if (Path(source).expanduser() / name).is_file():
            shutil.copy2(Path(source).expanduser() / name, out / name)
            copied.append(name)
    return copied


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


def _graph_spec(captured: Captured, lowered: Lowered) -> dict[str, Any]:
    inputs = [dict(i, **({"range": captured.ranges[i["name"]]} if i["name"] in captured.ranges else {}))
              for i in lowered.inputs]  # fmt: skip
    return {"inputs": inputs, "dims": lowered.dims, "outputs": lowered.outputs, "nodes": lowered.nodes,
            "params": lowered.params, "layouts": lowered.layouts}  # fmt: skip


def _write(
    out: Path,
    parts: dict[str, Captured],
    lowered: dict[str, Lowered],
    weights: dict[str, torch.Tensor],
    example: dict[str, torch.Tensor],
    record: dict[str, Any],
    target: torch.dtype,
    reporter: Reporter,
) -> dict[str, Any]:
    """Weights, example inputs, (source.pt2), program.json, config.json, manifest; returns the size summary."""
    reporter.begin("write", total_items=len(weights))
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, t) in enumerate(weights.items()):
        tensors[name] = _cast(name, t, target)
        reporter.report(i + 1, message=name)
    layouts = {k: v for low in lowered.values() for k, v in low.layouts.items()}
    metadata = {"format": "mlx", "mlxd.layout": json.dumps(layouts, sort_keys=True)}
    save_file(tensors, str(out / fmt.WEIGHTS_FILE), metadata=metadata)
    save_file({k: v.contiguous() for k, v in example.items()}, str(out / fmt.EXAMPLES_FILE))
    source = dict(record)
    if source["kind"] in ("module", "factory"):
        # A module built in-process (random init, local code) cannot be rebuilt later: keep what was captured.
        torch.export.save(parts[""].exported, str(out / fmt.SOURCE_PT2))
        source["pt2"] = fmt.SOURCE_PT2
    graphs = {name: _graph_spec(parts[name], low) for name, low in lowered.items()}
    if "" in graphs:
        body: dict[str, Any] = graphs[""]
    else:  # the whole model's inputs (validation feeds them through encoder then decoder) and both graphs
        specs = {i["name"]: i for g in graphs.values() for i in g["inputs"]}
        whole = [dict(specs[n], **({"range": record["ranges"][n]} if n in record["ranges"] else {})) for n in example]
        dims = {k: v for g in graphs.values() for k, v in g["dims"].items()}
        body = {"kind": "seq2seq", "inputs": whole, "dims": dims, "graphs": graphs}
    spec = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        **body,
        "source": source,
        "op_coverage": dict(sorted(sum((c.ops for c in parts.values()), Counter()).items())),
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
        "layouts": layouts,
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
