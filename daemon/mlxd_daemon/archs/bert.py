"""BERT (HF ``model_type: bert``) in MLX: sentence embeddings and ``BertForSequenceClassification`` logits.

Module and parameter names are Hugging Face's ``BertModel`` names (no ``bert.`` prefix), so weights load by
name; nothing changes layout. Inputs and pooling settings come from ``bert_processing``.

Output keys of ``BertBundle.forward_outputs``, ``run_mlx`` and ``run_reference``:
  ``text_embeds`` [n, D·modes]: sentence embeddings pooled as sentence-transformers does (``bundle.pooling``);
  ``last_hidden_state`` [n, L, D]: encoder output (padded positions included, as HF returns them);
  ``pooler_output`` [n, D]: ``tanh(pooler.dense(h[:, 0]))``, only when the checkpoint has a pooler;
  ``logits`` [n, num_labels]: ``classifier(pooler_output)``, only for sequence classifiers.

Not implemented (their tensors are dropped by ``map_weight``): the MLM / NSP heads (``cls.*``) and
question answering (``qa_outputs.*``). Token-classification / multiple-choice ``classifier`` weights are
ignored at load: such models serve embeddings only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import Tokenizer

from mlxd_daemon.archs import _tensors
from mlxd_daemon.archs._activations import activation
from mlxd_daemon.archs._attention import attention
from mlxd_daemon.archs._config import ClassifierHead, labelled
from mlxd_daemon.archs._loading import fill_model, read_weights, require_dir
from mlxd_daemon.archs._loading import read_config as read_arch_config
from mlxd_daemon.archs._tokenless import has_tokenizer, vocabulary_ids
from mlxd_daemon.archs.bert_processing import Pooling, load_tokenizer, max_length, pool, pool_torch, tokenize
from mlxd_daemon.archs.bert_served import BertServed
from mlxd_daemon.archs.contract import Stored
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.taps import tap

if TYPE_CHECKING:
    from mlxd_daemon.calibrate.models import Stream, Weights

DISK_LAYOUT: dict[str, str] = {}  # every tensor keeps HF's layout (Linear weights are [out, in] in both)
_KEEP = ("embeddings.", "encoder.", "pooler.", "classifier.")
# Buffers, not parameters: position_ids is arange, token_type_ids zeros.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# TF-era checkpoints name LayerNorm parameters gamma/beta; transformers renames them the same way on load.
_RENAMES = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))
_SEQ_CLS = "BertForSequenceClassification"


@dataclass(frozen=True)
class BertConfig(ClassifierHead):
    HEAD_CLASS = _SEQ_CLS
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.position_embedding_type != "absolute":
            msg = f"position_embedding_type {self.position_embedding_type!r} is not supported: only 'absolute'"
            raise Unsupported(msg, reason="UNSUPPORTED_CONFIG", position_embedding_type=self.position_embedding_type)
        super().__post_init__()


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, ids: mx.array, token_type_ids: mx.array) -> mx.array:
        x = self.word_embeddings(ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings.weight[: ids.shape[1]])


class BertSelfAttention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.query = nn.Linear(dims, dims)
        self.key = nn.Linear(dims, dims)
        self.value = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return attention(self.query(x), self.key(x), self.value(x), self.heads, self.scale, mask)


class BertSelfOutput(nn.Module):
    """Shared shape of ``attention.output`` and ``output``: dense, residual, LayerNorm (post-norm)."""

    def __init__(self, dims_in: int, dims: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dims_in, dims)
        self.LayerNorm = nn.LayerNorm(dims, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg.hidden_size, cfg.num_attention_heads)  # sic: HF's module name
        self.output = BertSelfOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = [BertLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        for i, layer in enumerate(self.layer):
            # HF module paths (BertModel's; torch_taps also matches "bert.encoder.layer.i").
            x = tap(f"encoder.layer.{i}", layer(x, mask))
        return x


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def __call__(self, h: mx.array) -> mx.array:
        return mx.tanh(self.dense(h[:, 0]))


class BertModel(nn.Module):
    """``BertModel`` (+ ``classifier`` when ``num_labels``); pooler only when the checkpoint has one."""

    def __init__(self, cfg: BertConfig, *, pooler: bool, num_labels: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        if pooler:
            self.pooler = BertPooler(cfg)
        if num_labels:
            self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> mx.array:
        """last_hidden_state [B, L, D]."""
        self.check(input_ids)
        arrays = (input_ids, attention_mask, token_type_ids)
        return self.encode(*(mx.array(np.asarray(a).astype(np.int32)) for a in arrays))

    def check(self, input_ids: np.ndarray) -> None:
        n = input_ids.shape[1]
        if n > self.cfg.max_position_embeddings:
            msg = f"text is {n} tokens, the model takes at most {self.cfg.max_position_embeddings}: truncate it"
            raise InvalidArgument(msg, reason="TEXT_TOO_LONG")

    def encode(self, ids: mx.array, attention_mask: mx.array, token_type_ids: mx.array) -> mx.array:
        """last_hidden_state from token arrays (pure MLX, so the served path can compile it)."""
        # Boolean key mask (True = attend), broadcast over heads and queries, like HF's padding mask.
        mask = (attention_mask != 0)[:, None, None, :]
        x = tap("embeddings", self.embeddings(ids, token_type_ids))
        return self.encoder(x, mask)


@dataclass
class BertBundle(Stored):
    """A loaded BERT: model (float32 compute), tokenizer and pooling, plus storage facts."""

    model: BertModel
    config: BertConfig
    tokenizer: Tokenizer | None  # None: the directory has no tokenizer files (embedding texts then fails)
    pooling: Pooling

    @property
    def is_classifier(self) -> bool:
        return "classifier" in self.model

    def forward_outputs(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """All outputs (see the module docstring for keys); an empty batch gives empty arrays."""
        m, d = self.model, self.config.hidden_size
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        out: dict[str, mx.array] = {}
        if len(ids):
            hidden = m(ids, mask, np.asarray(token_type_ids))
            out["text_embeds"] = pool(hidden, mx.array(mask.astype(np.int32)), self.pooling)
            out["last_hidden_state"] = hidden
            if "pooler" in m:
                out["pooler_output"] = m.pooler(hidden)
                if self.is_classifier:
                    out["logits"] = m.classifier(out["pooler_output"])
        else:
            out["text_embeds"] = mx.zeros((0, d * len(self.pooling.modes)))
            out["last_hidden_state"] = mx.zeros((0, 0, d))
            if "pooler" in m:
                out["pooler_output"] = mx.zeros((0, d))
            if self.is_classifier:
                out["logits"] = mx.zeros((0, len(self.config.labels)))
        mx.eval(out)
        return {k: np.array(v) for k, v in out.items()}

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        """``text_embeds``; classifiers add ``logits`` [n, labels] and ``labels`` (id2label in order): the served
        path (a compiled forward over shape buckets, ``bert_served``)."""
        if images:
            msg = f"BERT is a text model: {len(images)} image(s) given, send texts only"
            raise InvalidArgument(msg, reason="IMAGES_NOT_SUPPORTED", images=len(images))
        tok = self.tokenizer or load_tokenizer(self.model_dir, 0)  # no tokenizer: TOKENIZER_NOT_FOUND
        return labelled(self.served.forward(tokenize(tok, list(texts))), self.config, self.is_classifier)

    def embed_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """``embed``'s outputs from token arrays (``_tensors``: ``input_ids``, optional ``attention_mask`` and
        ``token_type_ids``), through the same served path."""
        cfg = self.config
        _tensors.check_names(inputs, ("input_ids", "attention_mask", "token_type_ids"), "BERT")
        arrays = _tensors.tokens(inputs, vocab=cfg.vocab_size, positions=cfg.max_position_embeddings,
                                 type_vocab=cfg.type_vocab_size, required=True)  # fmt: skip
        return labelled(self.served.forward(arrays), self.config, self.is_classifier)

    @cached_property
    def served(self) -> BertServed:
        return BertServed(self)

    def warm_up(self) -> float:
        """Compile the common graphs now (called at load), so the first request does not pay for it."""
        return self.served.warm_up()


def map_weight(name: str) -> str | None:
    """HF tensor name -> name on disk: ``bert.`` prefix stripped, ``classifier.*`` kept, buffers and
    unimplemented heads (``cls.*`` MLM/NSP, ``qa_outputs.*``) dropped. A second pass is a no-op."""
    name = name.removeprefix("bert.")
    if name in _BUFFERS or not name.startswith(_KEEP):
        return None
    for old, new in _RENAMES:
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def read_config(model_dir: Path) -> BertConfig:
    """Parse ``model_dir/config.json``; raise ``InvalidArgument`` unless it is a BERT config."""
    return read_arch_config(model_dir, "bert", BertConfig.from_dict, "BERT")


def load(model_dir: Path) -> BertBundle:
    """Load a converted (or raw HF safetensors) BERT directory for float32 inference on the CPU."""
    model_dir = require_dir(model_dir)
    cfg = read_config(model_dir)
    weights, _, dtype = read_weights(model_dir, map_weight)
    if not cfg.is_classifier:
        # Token-classification / multiple-choice heads are not implemented: serve the encoder only.
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    has_pooler = "pooler.dense.weight" in weights
    if cfg.is_classifier and not has_pooler:
        msg = f"{model_dir} is a {_SEQ_CLS} without pooler weights: re-convert the full checkpoint"
        raise InvalidArgument(msg, reason="WEIGHTS_MISMATCH", missing="pooler.dense.weight")
    model = BertModel(cfg, pooler=has_pooler, num_labels=len(cfg.labels) if cfg.is_classifier else 0)
    compute, nbytes = fill_model(model, weights, cfg.quantization, model_dir, "BERT")
    pooling = Pooling.load(model_dir)
    return BertBundle(
        model=model,
        config=cfg,
        tokenizer=load_tokenizer(model_dir, max_length(model_dir, cfg.max_position_embeddings, pooling))
        if has_tokenizer(model_dir)
        else None,
        pooling=pooling,
        model_dir=model_dir,
        dtype=dtype,
        nbytes=nbytes,
        quantization=cfg.quantization,
        compute_dtype=compute,
    )


# ---- validation hooks -------------------------------------------------------------------------------------


def golden_inputs(
    model_dir: Path, *, texts: list[str] | None = None, images: list[Any] | None = None
) -> dict[str, Any]:
    """Deterministic sentences (or the caller's), tokenized with ``model_dir``'s tokenizer and limits."""
    from mlxd_daemon.golden import GOLDEN_SENTENCES

    if images:
        msg = f"BERT is a text model: {len(images)} image(s) given, validate with texts only"
        raise InvalidArgument(msg, reason="IMAGES_NOT_SUPPORTED", images=len(images))
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    pooling = Pooling.load(model_dir)
    if texts is None and not has_tokenizer(model_dir):
        ids, mask, note = vocabulary_ids(cfg.vocab_size, max_length(model_dir, cfg.max_position_embeddings, pooling))
        return {"texts": [], "images": [], "input_ids": ids, "attention_mask": mask,
                "token_type_ids": np.zeros_like(ids), "inputs_note": note}  # fmt: skip
    texts = list(GOLDEN_SENTENCES) if texts is None else list(texts)
    tok = load_tokenizer(model_dir, max_length(model_dir, cfg.max_position_embeddings, pooling))
    return {"texts": texts, "images": [], **tokenize(tok, texts)}


def run_mlx(bundle: BertBundle, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The MLX outputs for ``golden_inputs``' token arrays."""
    return bundle.forward_outputs(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])


def run_reference(src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers (float32, no_grad) on the same token arrays, pooled as the *source's* sentence-transformers
    config says (a converted directory that lost that config then fails on ``text_embeds``); keys as ``run_mlx``.
    """
    import torch
    import transformers

    from mlxd_daemon.checkpoint import open_checkpoint
    from mlxd_daemon.checkpoint import read_config as checkpoint_config

    src_dir = Path(src_dir)
    cfg = read_config(src_dir)
    pooling = Pooling.load(src_dir)
    auto = transformers.AutoModelForSequenceClassification if cfg.is_classifier else transformers.AutoModel
    model = auto.from_pretrained(str(src_dir), dtype=torch.float32).eval()
    # transformers builds a random pooler when the checkpoint has none; such a pooler is not an output.
    ckpt = open_checkpoint(src_dir, checkpoint_config(src_dir))  # headers only for safetensors
    has_pooler = any(map_weight(k) == "pooler.dense.weight" for k in ckpt.tensors)
    ckpt.release()
    t = {
        k: torch.from_numpy(np.asarray(inputs[k], np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    d = cfg.hidden_size
    if not len(t["input_ids"]):
        empty = {"text_embeds": (0, d * len(pooling.modes)), "last_hidden_state": (0, 0, d)}
        empty |= {"pooler_output": (0, d)} if has_pooler else {}
        empty |= {"logits": (0, len(cfg.labels))} if cfg.is_classifier else {}
        return {k: np.zeros(shape, np.float32) for k, shape in empty.items()}
    with torch.no_grad():
        o = model.base_model(**t)
        out = {"text_embeds": pool_torch(o.last_hidden_state, t["attention_mask"], pooling)}
        out["last_hidden_state"] = o.last_hidden_state
        if has_pooler:
            out["pooler_output"] = o.pooler_output
        if cfg.is_classifier:
            out["logits"] = model(**t).logits
    return {k: v.float().numpy() for k, v in out.items()}


def calibration_streams(config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int) -> list[Stream]:
    """AWQ/GPTQ: the encoder's layers (``bert_calibrate``)."""
    from mlxd_daemon.archs.bert_calibrate import calibration_streams

    return calibration_streams(config, weights, data, seed)
