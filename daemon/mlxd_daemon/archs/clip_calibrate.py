"""CLIP's calibration streams (AWQ/GPTQ, ``calibrate``): the text and vision towers' layers, CLIP's own modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxd_daemon.archs.clip_model import (
    ClipConfig,
    CLIPEncoderLayer,
    CLIPTextEmbeddings,
    CLIPVisionEmbeddings,
    TextConfig,
    VisionConfig,
)
from mlxd_daemon.archs.clip_processing import load_tokenizer, tokenize
from mlxd_daemon.archs.image_processing import ClipImageConfig, preprocess_images
from mlxd_daemon.calibrate.data import CalibrationSet, load, vocab_words
from mlxd_daemon.calibrate.models import Batch, Block, Fold, Stream, Weights, chunks, text_batches


def pre_ln_block(prefix: str, module: nn.Module, act: str) -> Block:
    """CLIP encoder layer (pre-LN): norms feed only the Linears, so their scales fold into them."""
    return Block(
        prefix,
        module,
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"),
        (
            Fold("layer_norm1", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Fold("self_attn.v_proj", "linear", ("self_attn.out_proj",)),
            Fold("layer_norm2", "norm", ("mlp.fc1",)),
        ),
        {"mlp.fc2": f"its input follows {act} (nonlinear)"},
    )


class ClipTextStream(Stream):
    name = "text_model"

    def __init__(self, cfg: TextConfig, weights: Weights, data: CalibrationSet) -> None:

        self.cfg, self.weights, self.data = cfg, weights, data
        tok = load_tokenizer(weights.ckpt.path, cfg.max_position_embeddings)

        def encode(texts: list[str]) -> dict[str, np.ndarray]:
            ids, mask = tokenize(tok, texts)
            return {"input_ids": ids, "attention_mask": mask}

        self.encode = encode

    def start(self) -> list[Batch]:
        emb = CLIPTextEmbeddings(self.cfg)
        self.weights.load_into(emb, "text_model.embeddings.")
        out = []
        for t in text_batches(self.data, self.encode):
            ids, mask = t["input_ids"][:, : self.cfg.max_position_embeddings], t["attention_mask"]
            mask = mask[:, : ids.shape[1]]
            n = ids.shape[1]
            causal = np.tril(np.ones((n, n), dtype=bool))
            ctx = {"mask": mx.array(causal[None, None] & mask.astype(bool)[:, None, None, :]), "ids": ids}
            out.append(Batch(emb(mx.array(ids.astype(np.int32))), mask.astype(bool), ctx))
        return out

    def blocks(self) -> Iterator[Block]:
        for i in range(self.cfg.num_hidden_layers):
            module = CLIPEncoderLayer(self.cfg)
            yield pre_ln_block(f"text_model.encoder.layers.{i}.", module, self.cfg.hidden_act)

    def run(self, block: Block, batch: Batch) -> mx.array:
        return block.module(batch.hidden, batch.ctx["mask"])

    def tail(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        if "text_projection.weight" not in self.weights:
            return {}
        norm = nn.LayerNorm(self.cfg.hidden_size, eps=self.cfg.layer_norm_eps)
        self.weights.load_into(norm, "text_model.final_layer_norm.")
        pooled = []
        for b in batches:
            ids = b.ctx["ids"]
            # EOS pooling as CLIPTextTransformer does it (legacy configs: the largest id).
            pos = ids.argmax(-1) if self.cfg.eos_token_id == 2 else (ids == self.cfg.eos_token_id).argmax(-1)
            x = norm(b.hidden)
            pooled.append(np.array(x[mx.arange(len(ids)), mx.array(pos.astype(np.int32))]))
        return {"text_projection": np.concatenate(pooled)}


class ClipVisionStream(Stream):
    name = "vision_model"

    def __init__(self, cfg: VisionConfig, weights: Weights, data: CalibrationSet) -> None:

        self.cfg, self.weights, self.data = cfg, weights, data
        image_cfg = ClipImageConfig.load(weights.ckpt.path, cfg.image_size)
        self.preprocess = lambda images: preprocess_images(images, image_cfg)

    def start(self) -> list[Batch]:
        emb = CLIPVisionEmbeddings(self.cfg)
        self.weights.load_into(emb, "vision_model.embeddings.")
        pre = nn.LayerNorm(self.cfg.hidden_size, eps=self.cfg.layer_norm_eps)
        self.weights.load_into(pre, "vision_model.pre_layrnorm.")
        pixels = self.data.arrays.get("pixel_values")
        n = len(pixels) if pixels is not None else len(self.data.images)
        out = []
        for s in chunks(n):
            px = np.asarray(pixels[s], np.float32) if pixels is not None else self.preprocess(self.data.images[s])
            hidden = pre(emb(mx.array(px).transpose(0, 2, 3, 1)))
            out.append(Batch(hidden, np.ones(hidden.shape[:2], bool)))
        return out

    def blocks(self) -> Iterator[Block]:
        for i in range(self.cfg.num_hidden_layers):
            module = CLIPEncoderLayer(self.cfg)
            yield pre_ln_block(f"vision_model.encoder.layers.{i}.", module, self.cfg.hidden_act)

    def run(self, block: Block, batch: Batch) -> mx.array:
        return block.module(batch.hidden, None)

    def tail(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        if "visual_projection.weight" not in self.weights:
            return {}
        norm = nn.LayerNorm(self.cfg.hidden_size, eps=self.cfg.layer_norm_eps)
        self.weights.load_into(norm, "vision_model.post_layernorm.")
        return {"visual_projection": np.concatenate([np.array(norm(b.hidden[:, 0])) for b in batches])}


def calibration_streams(config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int) -> list[Stream]:
    """Both towers; the user's data calibrates the tower it fits, the other gets its built-in default."""
    cfg = ClipConfig.from_dict(config)
    words = vocab_words(weights.ckpt.path / "tokenizer.json") if not data else None
    user = load(data, seed, "text") if data else None
    has_text = user is not None and (user.texts or "input_ids" in user.arrays)
    texts = user if user is not None and has_text else load(None, seed, "text", words)
    images = user if user is not None and (user.images or "pixel_values" in user.arrays) else None
    return [
        ClipTextStream(cfg.text, weights, texts),
        ClipVisionStream(cfg.vision, weights, images or load(None, seed, "images")),
    ]
