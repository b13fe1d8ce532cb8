"""Python values <-> mlxd.v1 messages: tensors, enum names, quantization specs, sources and images."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_common.hub_ids import looks_like_hub_id

DTYPES = {
    "auto": pb.DTYPE_UNSPECIFIED,
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
QUANT_MODES = {
    "affine": pb.QUANT_MODE_AFFINE,
    "mxfp4": pb.QUANT_MODE_MXFP4,
    "mxfp8": pb.QUANT_MODE_MXFP8,
    "nvfp4": pb.QUANT_MODE_NVFP4,
}


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    """Decode a wire Tensor (little-endian, dense) into a numpy array; an unset one is empty."""
    if not t.dtype:
        return np.zeros((0,), dtype=np.float32)
    return np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(tuple(t.shape))


def numpy_to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encode a numpy array as a wire Tensor (dense, little-endian)."""
    array = np.ascontiguousarray(array, dtype=np.asarray(array).dtype.newbyteorder("<"))
    return pb.Tensor(shape=list(array.shape), dtype=array.dtype.name, data=array.tobytes())


def top_k(logits: np.ndarray, labels: list[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Per row of ``logits`` [n, classes], the ``k`` best (label, probability) pairs; unnamed classes by index."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or not logits.size:
        return []
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    names = labels if len(labels) == logits.shape[1] else [str(i) for i in range(logits.shape[1])]
    order = np.argsort(-probs, axis=1, kind="stable")[:, : max(k, 0)]
    return [[(names[j], float(row[j])) for j in best] for row, best in zip(probs, order, strict=True)]


def source_arg(src: str | Path) -> str:
    """An existing path, made absolute for the daemon; else a string shaped ``org/name[@rev]`` as a hub id."""
    if isinstance(src, str) and not Path(src).exists() and looks_like_hub_id(src):
        return src
    return str(Path(src).resolve())


def enum_value(table: Mapping[str, Any], value: str, what: str) -> Any:
    """``table[value]``; ValueError naming the choices for an unknown name."""
    if value not in table:
        msg = f"unknown {what} {value!r}; choose one of {', '.join(table)}"
        raise ValueError(msg)
    return table[value]


def quant_spec(
    bits: int,
    group_size: int,
    mode: str,
    overrides: Iterable[str] = (),
    recipe: str = "",
    method: str = "",
    calibration_data: str | Path = "",
    calibration_seed: int = 0,
) -> pb.QuantizationSpec:
    """The request's quantization spec (calibration data as an absolute path, the mode by name)."""
    return pb.QuantizationSpec(
        method=method,
        calibration_data=str(Path(calibration_data).resolve()) if calibration_data else "",
        calibration_seed=calibration_seed,
        bits=bits,
        group_size=group_size,
        mode=enum_value(QUANT_MODES, mode, "quant mode"),
        overrides=list(overrides),
        recipe=recipe,
    )


def image_bytes(image: bytes | str | Path) -> bytes:
    """An image's encoded bytes: as given, or read from its file."""
    return image if isinstance(image, bytes) else Path(image).read_bytes()
