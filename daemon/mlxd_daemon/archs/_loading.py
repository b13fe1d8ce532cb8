"""Loading helpers shared by the arch modules: JSON files, safetensors shards, dequantization, structure checks.

Nothing here knows an architecture; ``what`` arguments only name it in error messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxd_daemon.errors import InvalidArgument, NotFound

LAYOUT_METADATA_KEY = "mlxd.layout"
C = TypeVar("C")


def read_json(path: Path, what: str = "model") -> dict[str, Any]:
    """Parse a JSON file; ``NotFound``/``InvalidArgument`` with a next step when it is missing or broken."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{path} does not exist: point at a converted {what} directory"
        raise NotFound(msg, reason="FILE_NOT_FOUND", path=str(path)) from None
    except json.JSONDecodeError as e:
        msg = f"{path} is not valid JSON ({e}): re-run the conversion"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=str(path)) from None


def read_config(model_dir: Path, model_type: str, config_class: Callable[[dict[str, Any]], C], what: str) -> C:
    """``model_dir/config.json`` parsed by ``config_class`` (a ``from_dict``); InvalidArgument MODEL_TYPE_MISMATCH
    unless its ``model_type`` is ``model_type``."""
    raw = read_json(Path(model_dir) / "config.json", what)
    if raw.get("model_type") != model_type:
        msg = f"{model_dir} holds model_type {raw.get('model_type')!r}, not {model_type!r}"
        raise InvalidArgument(msg, reason="MODEL_TYPE_MISMATCH", model_type=str(raw.get("model_type")))
    return config_class(raw)


def read_weights(
    model_dir: Path, map_weight: Callable[[str], str | None]
) -> tuple[dict[str, mx.array], dict[str, str] | None, str]:
    """The checkpoint's tensors under ``map_weight``'s names (None drops one), the recorded layout and the
    storage dtype (packed quantized weights are uint32 and not counted; their scales keep the float dtype)."""
    raw, layout = read_safetensors(model_dir)
    weights = {new: v for k, v in raw.items() if (new := map_weight(k)) is not None}
    return weights, layout, storage_dtype(raw)


def read_safetensors(model_dir: Path) -> tuple[dict[str, mx.array], dict[str, str] | None]:
    """All tensors of the (possibly sharded) checkpoint, and the recorded disk layout if any."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = [model_dir / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        msg = f"no *.safetensors in {model_dir}: convert the checkpoint first"
        raise NotFound(msg, reason="WEIGHTS_NOT_FOUND", path=str(model_dir))
    weights: dict[str, mx.array] = {}
    layout: dict[str, str] | None = None
    for f in files:
        try:
            loaded = mx.load(str(f), return_metadata=True)
        except (RuntimeError, ValueError, OSError) as e:  # MLX reports a truncated or corrupt file this way
            msg = f"{f} is not a readable safetensors file ({e}): convert the model again"
            raise InvalidArgument(msg, reason="BAD_CHECKPOINT", path=str(f)) from None
        arrays, meta = cast("tuple[dict[str, mx.array], dict[str, str]]", loaded)
        weights.update(arrays)
        if LAYOUT_METADATA_KEY in meta:
            layout = {**(layout or {}), **json.loads(meta[LAYOUT_METADATA_KEY])}
    manifest = model_dir / "mlxd_manifest.json"
    if manifest.exists():
        # The converter's manifest records the layouts too ("layouts": {name: layout}).
        m = read_json(manifest)
        recorded = m.get("layouts", m.get("layout"))
        if isinstance(recorded, dict):
            layout = {**(layout or {}), **recorded}
    return weights, layout


def storage_dtype(weights: dict[str, mx.array]) -> str:
    """The float dtype holding most elements ("float32", "float16" or "bfloat16")."""
    counts: dict[str, int] = {}
    for v in weights.values():
        if v.dtype in (mx.float32, mx.float16, mx.bfloat16):
            name = str(v.dtype).removeprefix("mlx.core.")
            counts[name] = counts.get(name, 0) + v.size
    return max(counts, key=counts.__getitem__) if counts else "float32"


def check_structure(model: nn.Module, weights: dict[str, mx.array], model_dir: Path, what: str) -> None:
    """Key sets and every shape before any value is loaded, with an error naming the first differences."""
    params = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    expected = {k: tuple(v.shape) for k, v in params}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        )
        if wrong:
            k = wrong[0]
            detail += f" ({k}: {tuple(weights[k].shape)} on disk, model wants {expected[k]})"
        msg = f"weights in {model_dir} do not fit the {what} config: {detail}"
        raise InvalidArgument(
            msg,
            reason="WEIGHTS_MISMATCH",
            missing=len(missing),
            unexpected=len(unexpected),
            wrong_shape=len(wrong),
        )


def require_dir(model_dir: Path) -> Path:
    """``model_dir`` as a Path; NotFound (MODEL_NOT_FOUND) when it is not a directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        msg = f"model directory {model_dir} does not exist"
        raise NotFound(msg, reason="MODEL_NOT_FOUND", path=str(model_dir))
    return model_dir


def fill_model(
    model: nn.Module, weights: dict[str, mx.array], quantization: dict[str, Any] | None, model_dir: Path, what: str
) -> tuple[str, int]:
    """Apply the backend's compute policy, check every name and shape, load and evaluate the weights.

    Returns the compute policy (for ListModels) and the resident bytes of the loaded parameters."""
    from mlxd_daemon.archs._quant import prepare_weights

    weights, compute = prepare_weights(model, weights, quantization)  # CPU: float32; GPU: quantized kernels
    check_structure(model, weights, model_dir, what)
    model.load_weights(list(weights.items()))
    model.eval()
    params = dict(tree_flatten(model.parameters()))
    mx.eval(params)
    return compute, sum(v.nbytes for v in params.values())
