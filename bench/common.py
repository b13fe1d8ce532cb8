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


def spread(values: list[float]) -> str:
    """Median with p10/p90, as every benchmark reports it."""
    qs = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return f"{statistics.median(values):.1f} (p10 {qs[0]:.1f}, p90 {qs[-1]:.1f})"
