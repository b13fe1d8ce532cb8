"""Optimized BLAS for MLX on Linux.

The Linux ``mlx[cpu]`` wheel calls a reference BLAS (~30x slower sgemm). Loading an optimized ``libopenblas``
with RTLD_GLOBAL *before* ``import mlx.core`` makes MLX's ``cblas_*`` calls bind to it. Workers call
``preload()`` first thing; the front end only calls ``find_blas()`` to report what workers will use.
``threads(n)`` sets how many threads the loaded library uses for a block of work (the served path's CPU streams).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

# (get, set) thread-count functions of the libraries we know; a library without them keeps its own setting.
_THREAD_FUNCTIONS = (
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("bli_thread_get_num_threads", "bli_thread_set_num_threads"),
    ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
)

_loaded: str | None = None
_handle: ctypes.CDLL | None = None


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
    global _loaded, _handle
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
        _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _loaded = path
    return path


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """The preloaded BLAS runs on ``n`` threads inside the block, then as before (``None``: unchanged; so is
    the reference BLAS, which is single-threaded). Only between BLAS calls: the models worker runs one request
    at a time, and MLX's stream threads are idle until the block evaluates."""
    functions = None if n is None or _handle is None else _thread_functions(_handle)
    if functions is None:
        yield
        return
    get, set_ = functions
    before = int(get())
    set_(n)
    try:
        yield
    finally:
        set_(before)


def _thread_functions(lib: ctypes.CDLL) -> tuple[Any, Any] | None:
    for get, set_ in _THREAD_FUNCTIONS:
        if hasattr(lib, get) and hasattr(lib, set_):
            return getattr(lib, get), getattr(lib, set_)
    return None


def warning(blas: str) -> str | None:
    """A loud message for users running on the slow reference BLAS."""
    if sys.platform.startswith("linux") and blas.startswith(REFERENCE):
        return (
            "MLX is using its reference BLAS: matmul is ~30x slower. Install OpenBLAS (Debian/Ubuntu: "
            "apt-get install libopenblas0-pthread; Fedora: dnf install openblas-threads) or set MLXD_BLAS "
            "to a libopenblas.so path"
        )
    return None
