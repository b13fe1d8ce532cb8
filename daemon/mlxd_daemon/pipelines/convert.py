"""Convert a diffusers Stable Diffusion pipeline directory into an MLX pipeline directory of the same layout.

Order of work: model_index.json → every component's config parsed and mapped (scheduler class, UNet/VAE config,
text encoder) → every component's tensor headers planned and checked against the MLX module's names and shapes →
only then weights are streamed, component by component, through the project's writer into one temp dir beside
``dst``, which is published atomically. Any refusal happens before a byte of weights is written.

Layout written: model_index.json, scheduler/ and tokenizer/ copied byte for byte; unet/, vae/, text_encoder/ each
with config.json (+ mlx-lm ``quantization``), model*.safetensors and mlxd_manifest.json; a root mlxd_manifest.json.
Conv weights stay in PyTorch [O, I, kH, kW] order on disk (recorded as ``pytorch_conv2d_OIHW``, as CLIP's patch
conv), the loader transposes them to MLX's [O, kH, kW, I].
"""

from __future__ import annotations

import json
import shutil
import time
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch

import mlxd_daemon
from mlxd_daemon.checkpoint import Checkpoint, dominant_float_dtype, open_checkpoint
from mlxd_daemon.convert import _check_dtype, _finish, _summary, check_tokenizer
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.malloc import peak_rss_bytes
from mlxd_daemon.manifest import MANIFEST, write_config, write_manifest
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.quantize import QuantOptions, QuantSpec, make_spec
from mlxd_daemon.shards import DTYPE_NAMES, DTYPES, Plan, make_plan, parse_size
from mlxd_daemon.staging import check_destination, needed_bytes, staged
from mlxd_daemon.writer import write_weights

CONV_LAYOUT = "pytorch_conv2d_OIHW"
WEIGHTED = ("text_encoder", "unet", "vae")
# model_index.json entries that are not converted (the safety checker is a separate CLIP vision model).
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
# Quantized by default as users quantize SD: the UNet at 8 bits, the text encoder at 4; the VAE stays float.
DEFAULT_BITS = {"unet": 8, "text_encoder": 4}


@dataclass
class Component:
    name: str
    ckpt: Checkpoint
    config: dict[str, Any]
    plan: Plan
    dtype: torch.dtype
    spec: QuantSpec | None
    note: str = ""


def read_model_index(src: Path) -> dict[str, Any]:
    """model_index.json, checked for the components an SD pipeline needs (PIPELINE_COMPONENT_MISSING otherwise)."""
    from mlxd_daemon.pipelines.schedulers import check_scheduler_class

    try:
        index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        msg = f"{src}/model_index.json is not readable JSON: {e}"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=str(src)) from None
    wanted = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
              "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "scheduler": None}  # fmt: skip
    for name, classes in wanted.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None or not (src / name).is_dir():
            msg = f"pipeline {src} has no {name} component (model_index.json entry and {name}/ folder): cannot convert"
            raise InvalidArgument(msg, reason="PIPELINE_COMPONENT_MISSING", component=name)
        if classes is not None and entry[1] not in classes:
            msg = f"{name} is a {entry[1]}; mlxd converts Stable Diffusion 1.x/2.x pipelines ({' or '.join(classes)})"
            raise Unsupported(msg, reason="UNSUPPORTED_PIPELINE", component=name, cls=str(entry[1]))
    check_scheduler_class(str(index["scheduler"][1]))
    extra = [k for k, v in index.items() if not k.startswith("_") and k not in wanted and k not in IGNORED
             and isinstance(v, list) and v[0] is not None]  # fmt: skip
    if extra:
        msg = f"pipeline component(s) {', '.join(extra)} are not supported (SDXL-style pipelines are not mapped)"
        raise Unsupported(msg, reason="UNSUPPORTED_PIPELINE", component=extra[0])
    return index


def component_config(src: Path, name: str, filename: str = "config.json") -> dict[str, Any]:
    """A component's JSON config; PIPELINE_COMPONENT_MISSING when absent."""
    path = src / name / filename
    if not path.is_file():
        msg = f"pipeline component {name}/ has no {filename}: cannot convert"
        raise InvalidArgument(msg, reason="PIPELINE_COMPONENT_MISSING", component=name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        msg = f"{path} is not valid JSON: {e}"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=str(path)) from None


def text_encoder_name(name: str) -> str | None:
    """transformers 5 saves CLIPTextModel without the ``text_model.`` prefix, older versions with it."""
    if name.endswith("position_ids"):
        return None
    return name if name.startswith("text_model.") else f"text_model.{name}"


def _mapper(name: str, ckpt: Checkpoint) -> types.SimpleNamespace:
    """The arch-like namespace ``make_plan`` takes: name mapping and the conv layouts of this checkpoint."""
    rename = text_encoder_name if name == "text_encoder" else (lambda n: n)
    layouts = {t: CONV_LAYOUT for n, i in ckpt.tensors.items() if len(i.shape) == 4 and (t := rename(n)) is not None}
    return types.SimpleNamespace(map_weight=rename, DISK_LAYOUT=layouts)


def _check_structure(name: str, config: dict[str, Any], ckpt: Checkpoint, plan: Plan) -> None:
    """Planned names and shapes against the MLX module's (lazily built: no weight memory) before any write."""
    from mlx.utils import tree_flatten

    from mlxd_daemon.pipelines.sd import build_component

    module = build_component(name, config)
    params = cast("list[tuple[str, Any]]", tree_flatten(module.parameters()))  # a list without destination=
    expected = {k: tuple(v.shape) for k, v in params}
    got = {}
    for unit in plan.units:
        shape = ckpt.tensors[unit.source].shape
        if plan.layouts.get(unit.target) == CONV_LAYOUT:
            o, i, kh, kw = shape
            shape = (o, kh, kw, i)  # compared in MLX order
        got[unit.target] = shape
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if got[k] != expected[k])
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        detail = "; ".join(f"{label}: {', '.join(names[:3])}" for label, names in found if names)
        msg = f"{name} weights do not fit its config as mlxd maps it: {detail}"
        raise Unsupported(msg, reason="UNSUPPORTED_UNET_CONFIG" if name == "unet" else "WEIGHTS_MISMATCH",
                          component=name)  # fmt: skip


def _spec(name: str, quantize: QuantOptions | None) -> QuantSpec | None:
    """The component's quantization: UNet 8 / text encoder 4 bits unless bits says; overrides by prefix."""
    if not quantize or name not in DEFAULT_BITS:
        return None
    overrides = []
    for text in quantize.overrides:
        head, dot, rest = text.partition(".")
        if head in WEIGHTED and dot:
            if head == name:
                overrides.append(rest)
        else:
            overrides.append(text)
    bits = quantize.bits or DEFAULT_BITS[name]
    return make_spec(bits, quantize.group_size, quantize.mode, overrides, quantize.recipe)


def plan_pipeline(src: Path, target_name: str, max_bytes: int, quantize: QuantOptions | None) -> list[Component]:
    """Every component mapped, planned and structure-checked; nothing written."""
    from mlxd_daemon.pipelines.sd import parse_component_config

    components = []
    for name in WEIGHTED:
        config = component_config(src, name)
        parse_component_config(name, config)  # refuses unsupported configs (UNSUPPORTED_UNET_CONFIG, ...)
        ckpt = open_checkpoint(src / name, {**config, "model_type": f"sd_{name}"})
        target = dominant_float_dtype(ckpt.tensors) if target_name == "auto" else DTYPES[target_name]
        note = ""
        if name == "vae" and target == torch.float16 and config.get("force_upcast", True):
            # SD's VAE decoder activations overflow float16 (black/NaN images): diffusers upcasts it too.
            target, note = torch.float32, "kept float32: the VAE's activations overflow float16 (force_upcast)"
        spec = _spec(name, quantize)
        plan = make_plan(ckpt, _mapper(name, ckpt), target, max_bytes, spec)  # type: ignore[arg-type]
        _check_structure(name, config, ckpt, plan)
        components.append(Component(name, ckpt, config, plan, target, spec, note))
    return components


def convert_pipeline(
    src: Path,
    dst: Path,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    quantize: QuantOptions | None = None,
    reporter: Reporter = NULL_REPORTER,
    **unused: Any,
) -> dict[str, Any]:
    """Convert the diffusers pipeline ``src`` into the MLX pipeline ``dst``; a JSON-able summary like ``convert``'s.

    ``quantize``: the UNet at ``bits`` (default 8) and the text encoder at ``bits`` (default 4); overrides
    prefixed ``unet.`` / ``text_encoder.`` apply to that component only. The VAE is never quantized. With
    ``dtype`` float16 the VAE stays float32 when its config says ``force_upcast`` (every SD VAE does).
    """
    started = time.monotonic()
    if quantize and quantize.method != "rtn":
        msg = "calibrated quantization (awq/gptq) is not available for diffusion pipelines: use rtn"
        raise InvalidArgument(msg, reason="BAD_QUANT_METHOD")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    target_name = _check_dtype(dtype)
    index = read_model_index(src)
    component_config(src, "scheduler", "scheduler_config.json")
    components = plan_pipeline(src, target_name, parse_size(max_shard_size), quantize)
    check_destination(src, dst, overwrite)
    summaries = {c.name: _summary(c.ckpt, c.plan, dst / c.name, c.dtype, c.spec, dry_run) for c in components}
    result = _merge(components, summaries, dst, target_name, dry_run)
    result["copied_files"] = _files_to_copy(src)
    if dry_run:
        return _finish(result, started)
    weights = sum(c.plan.total_bytes for c in components)
    try:
        with staged(dst, needed_bytes(weights, [src / name for name in result["copied_files"]]), overwrite) as tmp:
            for c in components:
                out = tmp / c.name
                out.mkdir()
                summary = summaries[c.name]
                errors = write_weights(c.ckpt, c.plan, out, reporter, f"convert {c.name}",
                                       non_finite=summary["non_finite"])  # fmt: skip
                for report in summary["layer_reports"]:
                    report["rel_error"] = errors.get(report["name"], 0.0)
                write_config(c.config, c.spec, c.plan, out)
                write_manifest(c.ckpt, c.plan, c.dtype, summary, out)
                c.ckpt.release()
            for name in result["copied_files"]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, tmp / name)
            check_tokenizer(src / "tokenizer", tmp / "tokenizer")
            _write_root_manifest(src, index, components, summaries, result, tmp)
    finally:
        for c in components:
            c.ckpt.release()
    result["non_finite"] = [{**b, "name": f"{n}.{b['name']}"} for n, x in summaries.items() for b in x["non_finite"]]
    result["layer_reports"] = [
        {**r, "name": f"{n}.{r['name']}"} for n, s in summaries.items() for r in s["layer_reports"]
    ]
    return _finish(result, started)


def _files_to_copy(src: Path) -> list[str]:
    """model_index.json, scheduler/ and tokenizer/ files, byte for byte (relative paths)."""
    names = ["model_index.json"]
    for folder in ("scheduler", "tokenizer"):
        names += [str(f.relative_to(src)) for f in sorted((src / folder).iterdir()) if f.is_file()]
    return names


def _merge(components: list[Component], s: dict[str, dict[str, Any]], dst: Path, dtype: str,
           dry_run: bool) -> dict[str, Any]:  # fmt: skip
    """One ConvertResult-shaped summary for the whole pipeline; per-component details under ``components``."""

    def prefixed(key: str, field: str | None = None) -> list[Any]:
        out: list[Any] = []
        for name, summary in s.items():
            for item in summary[key]:
                out.append({**item, field: f"{name}.{item[field]}"} if field else f"{name}.{item}")
        return out

    tensor_dtypes: dict[str, int] = {}
    for summary in s.values():
        for k, v in summary["tensor_dtypes"].items():
            tensor_dtypes[k] = tensor_dtypes.get(k, 0) + v
    unet = next(c for c in components if c.name == "unet")
    after = sum(sum(r["bytes_after"] for r in x["layer_reports"]) for x in s.values())
    params = sum(sum(u.num_parameters for u in c.plan.units if u.candidate) for c in components)
    return {
        "dst": str(dst),
        "model_type": "stable_diffusion",
        "source_format": unet.ckpt.weight_format,
        "dtype": dtype if dtype != "auto" else DTYPE_NAMES[unet.dtype],
        "num_tensors": sum(x["num_tensors"] for x in s.values()),
        "num_parameters": sum(x["num_parameters"] for x in s.values()),
        "total_bytes": sum(x["total_bytes"] for x in s.values()),
        "shards": [{**sh, "file": f"{n}/{sh['file']}"} for n, x in s.items() for sh in x["shards"]],
        "tensor_dtypes": dict(sorted(tensor_dtypes.items())),
        "dropped_tensors": prefixed("dropped_tensors"),
        "quantization": s["unet"]["quantization"],
        "quantized_layers": prefixed("quantized_layers"),
        "skipped_layers": prefixed("skipped_layers", "name"),
        "layer_reports": prefixed("layer_reports", "name"),
        "bits_per_weight": round(8 * after / params, 4) if params else 0.0,
        "bytes_before": sum(x["bytes_before"] for x in s.values()),
        "dequantized_layers": [],
        "float16_overflow": [],
        "estimated_peak_bytes": max(x["estimated_peak_bytes"] for x in s.values()),
        "dry_run": dry_run,
        "components": {
            c.name: {
                "dtype": DTYPE_NAMES[c.dtype],
                "quantization": s[c.name]["quantization"],
                "note": c.note,
                "num_parameters": s[c.name]["num_parameters"],
                "total_bytes": s[c.name]["total_bytes"],
            }
            for c in components
        },
    }


def _write_root_manifest(src: Path, index: dict[str, Any], components: list[Component],
                         summaries: dict[str, dict[str, Any]], result: dict[str, Any], out: Path) -> None:  # fmt: skip
    manifest = {
        "mlxd_version": mlxd_daemon.__version__,
        "model_type": "stable_diffusion",
        "pipeline": index.get("_class_name", ""),
        "source": {"path": str(src.resolve()), "weight_format": result["source_format"]},
        "dtype": result["dtype"],
        "components": result["components"],
        "copied_files": result["copied_files"],
        "peak_rss_bytes": peak_rss_bytes(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
