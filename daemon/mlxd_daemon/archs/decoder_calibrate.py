"""Decoders' calibration stream (AWQ/GPTQ, ``calibrate``): mlx-lm's own layer modules, for Llama-style blocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxd_daemon.calibrate.data import CalibrationSet, text_set
from mlxd_daemon.calibrate.models import MAX_TOKENS, Batch, Block, Fold, Stream, Weights, text_batches
from mlxd_daemon.errors import Unsupported

LLAMA_LINEARS = (*(f"self_attn.{p}_proj" for p in "qkvo"), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class DecoderStream(Stream):
    """A causal LM run block by block through mlx-lm's own layer modules (a fresh, lazily initialised model
    supplies the module of each block; its weights come from the plan). Calibrates models whose blocks have
    Llama's Linears (q/k/v/o, SwiGLU gate/up/down); others are Unsupported with the reason."""

    name = "model"

    def __init__(self, config: dict[str, Any], weights: Weights, data: CalibrationSet) -> None:
        from mlx_lm.utils import _get_classes
        from tokenizers import Tokenizer

        model_class, args_class = _get_classes(config)
        self.model = model_class(args_class.from_dict(config))  # lazy parameters: no memory until loaded
        self.weights, self.data, self.config = weights, data, config
        self.lm_type = model_class.__module__.rsplit(".", 1)[-1]
        layers = getattr(self.model, "layers", [])  # the model's own list (emptied block by block)
        found = {n for n, _ in layers[0].named_modules()} if layers else set()
        missing = [n for n in LLAMA_LINEARS if n not in found]
        if missing or "model.embed_tokens.weight" not in weights:
            msg = (f"calibrated quantization needs Llama-style decoder blocks; mlx-lm's {self.lm_type} blocks lack "
                   f"{', '.join(missing) or 'model.embed_tokens'}: use method rtn")  # fmt: skip
            raise Unsupported(msg, reason="UNSUPPORTED_CALIBRATION", model_type=str(config.get("model_type")))
        self.layers = layers
        tok = Tokenizer.from_file(str(weights.ckpt.path / "tokenizer.json"))

        def encode(texts: list[str]) -> dict[str, np.ndarray]:
            rows = [tok.encode(t).ids[:MAX_TOKENS] for t in texts]
            width = max(len(r) for r in rows)
            ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = r, 1
            return {"input_ids": ids, "attention_mask": mask}

        self.encode = encode

    def start(self) -> list[Batch]:
        table = self.weights.get("model.embed_tokens.weight")
        scale = np.sqrt(table.shape[1]) if self.lm_type.startswith("gemma") else 1.0  # gemma scales embeddings
        out = []
        for t in text_batches(self.data, self.encode):
            # Right padding under a causal mask leaves the real positions unchanged; padding is not counted.
            out.append(Batch(mx.array(table[t["input_ids"]] * scale), t["attention_mask"].astype(bool)))
        return out

    def blocks(self) -> Iterator[Block]:
        kv, heads = self.config.get("num_key_value_heads"), self.config.get("num_attention_heads")
        for i, layer in enumerate(self.layers):
            folds: list[Fold] = [Fold("mlp.up_proj", "linear", ("mlp.down_proj",))]
            no_fold: dict[str, str] = {}
            # Folding into a norm needs output = weight * normalized(x); gemma-style (1 + weight) norms are not.
            plain = type(getattr(layer, "input_layernorm", None)) is nn.RMSNorm
            if plain and type(getattr(layer, "post_attention_layernorm", None)) is nn.RMSNorm:
                folds.append(Fold("input_layernorm", "norm", tuple(f"self_attn.{p}_proj" for p in "qkv")))
                folds.append(Fold("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")))
            else:
                for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"):
                    no_fold[p] = f"its input norm ({self.lm_type}) is not weight * normalized(x)"
            if kv and heads and kv != heads:
                no_fold["self_attn.o_proj"] = "v_proj rows are shared by several query heads (GQA)"
            else:
                folds.append(Fold("self_attn.v_proj", "linear", ("self_attn.o_proj",)))
            yield Block(f"model.layers.{i}.", layer, LLAMA_LINEARS, tuple(folds), no_fold)
            self.layers[i] = None  # done: its loaded weights go, so memory holds one block at a time

    def run(self, block: Block, batch: Batch) -> mx.array:
        out = block.module(batch.hidden, "causal" if batch.hidden.shape[1] > 1 else None, None)
        return out[0] if isinstance(out, tuple) else out

    def tail(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        norm = getattr(getattr(self.model, "model", None), "norm", None)
        if "lm_head.weight" not in self.weights or norm is None:
            return {}
        self.weights.load_into(norm, "model.norm.")
        return {"lm_head": np.concatenate([np.array(norm(b.hidden))[b.valid] for b in batches])}


def calibration_streams(config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int) -> list[Stream]:
    """The decoder's layers, on the user's texts or the built-in sentences."""
    return [DecoderStream(config, weights, text_set(weights.ckpt.path, data, seed))]
