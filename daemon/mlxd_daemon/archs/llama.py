"""Llama-family decoders (HF ``model_type`` llama; aliases mistral, qwen2) in MLX: config, modules, loading.

The on-disk layout is exactly mlx-lm's (``mlx_lm.load`` reads our Convert output unchanged): Hugging Face names
(``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, the two RMSNorms,
``model.norm``, ``lm_head`` absent when embeddings are tied), Linear weights ``[out, in]`` as in PyTorch, no
layout changes. Compute is float32 on the CPU whatever the storage dtype; quantized weights are dequantized once.

Text generation (KV cache, sampling, incremental detokenizing, stats) is in ``llama_generate``; ``embed`` is not
offered (``USE_GENERATE``). Validation outputs (``run_reference`` / ``run_mlx``) on right-padded golden token rows,
padded positions zeroed on both sides: ``logits`` [n, L, vocab] and ``last_hidden_state`` [n, L, hidden] (after
the final norm). ``agreement_metrics`` adds top-1/top-5 next-token agreement and greedy-generation agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import Tokenizer

from mlxd_daemon.archs._activations import silu
from mlxd_daemon.archs._loading import (
    fill_model,
    read_json,
    read_safetensors,
    require_dir,
    storage_dtype,
)
from mlxd_daemon.archs.llama_generate import GenerationStats, KVCache, TextGenerator, read_stop_ids
from mlxd_daemon.errors import InvalidArgument, Unsupported
from mlxd_daemon.taps import tap

MODEL_TYPES = ("llama", "mistral", "qwen2")
DISK_LAYOUT: dict[str, str] = {}  # every tensor is stored as MLX (and mlx-lm) uses it
ROPE_TYPES = ("default", "linear", "llama3")
_TOP_LEVEL = ("model.", "lm_head.")


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # 0: same as num_attention_heads (MHA)
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # llama: q, k, v and o; qwen2: q, k, v only (see qkv_bias/o_bias)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # enforced as a context limit only (see max_context)
    eos_token_id: int | list[int] | None = None
    quantization: dict[str, Any] | None = None
    qkv_bias: bool = field(default=False, init=False)
    o_bias: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "num_key_value_heads", self.num_key_value_heads or self.num_attention_heads)
        set_(self, "head_dim", self.head_dim or self.hidden_size // self.num_attention_heads)
        # HF Qwen2Attention hard-codes bias on q/k/v and none on o; Llama's attention_bias covers all four.
        set_(self, "qkv_bias", self.model_type == "qwen2" or self.attention_bias)
        set_(self, "o_bias", self.model_type != "qwen2" and self.attention_bias)
        if self.hidden_act != "silu":
            msg = f"hidden_act {self.hidden_act!r} is not supported for {self.model_type}: only silu"
            raise Unsupported(msg, reason="UNSUPPORTED_ACTIVATION", hidden_act=self.hidden_act)
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            msg = f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            raise Unsupported(msg, reason="UNSUPPORTED_ROPE", rope_type=str(rope_type))
        if self.num_attention_heads % self.num_key_value_heads:
            msg = f"num_attention_heads {self.num_attention_heads} is not a multiple of {self.num_key_value_heads}"
            raise InvalidArgument(msg, reason="BAD_CONFIG")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Parse config.json (classic ``rope_theta``/``rope_scaling`` or transformers 5 ``rope_parameters``)."""
        known = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        if "rope_theta" in rope and "rope_theta" not in d:
            kwargs["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        kwargs["rope_scaling"] = {**rope, "rope_type": rope_type} if rope_type != "default" else None
        if d.get("model_type") == "qwen2" and not d.get("use_sliding_window"):
            kwargs.pop("sliding_window", None)  # Qwen2 configs carry a window that is off unless this flag is set
        return cls(**kwargs)

    @property
    def max_context(self) -> int | None:
        """Longest sequence computed exactly: sliding-window attention is not implemented, so cap at the window."""
        return self.sliding_window


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Per-pair wavelengths / 2π (``mx.fast.rope``'s ``freqs`` = 1 / HF ``inv_freq``), computed as transformers does."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))).astype(
        np.float32
    )
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        factor = np.float32(scaling["factor"])
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return (1.0 / inv).astype(np.float32)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def __call__(self, x: mx.array, freqs: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        b, n, _ = x.shape
        q = self.q_proj(x).reshape(b, n, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, n, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, self.n_kv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        # HF rotates halves (rotate_half), which is MLX's non-traditional rope.
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
        if cache is not None:
            k, v = cache.update(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # GQA broadcasts kv
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)  # mx.fast.rms_norm inside
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, freqs: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), freqs, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._freqs = mx.array(rope_frequencies(cfg))  # underscore: not a parameter

    def hidden(self, ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Final-norm hidden states [B, L, D] for token ids [B, L], appending to ``cache`` when given."""
        n = ids.shape[1]
        offset = cache[0].offset if cache else 0
        mask: Any = None
        if n > 1:
            # A later prefill chunk sees every cached key plus a causal block over its own positions.
            mask = "causal" if offset == 0 else mx.arange(offset + n)[None] <= (offset + mx.arange(n))[:, None]
        x = tap("model.embed_tokens", self.model.embed_tokens(ids))
        for i, layer in enumerate(self.model.layers):
            x = tap(f"model.layers.{i}", layer(x, self._freqs, mask, cache[i] if cache else None))
        return self.model.norm(x)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return cast("mx.array", self.lm_head(hidden))


@dataclass
class LlamaBundle(TextGenerator):
    """A loaded Llama-family model (float32 compute), its tokenizer and stop tokens, plus storage facts.

    ``encode``, ``generate`` and ``apply_chat_template`` come from ``llama_generate.TextGenerator``."""

    model: LlamaForCausalLM
    config: LlamaConfig
    tokenizer: Tokenizer
    model_dir: Path
    dtype: str  # storage dtype of the float tensors on disk
    nbytes: int
    stop_ids: frozenset[int]
    quantization: dict[str, Any] | None = None
    compute_dtype: str = "float32"
    bos_token: str | None = None
    stats: GenerationStats | None = None  # of the last finished generate()
    _chat_tokenizer: Any = None

    @property
    def max_context(self) -> int | None:
        return self.config.max_context

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, np.ndarray]:
        """Not offered: a causal LM has no embedding output of its own."""
        msg = f"{self.config.model_type} is a text-generation model: use Generate (mlxctl generate), not Infer"
        raise InvalidArgument(msg, reason="USE_GENERATE", model_type=self.config.model_type)

    def forward_outputs(self, input_ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """``logits`` and ``last_hidden_state`` of right-padded rows, positions past each length zeroed."""
        h = self.model.hidden(mx.array(np.asarray(input_ids, np.int32)))
        logits = self.model.logits(h)
        valid = mx.array(np.arange(input_ids.shape[1])[None, :] < np.asarray(lengths)[:, None])[..., None]
        out = {"logits": mx.where(valid, logits, 0.0), "last_hidden_state": mx.where(valid, h, 0.0)}
        mx.eval(out)
        return {k: np.array(v) for k, v in out.items()}


def map_weight(name: str) -> str | None:
    """HF tensor name -> name on disk (unchanged); ``None`` for rotary ``inv_freq`` buffers and foreign tensors."""
    if name.endswith("rotary_emb.inv_freq") or not name.startswith(_TOP_LEVEL):
        return None
    return name


def read_config(model_dir: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    """Parse ``model_dir/config.json``; InvalidArgument unless it is a Llama-family config."""
    raw = read_json(Path(model_dir) / "config.json", "Llama")
    if raw.get("model_type") not in MODEL_TYPES:
        msg = f"{model_dir} holds model_type {raw.get('model_type')!r}, not one of {', '.join(MODEL_TYPES)}"
        raise InvalidArgument(msg, reason="MODEL_TYPE_MISMATCH", model_type=str(raw.get("model_type")))
    return LlamaConfig.from_dict(raw), raw


def load(model_dir: Path) -> LlamaBundle:
    """Load a converted (or raw HF safetensors) Llama-family directory for float32 inference on the CPU."""
    model_dir = require_dir(model_dir)
    cfg, raw_cfg = read_config(model_dir)
    raw, _ = read_safetensors(model_dir)
    dtype = storage_dtype(raw)
    weights = {new: v for k, v in raw.items() if (new := map_weight(k)) is not None}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy
    model = LlamaForCausalLM(cfg)
    compute, nbytes = fill_model(model, weights, cfg.quantization, model_dir, cfg.model_type)
    del raw, weights
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        msg = f"{model_dir} has no tokenizer.json (sentencepiece-only tokenizers are not supported)"
        raise InvalidArgument(msg, reason="NO_TOKENIZER", path=str(model_dir))
    return LlamaBundle(
        model=model,
        config=cfg,
        tokenizer=Tokenizer.from_file(str(tokenizer_file)),
        model_dir=model_dir,
        dtype=dtype,
        nbytes=nbytes,
        stop_ids=read_stop_ids(model_dir, raw_cfg),
        quantization=cfg.quantization,
        compute_dtype=compute,
        bos_token=_bos_token(model_dir),
    )


def _bos_token(model_dir: Path) -> str | None:
    path = model_dir / "tokenizer_config.json"
    bos = read_json(path).get("bos_token") if path.exists() else None
    return str(bos.get("content")) if isinstance(bos, dict) else bos


# ---- validation hooks -------------------------------------------------------------------------------------


def golden_inputs(
    model_dir: Path, *, texts: list[str] | None = None, images: list[Any] | None = None
) -> dict[str, Any]:
    """Golden (or the caller's) prompts tokenized with BOS, right-padded into ``input_ids`` [n, L] + ``lengths``."""
    from mlxd_daemon.fixtures.llama import GOLDEN_PROMPTS

    if images:
        msg = "Llama models take no images: pass texts only"
        raise InvalidArgument(msg, reason="IMAGES_NOT_SUPPORTED")
    texts = list(GOLDEN_PROMPTS) if texts is None else list(texts)
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    rows = [tok.encode(t).ids for t in texts]
    width = max((len(r) for r in rows), default=0)
    ids = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return {"texts": texts, "input_ids": ids, "lengths": np.array([len(r) for r in rows], np.int64)}


def run_mlx(bundle: LlamaBundle, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """``logits`` and ``last_hidden_state`` for ``golden_inputs``' rows."""
    return bundle.forward_outputs(inputs["input_ids"], inputs["lengths"])


def _reference_model(src_dir: Path) -> Any:
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32).eval()


def run_reference(src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers' *ForCausalLM (float32, no_grad) on the same rows; keys and zeroing as ``run_mlx``."""
    import torch

    model = _reference_model(src_dir)
    ids = torch.from_numpy(np.asarray(inputs["input_ids"], np.int64))
    # Right padding under a causal mask cannot change the valid positions, so no attention mask is needed.
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model.lm_head(hidden)
    valid = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(np.asarray(inputs["lengths"]))[:, None]
    out = {"logits": logits * valid[..., None], "last_hidden_state": hidden * valid[..., None]}
    return {k: v.float().numpy() for k, v in out.items()}


def topk_agreement(
    ref_logits: np.ndarray, cand_logits: np.ndarray, k: int = 1, valid: np.ndarray | None = None
) -> float:
    """Mean overlap |top-k(ref) ∩ top-k(cand)| / k over positions (``valid`` [n, L] bool selects them).

    k=1 is plain next-token (argmax) agreement; 1.0 when there are no positions.
    """
    v = ref_logits.shape[-1]
    ref, cand = np.asarray(ref_logits).reshape(-1, v), np.asarray(cand_logits).reshape(-1, v)
    if valid is not None:
        keep = np.asarray(valid, bool).reshape(-1)
        ref, cand = ref[keep], cand[keep]
    if not len(ref):
        return 1.0
    top_r = np.argpartition(-ref, k - 1, axis=-1)[:, :k]
    top_c = np.argpartition(-cand, k - 1, axis=-1)[:, :k]
    overlap = [len(set(a) & set(b)) for a, b in zip(top_r.tolist(), top_c.tolist(), strict=True)]
    return float(np.mean(overlap)) / k


def agreement_metrics(
    src_dir: Path,
    bundle: LlamaBundle,
    inputs: dict[str, Any],
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    *,
    max_tokens: int = 16,
) -> dict[str, float]:
    """Reported, not gated: ``top1_agreement``, ``top5_agreement`` (valid positions) and greedy generation of
    ``max_tokens`` per prompt vs transformers ``generate(do_sample=False)``: ``greedy_agreement`` (mean fraction of
    identical leading tokens) and ``greedy_exact`` (fraction of prompts generated identically)."""
    import torch

    lengths = np.asarray(inputs["lengths"])
    valid = np.arange(inputs["input_ids"].shape[1])[None, :] < lengths[:, None]
    model = _reference_model(src_dir)
    prefixes, exact = [], []
    for row, n in zip(np.asarray(inputs["input_ids"]), lengths, strict=True):
        prompt = [int(t) for t in row[:n]]
        with torch.no_grad():
            ids = torch.tensor([prompt])
            # An explicit mask: generate() would otherwise treat ids equal to the pad id (often BOS) as padding.
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
        ref_tokens = out[0, n:].tolist()
        ours = [e["token_id"] for e in bundle.generate(prompt, max_tokens=max_tokens)]
        same = next((i for i, (a, b) in enumerate(zip(ref_tokens, ours, strict=False)) if a != b), None)
        prefix = min(len(ref_tokens), len(ours)) if same is None else same
        prefixes.append(prefix / max(len(ref_tokens), len(ours), 1))
        exact.append(ref_tokens == ours)
    return {
        "top1_agreement": topk_agreement(reference["logits"], candidate["logits"], 1, valid),
        "top5_agreement": topk_agreement(reference["logits"], candidate["logits"], 5, valid),
        "greedy_agreement": float(np.mean(prefixes)) if prefixes else 1.0,
        "greedy_exact": float(np.mean(exact)) if exact else 1.0,
    }
