"""The served path: what Infer runs. Forwards are ``mx.compile``d and inputs padded to shape buckets, so a new
batch size or text length reuses one of a few compiled graphs instead of tracing (and, on a GPU, JIT-compiling
kernels) again; padding rows repeat a real input and padding tokens are masked, so they change nothing and are
simply dropped afterwards.

On the CPU, MLX runs every op of a stream on that stream's one thread: the GEMMs use every core through the BLAS,
but softmax, layer norm, GELU and copies (a fifth of CLIP's time) use one. Splitting a batch over one CPU stream per
core was tried and left ``mx.eval`` waiting forever, every thread asleep, in a test process running BERT over
MLX's own BLAS (the MiniLM calibration test, 2026-12-04): a batch runs on one stream.

Validation keeps the eager modules (per-layer taps); tests hold the two paths equal.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxd_daemon.archs.image_processing import ImageConfig, image_batch, look_up, normalize_table

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # then multiples of the last
# Sequence lengths are padded to a multiple of this (capped at the model's maximum). Every padded token costs a
# CPU its full share of compute, and a new shape only a trace (~0.1 s: its fused kernels are shape-independent and
# cached on disk), while a GPU pays mostly for new shapes (trace and kernel JIT): finer on the CPU.
LENGTH_STEP = {"cpu": 4, "gpu": 16}


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def batch_bucket(n: int) -> int:
    """The padded batch size for ``n`` rows."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    top = BATCH_BUCKETS[-1]
    return -(-n // top) * top


def length_bucket(n: int, limit: int) -> int:
    """The padded sequence length for ``n`` tokens (never below ``n``, at most ``limit`` when ``n`` fits)."""
    step = LENGTH_STEP["cpu" if _on_cpu() else "gpu"]
    return max(n, min(-(-n // step) * step, limit))


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with rows appended up to ``n``: copies of row 0, so the padding is a real, finite input."""
    if len(a) >= n:
        return a
    return np.concatenate([a, np.repeat(a[:1], n - len(a), axis=0)])


def warm_lengths(limit: int) -> list[int]:
    """The sequence lengths a warm-up traces at batch 1: on a GPU every length bucket up to ``limit`` (a new shape
    costs a trace and kernel compilation there, the first request should not), on the CPU the shortest and longest
    (a new shape costs a trace of ~0.1 s; each padded token costs compute)."""
    if _on_cpu():
        return sorted({1, limit})
    step = LENGTH_STEP["gpu"]
    return sorted({*range(step, limit, step), limit})


def pad_length(limit: int, *arrays: tuple[np.ndarray, int]) -> list[np.ndarray]:
    """Each ``(array [n, L], value)`` padded on the right with ``value`` to ``length_bucket(L, limit)`` columns;
    the attention mask among them must pad with 0, so the extra positions are never attended to."""
    width = length_bucket(arrays[0][0].shape[1], limit)
    return [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value) for a, value in arrays]


class PixelTable:
    """Images as the vision towers take them: uint8 NHWC crops (``image_processing.image_batch``) to normalized
    NHWC pixels in the compute dtype by ``normalize_table`` (bit-identical to HF's float64 rescale, then
    normalize). On a GPU the lookup runs in the compiled graph, so a quarter of the bytes cross to the device and
    the host does no float pass; MLX's CPU gather is about 5x slower than numpy's (64 CLIP crops, 2026-12-04), so on
    the CPU numpy looks the crops up and the graph gets float32."""

    def __init__(self, cfg: ImageConfig, dtype: mx.Dtype) -> None:
        self.cfg, self.dtype, self.table = cfg, dtype, normalize_table(cfg)
        self.flat = mx.array(self.table).astype(dtype).reshape(-1)  # rounding to fp16 commutes with the lookup

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        """uint8 [n, H, W, 3] crops of ``images``: what the served forwards take."""
        return image_batch(images, self.cfg)

    def host(self, crops: np.ndarray) -> np.ndarray:
        """What goes to the compiled graph: the uint8 crops on a GPU, looked up on the CPU (``__call__`` takes both)."""
        return look_up(crops, self.table) if _on_cpu() else crops

    def __call__(self, pixels: mx.array) -> mx.array:
        """Inside the graph: ``host``'s output -> normalized NHWC pixels in the compute dtype."""
        if pixels.dtype != mx.uint8:
            return pixels.astype(self.dtype)
        channels = self.table.shape[1]
        return mx.take(self.flat, pixels.astype(mx.uint32) * channels + mx.arange(channels, dtype=mx.uint32))

    def values(self, pixel_values: mx.array) -> mx.array:
        """Inside the graph: normalized NCHW ``pixel_values`` (what HF's image processors output, and a client may
        send instead of images) -> NHWC pixels in the compute dtype."""
        return pixel_values.transpose(0, 2, 3, 1).astype(self.dtype)


def can_compile() -> bool:
    """MLX's CPU backend builds fused kernels with the system C++ compiler (``g++``); without one, stay eager."""
    return not _on_cpu() or shutil.which("g++") is not None


class Compiled:
    """An ``mx.compile``d function (eager where ``can_compile`` says no) from batched arrays to a tuple of batched
    outputs, run on row-padded inputs (``batch_bucket``); it records the input shapes it was traced for."""

    def __init__(self, fn: Callable[..., tuple[mx.array, ...]]) -> None:
        self._fn = mx.compile(fn) if can_compile() else fn
        self.shapes: set[tuple[tuple[int, ...], ...]] = set()

    def __call__(self, *arrays: np.ndarray) -> tuple[mx.array, ...]:
        """``fn`` over the rows of ``arrays`` (lazy: ``evaluate`` runs it); every output has one row per input row."""
        n = len(arrays[0])
        padded = [mx.array(pad_rows(a, batch_bucket(n))) for a in arrays]
        self.shapes.add(tuple(tuple(a.shape) for a in padded))
        return tuple(out[:n] for out in self._fn(*padded))


class Forward:
    """A ``Compiled`` function whose outputs are named, in order, by ``widths`` (name -> last dimension): what a
    one-input model (BERT texts, ViT images) serves; no rows give empty arrays of those widths."""

    def __init__(self, fn: Callable[..., tuple[mx.array, ...]], widths: dict[str, int]) -> None:
        self.compiled, self.widths = Compiled(fn), widths

    def __call__(self, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        n = len(arrays[0])
        if not n:
            return {name: np.zeros((0, width), np.float32) for name, width in self.widths.items()}
        return evaluate(dict(zip(self.widths, self.compiled(*arrays), strict=True)))


def evaluate(outputs: dict[str, mx.array]) -> dict[str, np.ndarray]:
    """Run ``outputs`` (built by ``Compiled`` calls) and return them as float32 numpy."""
    mx.eval(outputs)
    return {k: np.array(v, dtype=np.float32) for k, v in outputs.items()}


def warm_up(run: Callable[[], Any]) -> float:
    """Seconds ``run`` takes the first time (tracing, compiling kernels): paid at load, not by a request."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
