"""A toy architecture (``model_type: toy_mlp``) written as a third party would: one module satisfying
``mlxd_daemon.archs.contract``, registered by ``MLXD_ARCH_MODULES=toy_mlp`` (``tests/test_toy_arch.py``).

The model: byte tokens → embedding → ``num_layers`` pre-LayerNorm MLP blocks (``x + down(gelu(up(norm(x))))``) →
LayerNorm; ``text_embeds`` is the masked mean over tokens, L2-normalised. The MLX model and the PyTorch reference
use the same parameter names, so ``map_weight`` is the identity.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlxd_daemon.archs._config import FromDict
from mlxd_daemon.archs._loading import fill_model, read_config, read_weights, require_dir
from mlxd_daemon.archs.contract import Stored
from mlxd_daemon.calibrate.data import CalibrationSet, text_set
from mlxd_daemon.calibrate.models import Batch, Block, Fold, Stream, Weights, text_batches
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.golden import GOLDEN_SENTENCES
from mlxd_daemon.taps import hook_reference, tap

DISK_LAYOUT: dict[str, str] = {}  # every tensor keeps PyTorch's layout
PAD, BOS, OFFSET = 0, 1, 2  # token ids: padding, start, then byte b is b + OFFSET
MAX_BYTES = 64


@dataclass(frozen=True)
class ToyConfig(FromDict):
    vocab_size: int = 256 + OFFSET
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    layer_norm_eps: float = 1e-5
    quantization: dict[str, Any] | None = None


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """``input_ids`` (BOS + UTF-8 bytes, right-padded) and ``attention_mask`` [n, longest]."""
    rows = [[BOS, *(b + OFFSET for b in t.encode("utf-8")[:MAX_BYTES])] for t in texts]
    width = max((len(r) for r in rows), default=1)
    ids, mask = np.full((len(rows), width), PAD, np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


# ---- MLX ----------------------------------------------------------------------------------------------------


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.down(nn.gelu(self.up(self.norm(x))))


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [ToyBlock(cfg) for _ in range(cfg.num_layers)]
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, input_ids: np.ndarray) -> mx.array:
        x = self.embed(mx.array(input_ids.astype(np.int32)))
        for i, layer in enumerate(self.layers):
            x = tap(f"layers.{i}", layer(x))
        return self.norm(x)


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    mean = (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-30)


@dataclass
class ToyBundle(Stored):
    model: ToyModel
    config: ToyConfig

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        if not len(input_ids):
            d = self.config.hidden_size
            return {"text_embeds": np.zeros((0, d), np.float32), "last_hidden_state": np.zeros((0, 0, d), np.float32)}
        hidden = np.array(self.model(np.asarray(input_ids)))
        return {"text_embeds": _pool(hidden, np.asarray(attention_mask)), "last_hidden_state": hidden}

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, np.ndarray]:
        if images:
            msg = f"toy_mlp is a text model: {len(images)} image(s) given, send texts only"
            raise InvalidArgument(msg, reason="IMAGES_NOT_SUPPORTED", images=len(images))
        return {"text_embeds": self.forward(**tokenize(list(texts)))["text_embeds"]}


def map_weight(name: str) -> str | None:
    """Identity: the MLX modules carry the PyTorch names."""
    return name


def load(model_dir: Path) -> ToyBundle:
    model_dir = require_dir(model_dir)
    cfg = read_config(model_dir, "toy_mlp", ToyConfig.from_dict, "toy_mlp")
    weights, _, dtype = read_weights(model_dir, map_weight)
    model = ToyModel(cfg)
    compute, nbytes = fill_model(model, weights, cfg.quantization, model_dir, "toy_mlp")
    return ToyBundle(model=model, config=cfg, model_dir=model_dir, dtype=dtype, nbytes=nbytes,
                     quantization=cfg.quantization, compute_dtype=compute)  # fmt: skip


# ---- validation hooks ---------------------------------------------------------------------------------------


def golden_inputs(model_dir: Path, *, texts: list[str] | None = None, images: Any = None) -> dict[str, Any]:
    texts = list(GOLDEN_SENTENCES) if texts is None else list(texts)
    return {"texts": texts, "images": [], **tokenize(texts)}


def run_mlx(bundle: ToyBundle, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return bundle.forward(inputs["input_ids"], inputs["attention_mask"])


def run_reference(src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The PyTorch model on the same tokens (its per-layer outputs hooked through ``taps.hook_reference``)."""
    import torch

    model = hook_reference(torch_model(src_dir))
    with torch.no_grad():
        hidden = model(torch.from_numpy(np.asarray(inputs["input_ids"]))).numpy()
    return {"text_embeds": _pool(hidden, np.asarray(inputs["attention_mask"])), "last_hidden_state": hidden}


# ---- calibration --------------------------------------------------------------------------------------------


class ToyStream(Stream):
    name = "model"

    def __init__(self, cfg: ToyConfig, weights: Weights, data: CalibrationSet) -> None:
        self.cfg, self.weights, self.data = cfg, weights, data

    def start(self) -> list[Batch]:
        embed = nn.Embedding(self.cfg.vocab_size, self.cfg.hidden_size)
        self.weights.load_into(embed, "embed.")
        return [Batch(embed(mx.array(t["input_ids"].astype(np.int32))), t["attention_mask"].astype(bool))
                for t in text_batches(self.data, tokenize)]  # fmt: skip

    def blocks(self) -> Iterator[Block]:
        for i in range(self.cfg.num_layers):
            # Pre-LN: the norm feeds only ``up``, so AWQ's input scale folds into it; ``down`` follows a GELU.
            yield Block(f"layers.{i}.", ToyBlock(self.cfg), ("up", "down"), (Fold("norm", "norm", ("up",)),),
                        {"down": "its input follows gelu (nonlinear)"})  # fmt: skip

    def run(self, block: Block, batch: Batch) -> mx.array:
        return block.module(batch.hidden)


def calibration_streams(config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int) -> list[Stream]:
    return [ToyStream(ToyConfig.from_dict(config), weights, text_set(weights.ckpt.path, data, seed))]


# ---- the PyTorch reference, and a checkpoint of it ----------------------------------------------------------


def torch_model(src_dir: Path, seed: int | None = None) -> Any:
    """The PyTorch model of ``src_dir``'s config.json, with its weights (or random ones from ``seed``)."""
    import torch
    from safetensors.torch import load_file

    cfg = ToyConfig.from_dict(json.loads((Path(src_dir) / "config.json").read_text()))

    class TorchBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.up = torch.nn.Linear(cfg.hidden_size, cfg.intermediate_size)
            self.down = torch.nn.Linear(cfg.intermediate_size, cfg.hidden_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    class TorchToy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = torch.nn.ModuleList(TorchBlock() for _ in range(cfg.num_layers))
            self.norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            for layer in self.layers:
                x = layer(x)
            return self.norm(x)

    if seed is not None:
        torch.manual_seed(seed)
    model = TorchToy().eval()
    if seed is None:
        model.load_state_dict(load_file(str(Path(src_dir) / "model.safetensors")))
    return model


def make_checkpoint(dst: Path, seed: int = 0, **config: Any) -> Path:
    """A float32 toy_mlp checkpoint (config.json + model.safetensors) with random weights from ``seed``."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps({"model_type": "toy_mlp", **config}))
    model = torch_model(dst, seed)
    for block in model.layers:  # LayerNorm weights away from 1 and biases away from 0, so folds are exercised
        block.norm.weight.data.uniform_(0.5, 1.5)
        block.norm.bias.data.normal_(0.0, 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "model.safetensors"))
    return dst
