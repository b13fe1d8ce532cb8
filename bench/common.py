"""Shared helpers for the benchmarks: the benchmark models and a timer."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".demo"


def base_clip() -> Path:
    """The ViT-B/32 CLIP architecture with seeded random weights (shared with `make demo`)."""
    from mlxd_daemon.fixtures import make_clip

    path = CACHE / "hf-clip-vit-base-patch32"
    if not (path / "config.json").exists():
        make_clip(path, size="base", seed=0)
    return path


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}"
