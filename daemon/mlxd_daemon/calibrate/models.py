"""Calibration streams: the float model run block by block on the calibration set (what an arch module's
``calibration_streams`` returns; see ``archs.contract``).

A stream (BERT's encoder, ``archs/bert_calibrate``; CLIP's text and vision towers, ``archs/clip_calibrate``; an
mlx-lm decoder, ``archs/decoder_calibrate``) turns samples into the hidden states that enter its first block, then
lists its blocks one at a time (a fresh MLX module, weights read from the checkpoint only when the block is
reached) and, after the last, the inputs of its head Linears. Module classes are the arch modules' own, so the
calibration forward is the served forward. Each block names its Linears and where an input scale can be folded
(``Fold``) or why not (``no_fold``): in post-LayerNorm BERT the LayerNorm output feeding q/k/v and
intermediate.dense is also the residual, so scaling it would change the function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxd_daemon.calibrate.data import CalibrationSet
from mlxd_daemon.checkpoint import Checkpoint
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.shards import Plan

BATCH = 32
MAX_TOKENS = 512


@dataclass(frozen=True)
class Fold:
    """Scale the inputs of ``linears`` by s and divide the output of ``prev`` (a norm, or a Linear's rows) by s."""

    prev: str
    kind: str  # "norm" | "linear"
    linears: tuple[str, ...]


@dataclass
class Block:
    prefix: str  # e.g. "encoder.layer.3."
    module: nn.Module
    linears: tuple[str, ...]
    folds: tuple[Fold, ...] = ()
    no_fold: dict[str, str] = field(default_factory=dict)


@dataclass
class Batch:
    hidden: mx.array
    valid: np.ndarray  # [B, L] bool: real tokens (padding excluded from statistics)
    ctx: dict[str, Any] = field(default_factory=dict)


class Weights:
    """Float32 numpy views of the planned tensors by their MLX name, read from the checkpoint on demand."""

    def __init__(self, ckpt: Checkpoint, plan: Plan) -> None:
        self.ckpt = ckpt
        self.units = {u.target: u for u in plan.units}
        self.layouts = plan.layouts

    def __contains__(self, name: str) -> bool:
        return name in self.units

    def get(self, name: str) -> np.ndarray:
        unit = self.units[name]
        a = self.ckpt.get(unit.source).float().numpy().copy()
        if self.layouts.get(name) == "pytorch_conv2d_OIHW":
            a = a.transpose(0, 2, 3, 1)  # pytorch conv2d is [O, I, kH, kW], MLX is [O, kH, kW, I]
        return a

    def load_into(self, module: nn.Module, prefix: str) -> None:
        """Load every parameter of ``module`` from ``<prefix><name>`` (strict: all must exist)."""
        names = list(dict(tree_flatten(module.parameters())))
        module.load_weights([(k, mx.array(self.get(prefix + k))) for k in names])
        mx.eval(module.parameters())


class Stream:
    """One tower: ``start`` → batches, ``blocks`` one at a time, ``run`` a block, ``tail`` head-Linear inputs
    (by the Linear's path, e.g. ``pooler.dense``); ``name`` and ``data`` go into the result and manifest."""

    name = ""
    data: CalibrationSet

    def start(self) -> list[Batch]:
        raise NotImplementedError

    def blocks(self) -> Iterator[Block]:
        raise NotImplementedError

    def run(self, block: Block, batch: Batch) -> mx.array:
        raise NotImplementedError

    def tail(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        return {}


def chunks(n: int) -> Iterator[slice]:
    """Batches of ``BATCH`` rows of ``n``."""
    for i in range(0, n, BATCH):
        yield slice(i, min(i + BATCH, n))


def _array_rows(data: CalibrationSet, key: str, default: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    base = data.arrays["input_ids"]
    return np.asarray(data.arrays[key]) if key in data.arrays else default(base)


def text_batches(data: CalibrationSet, encode: Callable[[list[str]], dict[str, np.ndarray]]) -> Iterator[dict]:
    """Token arrays per batch (``input_ids``, ``attention_mask``, ...): the texts encoded, or the user's .npz rows."""
    if data.arrays:
        if "input_ids" not in data.arrays:
            msg = f"calibration .npz {data.path} has no input_ids for this text model"
            raise InvalidArgument(msg, reason="BAD_CALIBRATION_DATA", path=data.path)
        ids = np.asarray(data.arrays["input_ids"], np.int64)
        mask = _array_rows(data, "attention_mask", np.ones_like)
        for s in chunks(len(ids)):
            yield {"input_ids": ids[s, :MAX_TOKENS], "attention_mask": np.asarray(mask[s, :MAX_TOKENS], np.int64)}
        return
    for s in chunks(len(data.texts)):
        enc = encode(data.texts[s])
        yield {k: v[:, :MAX_TOKENS] for k, v in enc.items()}


def streams(config: dict[str, Any], weights: Weights, data_path: str | Path | None, seed: int) -> list[Stream]:
    """The calibration streams of ``config``'s architecture (its module's ``calibration_streams``), each with its
    calibration set; Unsupported UNSUPPORTED_CALIBRATION when the module has none."""
    from mlxd_daemon.archs import get_arch
    from mlxd_daemon.archs.contract import optional

    model_type = str(config.get("model_type"))
    calibration_streams = optional(get_arch(model_type), "calibration_streams")
    if calibration_streams is None:
        msg = f"calibrated quantization is not implemented for model_type {model_type!r}: use method rtn"
        raise Unsupported(msg, reason="UNSUPPORTED_CALIBRATION", model_type=model_type)
    return list(calibration_streams(config, weights, data_path, seed))
