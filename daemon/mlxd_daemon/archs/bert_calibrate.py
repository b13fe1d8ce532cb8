"""BERT's calibration stream (AWQ/GPTQ, ``calibrate``): the encoder's layers with BERT's own modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxd_daemon.archs import bert
from mlxd_daemon.archs.bert_processing import Pooling, load_tokenizer, max_length, tokenize
from mlxd_daemon.calibrate.data import CalibrationSet, text_set
from mlxd_daemon.calibrate.models import Batch, Block, Fold, Stream, Weights, text_batches


def bert_block(prefix: str, module: nn.Module, act: str) -> Block:
    """A BERT layer (post-LN): only attention.output.dense's input (softmax-weighted values) can take a scale."""
    residual = "its input is the previous LayerNorm's output, which is also the residual (post-LN BERT)"
    return Block(
        prefix,
        module,
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        (Fold("attention.self.value", "linear", ("attention.output.dense",)),),
        {
            "attention.self.query": residual,
            "attention.self.key": residual,
            "attention.self.value": residual,
            "intermediate.dense": residual,
            "output.dense": f"its input follows {act} (nonlinear)",
        },
    )


class BertStream(Stream):
    name = "encoder"

    def __init__(self, config: dict[str, Any], weights: Weights, data: CalibrationSet) -> None:

        self.weights, self.data = weights, data
        self.cfg = bert.BertConfig.from_dict(config)
        path = weights.ckpt.path
        tok = load_tokenizer(path, max_length(path, self.cfg.max_position_embeddings, Pooling.load(path)))
        self.encode = lambda texts: tokenize(tok, texts)

    def start(self) -> list[Batch]:
        emb = bert.BertEmbeddings(self.cfg)
        self.weights.load_into(emb, "embeddings.")
        out = []
        for t in text_batches(self.data, self.encode):
            ids, mask = t["input_ids"], t["attention_mask"]
            types = t.get("token_type_ids", np.zeros_like(ids))
            hidden = emb(mx.array(ids.astype(np.int32)), mx.array(np.asarray(types).astype(np.int32)))
            ctx = {"mask": mx.array(mask.astype(bool)[:, None, None, :])}
            out.append(Batch(hidden, mask.astype(bool), ctx))
        return out

    def blocks(self) -> Iterator[Block]:
        for i in range(self.cfg.num_hidden_layers):
            yield bert_block(f"encoder.layer.{i}.", bert.BertLayer(self.cfg), self.cfg.hidden_act)

    def run(self, block: Block, batch: Batch) -> mx.array:
        return block.module(batch.hidden, batch.ctx["mask"])

    def tail(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        if "pooler.dense.weight" not in self.weights:
            return {}
        return {"pooler.dense": np.concatenate([np.array(b.hidden[:, 0]) for b in batches])}


def calibration_streams(config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int) -> list[Stream]:
    """The encoder, on the user's texts or the built-in sentences."""
    return [BertStream(config, weights, text_set(weights.ckpt.path, data, seed))]
