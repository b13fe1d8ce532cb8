"""The contract an architecture module satisfies (structural: a module is checked with ``isinstance``).

mlxd's own modules (``clip``, ``bert``, ``vit``, ``mlxd_program``) and ``decoder`` (every mlx-lm model type)
provide these names; the registry (``archs.resolve``) finds a new module by its file, and Convert, Validate and
the models worker use nothing else of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Bundle(Protocol):
    """A loaded model as the models worker keeps it resident."""

    nbytes: int  # resident bytes of its parameters (the residency budget counts these)
    dtype: str  # stored float dtype
    compute_dtype: str  # what compute runs in on this backend (ListModels shows it)

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, np.ndarray]:
        """Infer: named outputs for the texts and images (or a domain error saying what to use instead)."""
        ...


@runtime_checkable
class ArchModule(Protocol):
    """What Convert (weight mapping), the models worker (``load``) and Validate (the hooks) use."""

    DISK_LAYOUT: dict[str, str]  # tensors stored in a non-MLX layout, recorded in the manifest

    def map_weight(self, name: str) -> str | None:
        """Source tensor name → name on disk; None drops it."""
        ...

    def load(self, model_dir: Path) -> Any:
        """A ``Bundle`` for the converted directory."""
        ...

    def golden_inputs(self, model_dir: Path, *, texts: Any = None, images: Any = None) -> dict[str, Any]:
        """Validation inputs (the caller's texts/images, else built-in ones)."""
        ...

    def run_reference(self, src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The PyTorch reference's named outputs on ``inputs`` (taps hook the same module paths)."""
        ...

    def run_mlx(self, bundle: Any, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The MLX model's named outputs on ``inputs`` (``tap`` calls name its layers)."""
        ...
