"""Plain results <-> protobuf messages: how worker results (dicts) become mlxd.v1 responses."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from mlxd.v1 import mlxd_pb2 as pb

from mlxd_daemon.jobs import Job

DTYPE_NAMES = {
    pb.DTYPE_UNSPECIFIED: "auto",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
DTYPE_ENUMS = {v: k for k, v in DTYPE_NAMES.items()}
QUANT_MODE_NAMES = {
    pb.QUANT_MODE_UNSPECIFIED: "affine",
    pb.QUANT_MODE_AFFINE: "affine",
    pb.QUANT_MODE_MXFP4: "mxfp4",
    pb.QUANT_MODE_MXFP8: "mxfp8",
    pb.QUANT_MODE_NVFP4: "nvfp4",
}
# Infer outputs with a field of their own in InferResponse (read from the proto, not kept by hand).
INFER_TENSORS = tuple(f.name for f in pb.InferResponse.DESCRIPTOR.fields if f.message_type is pb.Tensor.DESCRIPTOR)
PROGRESS_KINDS = {
    "begin": pb.Progress.KIND_BEGIN,
    "report": pb.Progress.KIND_REPORT,
    "end": pb.Progress.KIND_END,
}


JOB_STATES = {"QUEUED": pb.JOB_STATE_QUEUED, "RUNNING": pb.JOB_STATE_RUNNING, "SUCCEEDED": pb.JOB_STATE_SUCCEEDED,
              "FAILED": pb.JOB_STATE_FAILED, "CANCELLED": pb.JOB_STATE_CANCELLED}  # fmt: skip


def job_info(job: Job) -> pb.JobInfo:
    error = job.error or {}
    return pb.JobInfo(
        job_id=job.id, kind=job.kind, state=JOB_STATES[job.state], src=job.src, dst=job.dst,
        created_at_unix=job.created_at, started_at_unix=job.started_at, finished_at_unix=job.finished_at,
        error_code=error.get("code", ""), error_reason=error.get("reason", ""), error_message=error.get("message", ""),
        last_progress=progress_message(job, job.events[-1]) if job.events else None, events=len(job.events),
    )  # fmt: skip


def job_result(job: Job) -> dict[str, Any]:
    """The result oneof for GetJob / WatchJob: a ConvertResult or a ValidationReport."""
    assert job.result is not None
    if job.kind == "validate":
        return {"validation_report": validation_report(job.result, job.dst)}
    return {"convert_result": convert_result(job.result)}


def progress_message(job: Job, event: dict[str, Any]) -> pb.Progress:
    return pb.Progress(
        kind=PROGRESS_KINDS[event["kind"]],
        job_id=job.id,
        stage=event.get("stage", ""),
        items_done=event.get("items_done", 0),
        items_total=event.get("items_total", 0),
        bytes_done=event.get("bytes_done", 0),
        bytes_total=event.get("bytes_total", 0),
        message=event.get("message", ""),
        seq=event.get("seq", 0),
    )


def tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(shape=list(array.shape), dtype=array.dtype.name, data=array.tobytes())


def infer_response(reply: dict[str, Any]) -> pb.InferResponse:
    """An Infer reply: an exported program's outputs (``program``) all into ``outputs``; an architecture's outputs
    with a field there, any other into ``outputs``; ``labels`` (classifiers) as strings."""
    out = reply["outputs"]
    if reply.get("program"):
        named = {k: tensor(v) for k, v in out.items()}
        return pb.InferResponse(model=reply["model"], seconds=reply["seconds"], outputs=named, batch_requests=1)
    fields = {k: tensor(v) for k, v in out.items() if k in INFER_TENSORS}
    others = {k: tensor(np.asarray(v)) for k, v in out.items() if k not in INFER_TENSORS and k != "labels"}
    return pb.InferResponse(model=reply["model"], seconds=reply["seconds"], labels=out.get("labels", []),
                            batch_requests=reply.get("batch", 1), outputs=others, **fields)  # fmt: skip


def convert_result(r: dict[str, Any]) -> pb.ConvertResult:
    q = r.get("quantization")
    modes = {name: num for num, name in QUANT_MODE_NAMES.items() if num != pb.QUANT_MODE_UNSPECIFIED}
    return pb.ConvertResult(
        job_id=r.get("job_id", ""),
        dst=str(r["dst"]),
        model_type=r["model_type"],
        dtype=DTYPE_ENUMS.get(r["dtype"], pb.DTYPE_UNSPECIFIED),
        num_tensors=r["num_tensors"],
        num_parameters=r["num_parameters"],
        total_bytes=r["total_bytes"],
        shards=[pb.ShardInfo(file=s["file"], bytes=s["bytes"], tensors=s["tensors"]) for s in r["shards"]],
        copied_files=r.get("copied_files", []),
        dropped_tensors=r.get("dropped_tensors", []),
        quantization=pb.QuantizationSpec(
            bits=q["bits"],
            group_size=q["group_size"],
            mode=modes.get(q.get("mode", "affine"), pb.QUANT_MODE_AFFINE),
            overrides=q.get("overrides") or [],
            recipe=q.get("recipe") or "",
            method=q.get("method") or "",
            calibration_data=q.get("calibration_data") or "",
            calibration_seed=q.get("calibration_seed") or 0,
        )
        if q
        else None,
        quantized_layers=r.get("quantized_layers", []),
        skipped_layers=[pb.SkippedLayer(name=s["name"], reason=s["reason"]) for s in r.get("skipped_layers", [])],
        seconds=r.get("seconds", 0.0),
        peak_rss_bytes=r.get("peak_rss_bytes", 0),
        dry_run=r.get("dry_run", False),
        layer_reports=[
            pb.LayerQuantReport(
                name=x["name"],
                bits=x["bits"],
                group_size=x["group_size"],
                mode=modes.get(x["mode"], pb.QUANT_MODE_UNSPECIFIED),
                rel_error=x["rel_error"],  # None (unset): a dry run, or a weight holding NaN/Inf
                bytes_before=x["bytes_before"],
                bytes_after=x["bytes_after"],
                note=x.get("reason") or "",
            )
            for x in r.get("layer_reports", [])
        ],
        bits_per_weight=r.get("bits_per_weight", 0.0),
        bytes_before=r.get("bytes_before", 0),
        hub_source=pb.HubSource(**r["hub"]) if r.get("hub") else None,
        non_finite=[non_finite_tensor(b) for b in r.get("non_finite", [])],
        path=r.get("path", ""),
        config_fixes=r.get("config_fixes", []),
    )


def non_finite_tensor(b: dict[str, Any]) -> pb.NonFiniteTensor:
    return pb.NonFiniteTensor(
        name=b["name"], nan_count=b["nan"], inf_count=b["inf"], first_index=b["first_index"], note=b.get("note", "")
    )


def _number(value: float | None, missing: float = math.nan) -> float:
    """A metric for a double field: None (not computable, e.g. from NaN outputs) travels as NaN."""
    return missing if value is None else float(value)


def validation_report(r: dict[str, Any], model_dir: str) -> pb.ValidationReport:
    keys = ("max_abs", "max_rel", "cosine", "nmse", "atol", "rtol")
    outputs = [
        pb.OutputReport(name=o["name"], **{k: _number(o[k]) for k in keys}, passed=o["passed"], note=o.get("note", ""))
        for o in r["outputs"]
    ]
    layers = [
        pb.LayerReport(name=x["name"], rel_error=_number(x["rel_error"]), max_abs=_number(x["max_abs"]),
                       cosine=_number(x["cosine"]), tolerance=x["tolerance"], passed=x["passed"], note=x["note"])
        for x in r.get("layers", [])
    ]  # fmt: skip
    return pb.ValidationReport(
        job_id=r.get("job_id", ""),
        passed=r["passed"],
        model_type=r["model_type"],
        dtype=str(r["dtype"]),
        outputs=outputs,
        matching_agreement=r.get("matching_agreement"),  # None: not measured, the field stays unset
        num_texts=r.get("num_texts", 0),
        num_images=r.get("num_images", 0),
        seconds=r.get("seconds", 0.0),
        report_path=os.path.join(model_dir, "validation.json"),
        layers=layers,
        first_divergent_layer=r.get("first_divergent_layer", ""),
        band=r.get("band", ""),
        reference_hub=pb.HubSource(**r["reference_hub"]) if r.get("reference_hub") else None,
        agreement=flat_agreement(r.get("agreement") or {}),
        inputs_note=r.get("inputs_note", ""),
    )


def cached_models(r: dict[str, Any], offline: bool) -> pb.ListCachedModelsResponse:
    """The models worker's view of the hub cache (``hub.cached_models`` plus support) as a response."""
    return pb.ListCachedModelsResponse(
        cache_dir=r["cache_dir"], models=[pb.CachedModel(**m) for m in r["models"]], offline=offline
    )


def flat_agreement(agreement: dict[str, Any]) -> dict[str, float]:
    """Validation agreement numbers as one flat map (per-router routing as ``routing:<path>``)."""
    flat = {k: float(v) for k, v in agreement.items() if isinstance(v, int | float)}
    flat.update({f"routing:{k}": float(v) for k, v in agreement.get("routing_per_router", {}).items()})
    return flat
