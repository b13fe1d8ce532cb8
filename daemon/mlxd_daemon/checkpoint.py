"""Reading a local Hugging Face checkpoint lazily: config, weights, index cross-check, one tensor at a time.

Nothing here loads all weights: safetensors headers give names, dtypes and shapes; ``.bin`` files are opened
with ``torch.load(..., weights_only=True, mmap=True)`` so tensor data stays on disk until a tensor is read.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mlxd_daemon.errors import InvalidArgument, NotFound

# (index file, single file, format), in order of preference: safetensors needs no unpickling.
WEIGHT_FILES: tuple[tuple[str, str, str], ...] = (
    ("model.safetensors.index.json", "model.safetensors", "safetensors"),
    # diffusers components (unet/, vae/) name their weights diffusion_pytorch_model.*
    ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin"),
    ("diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin", "bin"),
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a source tensor without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str
    offset: int | None = None  # where its bytes start in ``file`` (safetensors), so blocks can be read by position

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    """A source checkpoint: ``tensors`` maps every source tensor name to its ``TensorInfo``."""

    path: Path
    config: dict[str, Any]
    weight_format: str
    weight_files: list[str]
    index_file: str | None
    tensors: dict[str, TensorInfo]
    _open: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. It may still be backed by the mapped file: copy it before keeping it."""
        info = self.tensors[name]
        handle: Any = self._open.get(info.file)
        if handle is None:
            path = self.path / info.file
            handle = _open_safetensors(path) if self.weight_format == "safetensors" else _load_bin(path)
            self._open[info.file] = handle
        if self.weight_format == "safetensors":
            return handle.get_tensor(name)
        return handle[name]

    def release(self) -> None:
        """Drop open files so their mapped pages stop counting against this process."""
        self._open.clear()


def read_config(src: Path) -> dict[str, Any]:
    """Return ``src/config.json``; errors: SOURCE_NOT_FOUND, NO_CONFIG, BAD_CONFIG, NO_MODEL_TYPE."""
    if not src.is_dir():
        msg = f"source {src} does not exist or is not a directory: pass a local Hugging Face model directory"
        raise NotFound(msg, reason="SOURCE_NOT_FOUND", path=src)
    path = src / "config.json"
    if not path.is_file():
        msg = f"{src} has no config.json: it does not look like a Hugging Face model directory"
        raise InvalidArgument(msg, reason="NO_CONFIG", path=src)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{path} is not valid JSON: {e}"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=path) from e
    if not isinstance(config, dict) or not config.get("model_type"):
        msg = f"{path} has no model_type: cannot tell which architecture this is"
        raise InvalidArgument(msg, reason="NO_MODEL_TYPE", path=path)
    return config


def find_weights(src: Path) -> tuple[str, str, list[str] | None]:
    """Return (format, weights file or index file, None | indexed shard list) for the preferred weights."""
    for index_name, single_name, fmt in WEIGHT_FILES:
        if (src / index_name).is_file():
            return fmt, index_name, None
        if (src / single_name).is_file():
            return fmt, single_name, [single_name]
    looked_for = ", ".join(name for row in WEIGHT_FILES for name in row[:2])
    msg = f"no weights in {src}: looked for {looked_for}"
    raise InvalidArgument(msg, reason="NO_WEIGHTS", path=src)


def open_checkpoint(src: Path, config: dict[str, Any]) -> Checkpoint:
    """Find the weights in ``src``, read every tensor's name/dtype/shape and cross-check the index."""
    fmt, first, files = find_weights(src)
    weight_map: dict[str, str] | None = None
    if files is None:
        weight_map = _read_index(src / first)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            msg = f"{first} names shard files that are missing: {_preview(missing)}"
            raise InvalidArgument(msg, reason="INDEX_MISMATCH", missing_files=",".join(missing))
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in _scan_file(src / file, fmt):
            if info.name in tensors:
                msg = f"tensor {info.name} appears in both {tensors[info.name].file} and {file}"
                raise InvalidArgument(msg, reason="DUPLICATE_TENSOR", tensor=info.name)
            tensors[info.name] = info
    if weight_map is not None:
        _cross_check(first, weight_map, tensors)
    return Checkpoint(src, config, fmt, files, first if weight_map is not None else None, tensors)


def dominant_float_dtype(tensors: dict[str, TensorInfo]) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes (float32 if there are no float tensors)."""
    by_dtype: dict[torch.dtype, int] = {}
    for info in tensors.values():
        if info.dtype.is_floating_point:
            by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else torch.float32


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        msg = f"{path.name} is not a valid index (expected a JSON object with a weight_map): {e}"
        raise InvalidArgument(msg, reason="BAD_INDEX", path=path) from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        msg = f"{path.name}: weight_map must map tensor names to shard file names"
        raise InvalidArgument(msg, reason="BAD_INDEX", path=path)
    return weight_map


def _cross_check(index_name: str, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    # A tensor indexed under one shard but found in another still counts as missing from where the index says.
    missing = sorted(n for n, f in weight_map.items() if n not in tensors or tensors[n].file != f)
    unindexed = sorted(n for n in tensors if n not in weight_map)
    problems = []
    if missing:
        problems.append(f"tensors listed in the index but missing from their shard: {_preview(missing)}")
    if unindexed:
        problems.append(f"tensors in the shards but missing from the index: {_preview(unindexed)}")
    if problems:
        msg = f"{index_name} does not match the shard files; " + "; ".join(problems)
        raise InvalidArgument(
            msg, reason="INDEX_MISMATCH", missing=",".join(missing[:50]), unindexed=",".join(unindexed[:50])
        )


def _scan_file(path: Path, fmt: str) -> list[TensorInfo]:
    if fmt == "safetensors":
        reader = _open_safetensors(path)
        return [
            TensorInfo(name, _st_dtype(entry["dtype"], path), tuple(entry["shape"]), path.name,
                       reader.data_start + entry["data_offsets"][0])
            for name, entry in reader.header.items()
            if name != "__metadata__"
        ]  # fmt: skip
    state = _load_bin(path)
    return [TensorInfo(n, t.dtype, tuple(t.shape), path.name) for n, t in state.items()]


def _st_dtype(code: str, path: Path) -> torch.dtype:
    if code not in SAFETENSORS_DTYPES:
        msg = f"{path.name}: tensor dtype {code} is not supported"
        raise InvalidArgument(msg, reason="UNSUPPORTED_TENSOR_DTYPE", dtype=code)
    return SAFETENSORS_DTYPES[code]


def _open_safetensors(path: Path) -> SafetensorsReader:
    try:
        with safe_open(str(path), framework="pt"):  # validates the header against the file size
            pass
        return SafetensorsReader(path)
    except (SafetensorError, OSError, ValueError) as e:
        msg = f"{path.name} is not a readable safetensors file: {e}"
        raise InvalidArgument(msg, reason="BAD_CHECKPOINT", path=path) from e


class SafetensorsReader:
    """Reads one tensor at a time into its own buffer with plain file reads, never mapping the file: mapped pages
    would count as this process's memory until unmapped, so a large shard would look resident (mlx-lm#876)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            self.header: dict[str, Any] = json.loads(f.read(size))
        self.data_start = 8 + size

    def get_tensor(self, name: str) -> torch.Tensor:
        """A fresh tensor that owns its memory."""
        shape = tuple(self.header[name]["shape"])
        return self.get_rows(name, 0, shape[0]) if shape else self._read(name, (), 0, None)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), read without touching the others."""
        shape = tuple(self.header[name]["shape"])
        return self._read(name, (stop - start, *shape[1:]), start, stop)

    def _read(self, name: str, shape: tuple[int, ...], start: int, stop: int | None) -> torch.Tensor:
        entry = self.header[name]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if stop is not None:  # row slice: rows are contiguous in C order
            row = (end - begin) // max(1, entry["shape"][0])
            begin, end = begin + start * row, begin + stop * row
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled, unlike bytearray
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            if f.readinto(raw.numpy().data) != end - begin:
                msg = f"{self.path.name} ends inside tensor {name}: the file is truncated"
                raise InvalidArgument(msg, reason="BAD_CHECKPOINT", path=self.path)
        return raw.view(dtype).reshape(shape)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch pickle without executing code; tensors stay memory-mapped when the format allows."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # Legacy (pre-zip) files cannot be mmap'd; weights_only still guards the unpickling.
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = (
            f"{path.name} needs code execution to load (weights_only refused it), so it was not loaded: "
            "convert it to safetensors in a trusted environment first"
        )
        raise InvalidArgument(msg, reason="UNSAFE_PICKLE", path=path) from e
    except Exception as e:
        msg = f"{path.name} is not a readable PyTorch checkpoint: {e}"
        raise InvalidArgument(msg, reason="BAD_CHECKPOINT", path=path) from e
    if not isinstance(state, dict):
        msg = f"{path.name} holds a {type(state).__name__}, expected a state dict of tensors"
        raise InvalidArgument(msg, reason="BAD_CHECKPOINT", path=path)
    # Non-tensor entries (e.g. a saved step counter) are not weights.
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _preview(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
