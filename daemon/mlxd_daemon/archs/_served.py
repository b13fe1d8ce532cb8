"""The served path: what Infer runs. Forwards are ``mx.compile``d and inputs padded to shape buckets, so a new
batch size or text length reuses one of a few compiled graphs instead of tracing (and, on a GPU, JIT-compiling
kernels) again; padding rows repeat a real input, so they stay finite and are simply dropped afterwards.

Validation keeps the eager modules (per-layer taps); a test holds the two paths equal.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # then multiples of the last
LENGTH_STEP = 16  # sequence lengths are padded to a multiple of this (capped at the model's maximum)


def batch_bucket(n: int) -> int:
    """The padded batch size for ``n`` rows."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    top = BATCH_BUCKETS[-1]
    return -(-n // top) * top


def length_bucket(n: int, limit: int) -> int:
    """The padded sequence length for ``n`` tokens (never below ``n``, at most ``limit`` when ``n`` fits)."""
    return max(n, min(-(-n // LENGTH_STEP) * LENGTH_STEP, limit))


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with rows appended up to ``n``: copies of row 0, so the padding is a real, finite input."""
    if len(a) >= n:
        return a
    return np.concatenate([a, np.repeat(a[:1], n - len(a), axis=0)])


def can_compile() -> bool:
    """MLX's CPU backend builds fused kernels with the system C++ compiler (``g++``); without one, stay eager."""
    return mx.default_device() != mx.cpu or shutil.which("g++") is not None


class Compiled:
    """An ``mx.compile``d function (eager where ``can_compile`` says no) that records the input shapes it has been
    traced for."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = mx.compile(fn) if can_compile() else fn
        self.shapes: set[tuple[tuple[int, ...], ...]] = set()

    def __call__(self, *arrays: mx.array) -> Any:
        self.shapes.add(tuple(tuple(a.shape) for a in arrays))
        return self._fn(*arrays)


def warm_up(run: Callable[[], Any]) -> float:
    """Seconds ``run`` takes the first time (tracing, compiling kernels): paid at load, not by a request."""
    start = time.perf_counter()
    mx.eval(run())
    return time.perf_counter() - start
