"""Architecture registry: one module per Hugging Face ``model_type``; the module *is* the registration.

An arch module provides (see ``clip.py`` for the reference implementation):
  - ``map_weight(name) -> str | None``: source (HF) tensor name -> MLX name on disk, ``None`` to drop.
  - ``DISK_LAYOUT``: ``{mlx_name: layout}`` for tensors stored in a non-MLX layout (recorded in metadata).
  - ``load(model_dir) -> bundle`` for inference, and the validation hooks.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mlxd_daemon.errors import Unsupported

# HF model_type aliases that share an implementation.
MODEL_REMAPPING: dict[str, str] = {"mistral": "llama", "qwen2": "llama"}

SUPPORTED: tuple[str, ...] = ("bert", "clip", "llama", "mistral", "mlxd_program", "qwen2", "vit")


def get_arch(model_type: str) -> ModuleType:
    """Return the arch module for ``model_type`` or raise ``Unsupported`` naming what is supported."""
    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        return importlib.import_module(f"mlxd_daemon.archs.{name}")
    except ModuleNotFoundError as e:
        # A missing dependency inside the arch module is a real error, not an unsupported architecture.
        if e.name != f"mlxd_daemon.archs.{name}":
            raise
    msg = f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
    raise Unsupported(msg, reason="UNSUPPORTED_ARCHITECTURE", model_type=model_type)
