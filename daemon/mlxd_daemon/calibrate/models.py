"""Per-architecture calibration streams: the float model run block by block on the calibration set.

A stream (BERT's encoder; CLIP's text and vision towers; an mlx-lm decoder) turns samples into the hidden states
that enter its first block, then lists its blocks one at a time (a fresh MLX module, weights read from the
checkpoint only when the block is reached) and, after the last, the inputs of its head Linears. Module classes are
the arch modules' own, so the calibration forward is the served forward. Each block names its Linears and where an
input scale can be folded (``Fold``) or why not (``no_fold``): in post-LayerNorm BERT the LayerNorm output feeding
q/k/v and intermediate.dense is also the residual, so scaling it would change the function.
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

from mlxd_daemon.calibrate.data import CalibrationSet, load, vocab_words
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
    """One tower: ``start`` → batches, ``blocks`` one at a time, ``run`` a block, ``tail`` head-Linear inputs."""

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


def _chunks(n: int) -> Iterator[slice]:
    for i in range(0, n, BATCH):
        yield slice(i, min(i + BATCH, n))


def _array_rows(data: CalibrationSet, key: str, default: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    base = data.arrays["input_ids"]
    return np.asarray(data.arrays[key]) if key in data.arrays else default(base)


def _text_batches(data: CalibrationSet, encode: Callable[[list[str]], dict[str, np.ndarray]]) -> Iterator[dict]:
    """Token arrays per batch: the texts encoded, or the user's .npz rows."""
    if data.arrays:
        if "input_ids" not in data.arrays:
            msg = f"calibration .npz {data.path} has no input_ids for this text model"
            raise InvalidArgument(msg, reason="BAD_CALIBRATION_DATA", path=data.path)
        ids = np.asarray(data.arrays["input_ids"], np.int64)
        mask = _array_rows(data, "attention_mask", np.ones_like)
        for s in _chunks(len(ids)):
            yield {"input_ids": ids[s, :MAX_TOKENS], "attention_mask": np.asarray(mask[s, :MAX_TOKENS], np.int64)}
        return
    for s in _chunks(len(data.texts)):
        enc = encode(data.texts[s])
        yield {k: v[:, :MAX_TOKENS] for k, v in enc.items()}


# ---- BERT -------------------------------------------------------------------------------------------------


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
        from mlxd_daemon.archs import bert
        from mlxd_daemon.archs.bert_processing import Pooling, load_tokenizer, max_length, tokenize

        self.bert, self.weights, self.data = bert, weights, data
        self.cfg = bert.BertConfig.from_dict(config)
        path = weights.ckpt.path
        tok = load_tokenizer(path, max_length(path, self.cfg.max_position_embeddings, Pooling.load(path)))
        self.encode = lambda texts: tokenize(tok, texts)

    def start(self) -> list[Batch]:
        emb = self.bert.BertEmbeddings(self.cfg)
        self.weights.load_into(emb, "embeddings.")
        out = []
        for t in _text_batches(self.data, self.encode):
            ids, mask = t["input_ids"], t["attention_mask"]
            types = t.get("token_type_ids", np.zeros_like(ids))
            hidden = emb(mx.array(ids.astype(np.int32)), mx.array(np.asarray(types).astype(np.int32)))
            ctx = {"mask": mx.array(mask.astype(bool)[:, None, None, :])}
            out.append(Batch(hidden, mask.astype(bool), ctx))
        return out

    def blocks(self) -> Iterator[Block]:
        for i in range(self.cfg.num_hidden_layers):
            yield bert_block(f"encoder.layer.{i}.", self.bert.BertLayer(self.cfg), self.cfg.hidden_act)

    def run(self, block: Block, batch: Batch) -> mx.array:
        return block.module(batch.hidden, batch.ctx["mask"])

    def tail(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        if "pooler.dense.weight" not in self.weights:
            return {}
        return {"pooler.dense": np.concatenate([np.array(b.hidden[:, 0]) for b in batches])}


# ---- CLIP -------------------------------------------------------------------------------------------------


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

    def __init__(self, cfg: Any, weights: Weights, data: CalibrationSet) -> None:
        from mlxd_daemon.archs import clip
        from mlxd_daemon.archs.clip_processing import load_tokenizer, tokenize

        self.clip, self.cfg, self.weights, self.data = clip, cfg, weights, data
        tok = load_tokenizer(weights.ckpt.path, cfg.max_position_embeddings)

        def encode(texts: list[str]) -> dict[str, np.ndarray]:
            ids, mask = tokenize(tok, texts)
            return {"input_ids": ids, "attention_mask": mask}

        self.encode = encode

    def start(self) -> list[Batch]:
        emb = self.clip.CLIPTextEmbeddings(self.cfg)
        self.weights.load_into(emb, "text_model.embeddings.")
        out = []
        for t in _text_batches(self.data, self.encode):
            ids, mask = t["input_ids"][:, : self.cfg.max_position_embeddings], t["attention_mask"]
            mask = mask[:, : ids.shape[1]]
            n = ids.shape[1]
            causal = np.tril(np.ones((n, n), dtype=bool))
            ctx = {"mask": mx.array(causal[None, None] & mask.astype(bool)[:, None, None, :]), "ids": ids}
            out.append(Batch(emb(mx.array(ids.astype(np.int32))), mask.astype(bool), ctx))
        return out

    def blocks(self) -> Iterator[Block]:
        for i in range(self.cfg.num_hidden_layers):
            module = self.clip.CLIPEncoderLayer(self.cfg)
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

    def __init__(self, cfg: Any, weights: Weights, data: CalibrationSet) -> None:
        from mlxd_daemon.archs import clip
        from mlxd_daemon.archs.image_processing import ClipImageConfig, preprocess_images

        self.clip, self.cfg, self.weights, self.data = clip, cfg, weights, data
        image_cfg = ClipImageConfig.load(weights.ckpt.path, cfg.image_size)
        self.preprocess = lambda images: preprocess_images(images, image_cfg)

    def start(self) -> list[Batch]:
        emb = self.clip.CLIPVisionEmbeddings(self.cfg)
        self.weights.load_into(emb, "vision_model.embeddings.")
        pre = nn.LayerNorm(self.cfg.hidden_size, eps=self.cfg.layer_norm_eps)
        self.weights.load_into(pre, "vision_model.pre_layrnorm.")
        pixels = self.data.arrays.get("pixel_values")
        n = len(pixels) if pixels is not None else len(self.data.images)
        out = []
        for s in _chunks(n):
            px = np.asarray(pixels[s], np.float32) if pixels is not None else self.preprocess(self.data.images[s])
            hidden = pre(emb(mx.array(px).transpose(0, 2, 3, 1)))
            out.append(Batch(hidden, np.ones(hidden.shape[:2], bool)))
        return out

    def blocks(self) -> Iterator[Block]:
        for i in range(self.cfg.num_hidden_layers):
            module = self.clip.CLIPEncoderLayer(self.cfg)
            yield pre_ln_block(f"vision_model.encoder.layers.{i}.", module, self.cfg.hidden_act)

    def run(self, block: Block, batch: Batch) -> mx.array:
        return block.module(batch.hidden, None)

    def tail(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        if "visual_projection.weight" not in self.weights:
            return {}
        norm = nn.LayerNorm(self.cfg.hidden_size, eps=self.cfg.layer_norm_eps)
        self.weights.load_into(norm, "vision_model.post_layernorm.")
        return {"visual_projection": np.concatenate([np.array(norm(b.hidden[:, 0])) for b in batches])}


# ---- mlx-lm decoders ---------------------------------------------------------------------------------------

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
        for t in _text_batches(self.data, self.encode):
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


def streams(config: dict[str, Any], weights: Weights, data_path: str | Path | None, seed: int) -> list[Stream]:
    """The calibration streams of ``config``'s architecture, each with its calibration set."""
    from mlxd_daemon.archs import MLX_LM, resolve

    model_type = str(config.get("model_type"))
    words = vocab_words(weights.ckpt.path / "tokenizer.json") if not data_path else None
    if model_type == "bert":
        return [BertStream(config, weights, load(data_path, seed, "text", words))]
    if resolve(model_type, allow_export=False).path == MLX_LM:
        return [DecoderStream(config, weights, load(data_path, seed, "text", words))]
    if model_type == "clip":
        from mlxd_daemon.archs.clip import ClipConfig

        cfg = ClipConfig.from_dict(config)
        user = load(data_path, seed, "text") if data_path else None
        # The user's data calibrates the tower it fits; the other tower gets its built-in default.
        has_text = user is not None and (user.texts or "input_ids" in user.arrays)
        texts = user if user is not None and has_text else load(None, seed, "text", words)
        images = user if user is not None and (user.images or "pixel_values" in user.arrays) else None
        return [
            ClipTextStream(cfg.text, weights, texts),
            ClipVisionStream(cfg.vision, weights, images or load(None, seed, "images")),
        ]
    msg = f"calibrated quantization is not implemented for model_type {model_type!r}: use method rtn"
    raise Unsupported(msg, reason="UNSUPPORTED_CALIBRATION", model_type=model_type)
