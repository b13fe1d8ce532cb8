"""The small files beside the weights: config.json (with mlx-lm's ``quantization`` entry) and the manifest that
records where a conversion came from and what it did."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import torch

import mlxd_daemon
from mlxd_daemon.checkpoint import Checkpoint
from mlxd_daemon.quantize import QuantSpec, config_entry
from mlxd_daemon.shards import DTYPE_NAMES, Plan

MANIFEST = "mlxd_manifest.json"
_HASH_LIMIT = 64 << 20  # sha256 only for small files; hashing multi-GB weights would double the run time.
_MANIFEST_RESULT_KEYS = (
    "quantization", "skipped_layers", "layer_reports", "bits_per_weight", "bytes_before", "non_finite"
)  # fmt: skip


def write_config(config: dict[str, Any], spec: QuantSpec | None, plan: Plan, out: Path) -> None:
    """config.json with mlx-lm's ``quantization`` (defaults + per-layer entries that differ), also copied to
    ``quantization_config`` (the key transformers-style loaders look for); float layers are absent."""
    config = dict(config)
    if spec is not None:
        layers = {u.target.removesuffix(".weight"): p for u in plan.units if (p := u.params) is not None}
        entry = config_entry(spec.default, layers)
        config["quantization"] = entry
        config["quantization_config"] = dict(entry)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_manifest(ckpt: Checkpoint, plan: Plan, dtype: torch.dtype, result: dict[str, Any], out: Path) -> None:
    copied = result["copied_files"]
    names = ["config.json", *([ckpt.index_file] if ckpt.index_file else []), *ckpt.weight_files, *copied]
    files = []
    for name in names:
        path = ckpt.path / name
        entry: dict[str, Any] = {"name": name, "bytes": path.stat().st_size}
        if name not in ckpt.weight_files and entry["bytes"] <= _HASH_LIMIT:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        files.append(entry)
    import safetensors

    manifest = {
        "mlxd_version": mlxd_daemon.__version__,
        "versions": {
            "mlx": getattr(mx, "__version__", ""),
            "torch": torch.__version__,
            "safetensors": getattr(safetensors, "__version__", ""),
        },
        # hub: the Hugging Face Hub id, revision and commit the source snapshot came from (None for a directory)
        "source": {
            "path": str(ckpt.path.resolve()),
            "weight_format": ckpt.weight_format,
            "files": files,
            "hub": result.get("hub"),
        },
        "model_type": ckpt.model_type,
        "dtype": DTYPE_NAMES[dtype],
        "tensor_dtypes": result.get("tensor_dtypes", {}),
        "layouts": plan.layouts,
        "dropped_tensors": plan.dropped,
        **{k: result[k] for k in _MANIFEST_RESULT_KEYS},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
