"""Calibrated quantization: AWQ-style (``awq``) and GPTQ-style (``gptq``) next to plain rounding (``rtn``).

``calibrate`` runs the float model block by block on a calibration set (``data``), captures the inputs of every
Linear of the block (padding excluded), quantizes the block's Linears from those statistics, then runs the
*quantized* block to produce the next block's inputs, so later layers are calibrated on what they will see.
The output is the standard MLX affine format (``weight`` uint32, ``scales``, ``biases``); AWQ's input scales
are folded into the norm or Linear before them, so any MLX loader reads the result with no new code.

Per layer: ``gptq`` applies GPTQ to every calibrated Linear. ``awq`` applies scale search + fold where the
arch allows it (``models.Fold``) and weight-clipping search everywhere; a Linear whose input cannot be scaled
(``Block.no_fold``: after a nonlinearity, or a post-LN residual) gets GPTQ instead, and its note says so.
Embeddings and layers in other modes stay with the writer's round-to-nearest.

Memory: one block's float weights, the hidden states of the calibration set (samples × tokens × width, float32),
per Linear an input Hessian (in² float64) and a sample of at most ``SAMPLE_TOKENS`` input rows. The packed
results of every calibrated Linear are kept until the writer takes them: about the size of the quantized
model (fine for the models this has been run on; a 1.1B model at 4 bits would hold ~0.7 GB of them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from mlxd_daemon.calibrate import affine, awq, gptq, models
from mlxd_daemon.checkpoint import Checkpoint
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.progress import NULL_REPORTER, Reporter
from mlxd_daemon.quantize import QuantSpec
from mlxd_daemon.shards import Plan, Unit
from mlxd_daemon.torch_mlx import to_torch

__all__ = ["METHODS", "Calibrated", "calibrate", "check_method"]

METHODS = ("rtn", "awq", "gptq")
SAMPLE_TOKENS = 4096  # activation rows kept per Linear for AWQ's searches


def check_method(method: str | None, spec: QuantSpec | None) -> str:
    """The method name (empty = rtn); InvalidArgument BAD_QUANT_METHOD for unknown methods or non-affine modes."""
    method = (method or "rtn").strip().lower()
    if method not in METHODS:
        msg = f"unknown quantization method {method!r}: choose one of {', '.join(METHODS)}"
        raise InvalidArgument(msg, reason="BAD_QUANT_METHOD", method=method)
    if method != "rtn" and spec is not None and spec.default.mode != "affine":
        msg = f"method {method} produces affine quantization and cannot use mode {spec.default.mode}: drop --q-mode"
        raise InvalidArgument(msg, reason="BAD_QUANT_METHOD", method=method, mode=spec.default.mode)
    return method


@dataclass
class Calibrated:
    """Final tensors by unit target (outputs by name, relative weight error or None), per-layer notes, data."""

    tensors: dict[str, tuple[dict[str, torch.Tensor], float | None]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    calibration: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _Stats:
    """Running input statistics of one Linear: Hessian sum, mean |x| per channel, a spread-out row sample."""

    def __init__(self, quota: int, hessian: bool) -> None:
        self.quota, self.want_h = quota, hessian
        self.h: np.ndarray | None = None
        self.abs_sum: np.ndarray | None = None
        self.n = 0
        self.rows: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x64 = x.astype(np.float64)
        if self.want_h:
            self.h = x64.T @ x64 if self.h is None else self.h + x64.T @ x64
        s = np.abs(x64).sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += len(x)
        step = max(1, -(-len(x) // self.quota))
        self.rows.append(x[::step])

    def hessian(self, s: np.ndarray | None = None) -> np.ndarray:
        assert self.h is not None
        h = 2.0 * self.h / max(self.n, 1)
        return h if s is None else h / np.outer(s, s)  # inputs divided by s

    def mean_abs(self) -> np.ndarray:
        assert self.abs_sum is not None
        return self.abs_sum / max(self.n, 1)

    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows)[: SAMPLE_TOKENS * 2]


class _Tap(nn.Module):
    """Stands in for a Linear during calibration: records its (valid) inputs when ``stats`` is set, and computes
    the Linear with numpy's BLAS (the Linux MLX wheel's own BLAS is ~30x slower unless one was preloaded)."""

    def __init__(self, inner: nn.Module, stats: _Stats | None, state: dict[str, Any]) -> None:
        super().__init__()
        self.inner = inner
        self._stats, self._ctx = stats, state
        self._w = np.array(inner.weight.astype(mx.float32)).T.copy()
        self._b = np.array(inner.bias.astype(mx.float32)) if "bias" in inner else None

    def __call__(self, x: mx.array) -> mx.array:
        a = np.array(x.astype(mx.float32))
        if self._stats is not None:
            rows = a[self._ctx["valid"]] if a.ndim == 3 else a
            self._stats.add(rows.reshape(-1, a.shape[-1]))
        y = (a.reshape(-1, a.shape[-1]) @ self._w).reshape(*a.shape[:-1], -1)  # one GEMM (3-D @ is ~3x slower)
        return mx.array(y if self._b is None else y + self._b)


def calibrate(
    ckpt: Checkpoint,
    plan: Plan,
    config: dict[str, Any],
    method: str,
    data: str | Path | None = None,
    seed: int = 0,
    reporter: Reporter = NULL_REPORTER,
) -> Calibrated:
    """Quantize the planned affine Linears of ``ckpt`` with ``method`` ("awq" or "gptq") on calibration ``data``
    (a path, or None for the architecture's built-in set drawn with ``seed``). The writer takes ``tensors``."""
    started = time.monotonic()
    weights = models.Weights(ckpt, plan)
    out = Calibrated()
    job = _Job(method, weights, out, reporter)
    reporter.begin("calibrate", sum(1 for u in plan.units if _calibratable(u)), 0, f"method {method}")
    for stream in models.streams(config, weights, data, seed):
        out.calibration.append({"tower": stream.name, **stream.data.describe()})
        batches = stream.start()
        for block in stream.blocks():
            job.block(stream, block, batches)
            ckpt.release()
        tail = stream.tail(batches)
        for name, x in tail.items():
            stats = _Stats(SAMPLE_TOKENS, True)
            stats.add(x)
            job.emit(job.linears("", {name: stats}, [name]))
    reporter.end(f"{len(out.tensors)} tensors calibrated")
    out.seconds = round(time.monotonic() - started, 3)
    return out


def _calibratable(u: Unit | None) -> bool:
    return u is not None and u.quantize and u.mode == "affine"


class _Job:
    def __init__(self, method: str, weights: models.Weights, out: Calibrated, reporter: Reporter) -> None:
        self.method, self.weights, self.out, self.reporter = method, weights, out, reporter
        self.units = weights.units
        self.cur: dict[str, np.ndarray] = {}  # float values changed by folds, by full name
        self.scaled: dict[str, np.ndarray] = {}  # Linear path -> s (its inputs are divided by s)
        self.done = 0

    def val(self, name: str) -> np.ndarray:
        if name not in self.cur:
            self.cur[name] = self.weights.get(name)
        return self.cur[name]

    def block(self, stream: models.Stream, block: models.Block, batches: list[models.Batch]) -> None:
        """Capture the block's Linear inputs, quantize them, then advance ``batches`` through the quantized block."""
        self.weights.load_into(block.module, block.prefix)
        state: dict[str, Any] = {}
        stats = {lin: _Stats(SAMPLE_TOKENS // max(len(batches), 1) + 1, True) for lin in block.linears}
        self._run(stream, block, batches, state, stats)
        if self.method == "awq":
            self.fold(block, stats)
        names = self.linears(block.prefix, stats, list(block.linears), block.no_fold)
        names += [n for n in self.cur if n.startswith(block.prefix)]
        effective = self.emit(names)
        rel = [(k[len(block.prefix) :], mx.array(v)) for k, v in effective.items() if k.startswith(block.prefix)]
        block.module.load_weights(rel, strict=False)
        self._run(stream, block, batches, state, None)

    def _run(
        self,
        stream: models.Stream,
        block: models.Block,
        batches: list[models.Batch],
        state: dict[str, Any],
        stats: dict[str, _Stats] | None,
    ) -> None:
        """Run ``block`` on every batch with its Linears tapped; with ``stats`` record inputs, else advance."""
        originals = {lin: _get(block.module, lin) for lin in block.linears}
        for lin, inner in originals.items():
            _set(block.module, lin, _Tap(inner, stats[lin] if stats else None, state))
        try:
            for b in batches:
                state["valid"] = b.valid
                out = stream.run(block, b)
                mx.eval(out)
                if stats is None:
                    b.hidden = out
        finally:
            for lin, inner in originals.items():
                _set(block.module, lin, inner)

    def fold(self, block: models.Block, stats: dict[str, _Stats]) -> None:
        """AWQ: search every fold's scales on float weights first, then apply them (weights × s, prev ÷ s)."""
        p = block.prefix
        found = []
        for f in block.folds:
            members = [lin for lin in f.linears if _calibratable(self.units.get(f"{p}{lin}.weight"))]
            if not members:
                continue
            params = [
                (self.units[f"{p}{lin}.weight"].bits, self.units[f"{p}{lin}.weight"].group_size) for lin in members
            ]
            dtype = self.units[f"{p}{members[0]}.weight"].dtype
            st = stats[members[0]]
            ws = [self.val(f"{p}{lin}.weight") for lin in members]
            s, alpha, _ = awq.search_scales(st.sample(), st.mean_abs(), ws, params, dtype)
            found.append((f, s, alpha))
        for f, s, alpha in found:
            for lin in f.linears:
                self.cur[f"{p}{lin}.weight"] = self.val(f"{p}{lin}.weight") * s[None, :]
                self.scaled[p + lin] = s
                self.out.notes[p + lin] = f"awq: input scales (alpha {alpha:.2f}) folded into {p}{f.prev}"
            w, b = self.val(f"{p}{f.prev}.weight"), self._bias(f"{p}{f.prev}.bias")
            fold = awq.fold_into_norm if f.kind == "norm" else awq.fold_into_rows
            w, b = fold(w, b, s)
            self.cur[f"{p}{f.prev}.weight"] = w
            if b is not None:
                self.cur[f"{p}{f.prev}.bias"] = b

    def _bias(self, name: str) -> np.ndarray | None:
        return self.val(name) if name in self.units else None

    def linears(
        self, prefix: str, stats: dict[str, _Stats], linears: list[str], no_fold: dict[str, str] | None = None
    ) -> list[str]:
        """Quantize each calibratable Linear; returns the weight names handled."""
        done = []
        for lin in linears:
            name = f"{prefix}{lin}.weight"
            unit = self.units.get(name)
            if not _calibratable(unit):
                continue
            assert unit is not None
            path = prefix + lin
            w = self.val(name)
            st = stats[lin]
            s = self.scaled.get(path)
            if self.method == "gptq" or (s is None and (no_fold or {}).get(lin) is not None):
                packed = gptq.gptq_quantize(w, st.hessian(s), unit.bits, unit.group_size, unit.dtype)
                why = (no_fold or {}).get(lin)
                self.out.notes[path] = "gptq" if self.method == "gptq" else f"awq→gptq: not scaled, {why}"
            else:
                x = st.sample() if s is None else st.sample() / s[None, :]
                clipped, ratio = awq.clip_search(w, x, unit.bits, unit.group_size, unit.dtype)
                packed = affine.quantize(clipped, unit.bits, unit.group_size, unit.dtype)
                note = self.out.notes.get(path, "awq: no input scaling (head Linear)")
                self.out.notes[path] = f"{note}; clip search (mean range ratio {ratio:.3f})"
            deq = packed.dequantize()
            error = float(np.linalg.norm(w - deq) / max(float(np.linalg.norm(w)), 1e-30))
            outs = [o.name for o in unit.outputs]
            tensors = dict(zip(outs, (to_torch(a) for a in (packed.weight, packed.scales, packed.biases)), strict=True))
            self.out.tensors[name] = (tensors, error)
            self.cur[name] = deq
            done.append(name)
            self.done += 1
            self.reporter.report(self.done, 0, path)
        return done

    def emit(self, names: list[str]) -> dict[str, np.ndarray]:
        """Final tensors for changed weights not yet emitted (floats in their dtype; other modes rounded); returns
        the effective float value of every name, for the next forward pass."""
        effective = {}
        for name in dict.fromkeys(names):
            v = self.cur.pop(name)
            unit = self.units[name]
            if name not in self.out.tensors:
                if unit.quantize:  # changed by a fold but not calibrated (another mode): plain rounding
                    q = mx.quantize(mx.array(v).astype(affine.mx_dtype(unit.dtype)), group_size=unit.group_size,
                                    bits=unit.bits, mode=unit.mode)  # fmt: skip
                    mx.eval(q)
                    outs = [o.name for o in unit.outputs]
                    self.out.tensors[name] = (dict(zip(outs, map(to_torch, q), strict=True)), None)
                    v = np.array(mx.dequantize(*q, group_size=unit.group_size, bits=unit.bits, mode=unit.mode,
                                               dtype=mx.float32))  # fmt: skip
                else:
                    t = torch.from_numpy(np.ascontiguousarray(v)).to(unit.dtype)
                    self.out.tensors[name] = ({unit.target: t}, None)
                    v = t.float().numpy()
            effective[name] = v
        return effective


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = module[part]
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, leaf, value)
