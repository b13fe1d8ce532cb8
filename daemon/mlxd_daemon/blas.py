"""Optimized BLAS for MLX on Linux.

The Linux ``mlx[cpu]`` wheel calls a reference BLAS (~30x slower sgemm). Loading an optimized ``libopenblas``
with RTLD_GLOBAL *before* ``import mlx.core`` makes MLX's ``cblas_*`` calls bind to it. Workers call
``preload()`` first thing; the front end only calls ``find_blas()`` to report what workers will use.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

ENV_BLAS = "MLXD_BLAS"  # a library path, or "reference" to keep MLX's own BLAS
REFERENCE = "reference"
_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread
    "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL openblas-threads
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",  # Arch
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
)

_loaded: str | None = None


def find_blas() -> str:
    """The optimized BLAS library workers will load, or "reference" when none is found."""
    override = os.environ.get(ENV_BLAS)
    if override:
        return override
    if not sys.platform.startswith("linux"):
        return REFERENCE  # macOS MLX uses Accelerate/Metal already
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return REFERENCE


def preload() -> str:
    """Load the optimized BLAS globally (before mlx.core is imported); return what is in use."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if "mlx.core" in sys.modules:
        _loaded = REFERENCE + " (mlx.core imported before preload)"
        return _loaded
    path = find_blas()
    if path != REFERENCE:
        if not Path(path).exists():
            msg = f"{ENV_BLAS}={path} does not exist"
            raise FileNotFoundError(msg)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _loaded = path
    return path


def warning(blas: str) -> str | None:
    """A loud message for users running on the slow reference BLAS."""
    if sys.platform.startswith("linux") and blas.startswith(REFERENCE):
        return (
            "MLX is using its reference BLAS: matmul is ~30x slower. Install OpenBLAS (Debian/Ubuntu: "
            "apt-get install libopenblas0-pthread; Fedora: dnf install openblas-threads) or set MLXD_BLAS "
            "to a libopenblas.so path"
        )
    return None
