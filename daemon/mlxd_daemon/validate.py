"""Compare an MLX conversion against its PyTorch reference, output by output.

Generic: the architecture module (``mlxd_daemon.archs.<model_type>``) supplies ``golden_inputs``,
``run_reference``, ``load`` and ``run_mlx``; this module only compares named float arrays and writes
``validation.json``. No protobuf here: the servicer translates the returned dict.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlxd_daemon.archs import get_arch
from mlxd_daemon.archs.contract import optional, sample_counts
from mlxd_daemon.errors import InvalidArgument, MlxdError, NotFound
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.taps import mlx_taps, torch_taps

NON_FINITE = "non-finite values"  # how a note starts when an output or layer holds NaN/Inf
REL_EPS_FRACTION = 1e-3
"""``max_rel`` divides by ``|ref| + eps`` with ``eps = REL_EPS_FRACTION * rms(ref)``, so elements near zero do
not turn a tiny absolute error into a huge relative one. ``max_rel`` is reported, not gated on."""


@dataclass(frozen=True)
class Tolerance:
    """Pass iff ``|cand - ref| <= atol + rtol * |ref|`` everywhere and flattened cosine >= ``min_cosine``."""

    atol: float
    rtol: float
    min_cosine: float = 0.0


def _band(embeds: Tolerance, logits: Tolerance, hidden: Tolerance) -> dict[str, Tolerance]:
    return {"embeds": embeds, "logits": logits, "hidden": hidden}


# Keyed on the dtype the MLX weights are stored in (compute is always float32). Output classes: "embeds" are
# L2-normalised (|x| <= 1); "logits" are cosines * exp(logit_scale) (up to 100); "hidden" are raw activations.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # Same weights, float32 on both sides: only summation order differs (~1e-6 measured on tiny CLIP).
    "float32": _band(Tolerance(1e-4, 1e-3, 0.99999), Tolerance(1e-2, 1e-3, 0.99999), Tolerance(1e-3, 1e-3, 0.9999)),
    # float32 on a GPU: MLX's CUDA matmuls run in TF32 (10-bit mantissa); measured on an H200: per-layer 6e-4,
    # embeddings max abs 7e-4, hidden states 2.6e-3 on tiny CLIP.
    "float32_gpu": _band(Tolerance(3e-3, 1e-2, 0.9999), Tolerance(5e-2, 1e-2, 0.9999), Tolerance(1e-2, 5e-2, 0.9999)),
    # fp16 rounds each weight by up to 2^-11 relative; the errors add up over layers to ~1e-3 on embeddings.
    "float16": _band(Tolerance(5e-3, 1e-2, 0.9995), Tolerance(0.5, 1e-2, 0.9995), Tolerance(5e-2, 5e-2, 0.999)),
    # bf16 keeps 8 mantissa bits (2^-9 relative rounding), ~8x fp16's error.
    "bfloat16": _band(Tolerance(3e-2, 5e-2, 0.995), Tolerance(2.0, 5e-2, 0.995), Tolerance(0.3, 0.1, 0.99)),
    # Affine quantization: per-group step = range / (2^bits - 1); gate mainly on cosine, elementwise is coarse
    "q8": _band(Tolerance(5e-2, 0.1, 0.99), Tolerance(3.0, 0.1, 0.99), Tolerance(0.5, 0.2, 0.98)),
    "q6": _band(Tolerance(0.1, 0.2, 0.98), Tolerance(5.0, 0.2, 0.98), Tolerance(1.0, 0.3, 0.95)),
    "q4": _band(Tolerance(0.25, 0.5, 0.9), Tolerance(10.0, 0.5, 0.9), Tolerance(2.0, 0.5, 0.85)),
    "q3": _band(Tolerance(0.5, 1.0, 0.8), Tolerance(20.0, 1.0, 0.8), Tolerance(4.0, 1.0, 0.7)),
}


# Per-layer bound on ||mlx - torch|| / ||torch|| of each layer's output, by the same bands. Errors grow with
# depth, so these sit above what a correct conversion reaches at its last layer (measured on tiny and base CLIP).
LAYER_REL_TOL: dict[str, float] = {
    "float32": 1e-4, "float32_gpu": 3e-3, "float16": 5e-3, "bfloat16": 4e-2,
    "q8": 5e-2, "q6": 0.1, "q4": 0.3, "q3": 0.6,
}  # fmt: skip


def compare_layers(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tol: float
) -> list[dict[str, Any]]:
    """Per-layer relative error in forward order (the candidate's tap order); unpaired layers are listed too, and
    a layer whose output holds NaN/Inf on either side fails with a note saying which side."""
    layers = []
    for name, got in candidate.items():
        ref = reference.get(name)
        if ref is None or ref.shape != got.shape:
            why = "no PyTorch module of this name" if ref is None else f"shape {got.shape} vs {ref.shape}"
            layers.append({"name": name, "rel_error": math.inf, "max_abs": math.inf, "cosine": 0.0,
                           "tolerance": tol, "passed": False, "note": why})  # fmt: skip
            continue
        a, b = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        diff = a - b
        norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        rel = float(np.linalg.norm(diff)) / max(norm_b, 1e-30)
        cos = float(a @ b) / max(norm_a * norm_b, 1e-30)
        note = non_finite_note(ref, got)
        layers.append({"name": name, "rel_error": rel, "max_abs": float(np.abs(diff).max(initial=0.0)), "cosine": cos,
                       "tolerance": tol, "passed": bool(np.isfinite(rel) and rel <= tol and not note),
                       "note": note})  # fmt: skip
    return layers


def non_finite_note(reference: np.ndarray, candidate: np.ndarray) -> str:
    """Which side holds NaN/Inf values (and how many), or "" when both are finite."""
    sides = [(what, int(x.size - np.isfinite(x).sum())) for what, x in (("MLX", candidate), ("PyTorch", reference))]
    bad = [f"{what} {n}" for what, n in sides if n]
    return f"{NON_FINITE} (NaN/Inf count: {', '.join(bad)})" if bad else ""


# Microscaling float modes err like these affine widths (measured on tiny CLIP: mxfp8 ~ 6-bit, mx/nvfp4 ~ 4-bit).
MODE_BANDS = {"mxfp8": "q6", "mxfp4": "q4", "nvfp4": "q4"}


def band_name(dtype: str, bits: int | None = None, source_dtype: str | None = None, mode: str = "affine") -> str:
    """Which ``TOLERANCES`` row applies: quantized by mode and bits, else the stored dtype.

    When the source checkpoint already had the stored dtype, the weights are bit-identical after upcasting,
    so the float32 row applies.
    """
    if bits and mode in MODE_BANDS:
        return MODE_BANDS[mode]
    if bits:
        return "q8" if bits >= 8 else "q6" if bits >= 5 else "q4" if bits == 4 else "q3"
    if dtype not in TOLERANCES:
        msg = f"no tolerance band for stored dtype {dtype!r}; known: float32, float16, bfloat16"
        raise InvalidArgument(msg, reason="UNKNOWN_DTYPE", dtype=dtype)
    band = "float32" if source_dtype == dtype else dtype
    if band == "float32" and _on_gpu():
        return "float32_gpu"
    return band


def _on_gpu() -> bool:
    """MLX computes on a GPU here (Metal or CUDA), where float32 matmuls may run in TF32."""
    import mlx.core as mx

    return bool(mx.default_device() == mx.gpu)


def tolerance_for(name: str, band: dict[str, Tolerance]) -> Tolerance:
    """The band entry for an output name: ``*logits*``, ``*embed*``, else hidden-state tolerances."""
    if "logits" in name:
        return band["logits"]
    if "embed" in name:
        return band["embeds"]
    return band["hidden"]


@dataclass(frozen=True)
class OutputReport:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    nmse: float
    atol: float
    rtol: float
    min_cosine: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (non-finite metrics become ``None``)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max_abs, max_rel, cosine (flattened) and nmse = sum((c - r)^2) / sum(r^2), all in float64."""
    r = np.asarray(reference, np.float64).ravel()
    c = np.asarray(candidate, np.float64).ravel()
    if r.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0, "nmse": 0.0}
    diff = np.abs(c - r)
    eps = REL_EPS_FRACTION * math.sqrt(float(np.mean(r * r))) + 1e-30
    rn, cn = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    cosine = float(np.dot(r, c) / (rn * cn)) if rn and cn else float(rn == cn)
    energy = float(np.sum(r * r))
    sq_err = float(np.sum(diff * diff))
    return {
        "max_abs": float(diff.max()),
        "max_rel": float((diff / (np.abs(r) + eps)).max()),
        "cosine": cosine,
        # All-zero reference: fall back to plain MSE so the number stays finite.
        "nmse": sq_err / energy if energy > 0 else sq_err / r.size,
    }


def _report(name: str, tol: Tolerance, m: dict[str, float] | None, passed: bool, note: str) -> OutputReport:
    nan = float("nan")
    m = m or {}
    return OutputReport(
        name=name,
        max_abs=m.get("max_abs", nan),
        max_rel=m.get("max_rel", nan),
        cosine=m.get("cosine", nan),
        nmse=m.get("nmse", nan),
        atol=tol.atol,
        rtol=tol.rtol,
        min_cosine=tol.min_cosine,
        passed=passed,
        note=note,
    )


def compare(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tolerances: dict[str, Tolerance]
) -> list[OutputReport]:
    """One report per reference output (in the reference's order); shapes are checked before values.

    ``tolerances`` maps an output name to its ``Tolerance``; names not in it use ``tolerances["*"]`` if
    present, else the float32 band's entry for that kind of output.
    """
    reports = []
    for name, ref_raw in reference.items():
        tol = tolerances.get(name) or tolerances.get("*") or tolerance_for(name, TOLERANCES["float32"])
        ref = np.asarray(ref_raw)
        cand = np.asarray(candidate[name]) if name in candidate else None
        if cand is None or ref.shape != cand.shape:
            note = "missing from the MLX outputs" if cand is None else f"shape {cand.shape} != reference {ref.shape}"
            reports.append(_report(name, tol, None, False, note))
            continue
        m = metrics(ref, cand)
        note = non_finite_note(ref, cand)
        close = bool(np.allclose(cand.astype(np.float64), ref.astype(np.float64), atol=tol.atol, rtol=tol.rtol))
        passed = not note and close and m["cosine"] >= tol.min_cosine
        reports.append(_report(name, tol, m, passed, note))
    return reports


def matching_agreement(ref_logits: np.ndarray, cand_logits: np.ndarray) -> float | None:
    """Fraction of rows (images) whose best column (text) is the same; None when there is nothing to match (no
    rows or columns) or a row holds NaN/Inf (its argmax means nothing)."""
    ref_logits, cand_logits = np.asarray(ref_logits), np.asarray(cand_logits)
    if ref_logits.ndim != 2 or ref_logits.shape != cand_logits.shape:
        msg = f"logits shapes {ref_logits.shape} and {cand_logits.shape} must be equal and 2-D"
        raise InvalidArgument(msg, reason="BAD_LOGITS")
    if ref_logits.size == 0 or not (np.isfinite(ref_logits).all() and np.isfinite(cand_logits).all()):
        return None
    return float(np.mean(ref_logits.argmax(axis=1) == cand_logits.argmax(axis=1)))


def _config(model_dir: Path, role: str) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir() or not path.exists():
        msg = f"{role} directory {model_dir} does not exist or has no config.json"
        raise NotFound(msg, reason=f"{role.upper()}_NOT_FOUND", path=str(model_dir))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        msg = f"{path} is not valid JSON ({e})"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=str(path)) from None


def _summarise_in_manifest(mlx_dir: Path, result: dict[str, Any]) -> None:
    """Record the verdict in mlxd_manifest.json (when the directory has one), next to how it was made."""
    path = mlx_dir / "mlxd_manifest.json"
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    # Metrics of non-finite outputs are None: such an output is the worst, and has no cosine to take the min of.
    # atol 0: an output judged otherwise (a pipeline's image, by PSNR), not by an elementwise bound.
    worst = max(result["outputs"], key=lambda o: math.inf if o["max_abs"] is None else
                o["max_abs"] / o["atol"] if o["atol"] else 0.0, default=None)  # fmt: skip
    cosines = [o["cosine"] for o in result["outputs"] if o["cosine"] is not None]
    manifest["validation"] = {
        "passed": result["passed"], "band": result["band"], "first_divergent_layer": result["first_divergent_layer"],
        "min_cosine": min(cosines) if len(cosines) == len(result["outputs"]) and cosines else None,
        "worst_output": worst["name"] if worst else "", "report": "validation.json",
        "validated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def validate_model(
    src_dir: Path,
    mlx_dir: Path,
    *,
    texts: list[str] | None = None,
    images: list[Any] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    reporter: Reporter = NULL_REPORTER,
) -> dict[str, Any]:
    """Run the PyTorch reference and the MLX model on the same inputs; compare; write ``validation.json``.

    ``arrays`` (e.g. from a user's .npz) replace the architecture's prepared inputs of the same names (its
    ``golden_inputs`` arrays, as HF processors name them); unknown names are refused.

    Returns a JSON-able dict: passed, model_type, dtype, band, outputs (one dict per output),
    matching_agreement, num_texts, num_images, seconds.
    """
    start = time.perf_counter()
    src_dir, mlx_dir = Path(src_dir), Path(mlx_dir)
    mlx_cfg = _config(mlx_dir, "mlx")
    model_type = mlx_cfg.get("model_type")
    arch = get_arch(str(model_type))
    # An exported program's reference is a .pt2, an HF directory of another model_type, or the program itself.
    src_cfg = {"model_type": model_type} if optional(arch, "ANY_REFERENCE") else _config(src_dir, "source")
    if src_cfg.get("model_type") != model_type:
        msg = (
            f"source is model_type {src_cfg.get('model_type')!r} but the MLX model is {model_type!r}: "
            "pass the checkpoint this model was converted from"
        )
        raise InvalidArgument(
            msg, reason="MODEL_TYPE_MISMATCH", source=str(src_cfg.get("model_type")), mlx=str(model_type)
        )

    inputs = arch.golden_inputs(mlx_dir, texts=texts, images=images)
    if arrays:
        unknown = sorted(set(arrays) - {k for k, v in inputs.items() if isinstance(v, np.ndarray)})
        if unknown:
            names = sorted(k for k, v in inputs.items() if isinstance(v, np.ndarray))
            msg = f"input arrays {unknown} are not inputs of {model_type}; it takes {names}"
            raise InvalidArgument(msg, reason="BAD_INPUTS", unknown=",".join(unknown))
        inputs.update(arrays)
    reporter.begin("mlx", total_items=1, message=f"MLX on {mlx_dir}")
    bundle = arch.load(mlx_dir)
    with mlx_taps() as tapped:
        candidate = arch.run_mlx(bundle, inputs)
    mlx_layers = {name: np.array(x) for name, x in tapped.items()}
    reporter.report(1)
    reporter.end()

    reporter.begin("reference", total_items=1, message=f"transformers on {src_dir}")
    try:
        with torch_taps(list(mlx_layers)) as ref_layers:
            reference = arch.run_reference(src_dir, inputs)
    except MlxdError:
        raise
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...) for a bad checkpoint
        msg = f"the PyTorch reference could not run on {src_dir}: {e}"
        raise InvalidArgument(msg, reason="REFERENCE_FAILED", path=str(src_dir)) from e
    reporter.report(1)
    reporter.end()

    # "_"-prefixed outputs (e.g. greedy continuations) are not compared numerically; the arch's agreement uses them.
    extras = {k: reference.pop(k) for k in list(reference) if k.startswith("_")}
    extras_mlx = {k: candidate.pop(k) for k in list(candidate) if k.startswith("_")}
    reporter.begin("compare", total_items=len(reference))
    dtype = getattr(bundle, "dtype", "float32")
    quantization = getattr(bundle, "quantization", None) or {}
    bits, mode = quantization.get("bits"), quantization.get("mode", "affine")
    source_dtype = src_cfg.get("dtype") or src_cfg.get("torch_dtype")
    band = band_name(dtype, bits, source_dtype, mode)
    tolerances = {name: tolerance_for(name, TOLERANCES[band]) for name in reference}
    reports = compare(reference, candidate, tolerances)
    reporter.report(len(reports))
    agreement = None  # measured only where there is something to match
    matched = optional(arch, "MATCHING_OUTPUT")
    if matched in candidate and np.ndim(reference.get(matched)) == 2:
        agreement = matching_agreement(reference[matched], candidate[matched])
    agree: dict[str, Any] = {}
    if (arch_agreement := optional(arch, "agreement")) is not None:
        ref_all, cand_all = {**reference, **extras}, {**candidate, **extras_mlx}
        agree = arch_agreement(ref_all, cand_all, inputs, ref_layers, mlx_layers)
        agreement = agree.get("top1_agreement", agreement)
    reporter.end()

    # An arch may raise the per-layer floor for differences it cannot avoid (see decoder.LAYER_REL_TOL_FLOOR).
    layers = compare_layers(ref_layers, mlx_layers, max(LAYER_REL_TOL[band], optional(arch, "LAYER_REL_TOL_FLOOR")))
    first_bad = next((layer["name"] for layer in layers if not layer["passed"]), "")
    num_texts, num_images = sample_counts(inputs)
    first_non_finite = next((layer for layer in layers if layer["note"].startswith(NON_FINITE)), None)
    if first_non_finite is not None:  # name where the NaN/Inf first appear, next to each output they reach
        where = f"; first layer with NaN/Inf: {first_non_finite['name']} ({first_non_finite['note']})"
        reports = [replace(r, note=r.note + where) if r.note.startswith(NON_FINITE) else r for r in reports]
    result = {
        "passed": all(r.passed for r in reports) and not first_bad,
        "layers": layers,
        "first_divergent_layer": first_bad,
        "model_type": model_type,
        "dtype": dtype,
        "quantization_bits": bits,
        "band": band,
        "outputs": [r.to_dict() for r in reports],
        # Reported, not gated: near-tied random-weight logits can swap order within tolerance. None: not measured.
        "matching_agreement": agreement,
        "agreement": agree,
        "num_texts": num_texts,
        "num_images": num_images,
        "seconds": round(time.perf_counter() - start, 3),
        "inputs_note": inputs.get("inputs_note", ""),
    }
    (mlx_dir / "validation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    _summarise_in_manifest(mlx_dir, result)
    return result
