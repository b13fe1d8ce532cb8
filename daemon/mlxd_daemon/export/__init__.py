"""Any PyTorch model -> an MLX program: ``torch.export`` graph, core ATen ops mapped to MLX, run by an interpreter.

``capture`` (export + decompose + op check) → ``lower`` (graph → JSON nodes, conv weights channels-last) →
``api.export_program`` (atomic write of the program directory, ``program`` describes the format) →
``archs/mlxd_program.py`` (load, run, validate). ``ops`` is the op table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on access by __getattr__ below
    from mlxd_daemon.export.api import convert_via_export, export_program, maybe_export

__all__ = ["convert_via_export", "export_program", "maybe_export"]


def __getattr__(name: str) -> Any:
    # Lazy: the submodules import torch and mlx, and import each other through this package.
    if name in __all__:
        from mlxd_daemon.export import api

        return getattr(api, name)
    raise AttributeError(name)
