"""BERT text inputs and sentence-transformers pooling settings, read from a model directory.

Tokenization equals ``AutoTokenizer(texts, padding=True, truncation=True, max_length=...)``: ``tokenizer.json``
(or ``vocab.txt`` rebuilt as HF's converter does), padded to the longest text, truncated to the model's limit,
``token_type_ids`` all zero (single sentences). Pooling follows sentence-transformers' ``modules.json``,
``1_Pooling/config.json`` and ``sentence_bert_config.json``; without them: mean pooling + L2 normalisation.
``pool`` (MLX) and ``pool_torch`` (the reference) apply those settings the way sentence-transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from mlxd_daemon.errors import InvalidArgument, NotFound, Unsupported

# sentence-transformers' Pooling concatenates the enabled modes in this order.
POOLING_MODES: tuple[str, ...] = ("cls", "max", "mean", "mean_sqrt_len")
_MODE_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}
_UNSUPPORTED_MODE_KEYS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        msg = f"{path} is not valid JSON ({e})"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=str(path)) from None
    return data if isinstance(data, dict) else {"value": data}


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence embedding; ``source`` says which file decided it."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_seq_length: int | None = None
    source: str = "default (no sentence-transformers config: mean + normalize)"

    @property
    def name(self) -> str:
        return "+".join(self.modes) + ("+normalize" if self.normalize else "")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pooling:
        """From a ``1_Pooling/config.json`` dict (``normalize`` defaults to False there); unknown keys ignored."""
        used = [k for k in _UNSUPPORTED_MODE_KEYS if d.get(k)]
        if used or d.get("pooling_mode") in ("weightedmean", "lasttoken"):
            msg = f"sentence-transformers pooling {used or d.get('pooling_mode')} is not supported: use cls/mean/max"
            raise Unsupported(msg, reason="UNSUPPORTED_POOLING")
        modes = tuple(m for m in POOLING_MODES if d.get(_MODE_KEYS[m]))
        if not modes and isinstance(d.get("pooling_mode"), str):
            modes = ({"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(d["pooling_mode"], ""),)
        if not all(modes) or not modes:
            msg = f"pooling config {d} enables no supported mode: set pooling_mode_mean_tokens or _cls_token"
            raise InvalidArgument(msg, reason="BAD_POOLING_CONFIG")
        return cls(modes=modes, normalize=bool(d.get("normalize", False)), source="")

    @classmethod
    def load(cls, model_dir: Path) -> Pooling:
        """sentence-transformers' settings from ``model_dir``, else the mean + normalize default."""
        model_dir = Path(model_dir)
        modules = _json(model_dir / "modules.json")
        st_config = _json(model_dir / "sentence_bert_config.json") or {}
        max_len = st_config.get("max_seq_length")
        max_len = int(max_len) if isinstance(max_len, int) else None
        if modules is None:
            default = cls(max_seq_length=max_len)
            pool_cfg = _json(model_dir / "1_Pooling" / "config.json")
            if pool_cfg is None:
                return default
            # A pooling config without modules.json: use its modes, keep the default normalisation.
            p = cls.from_dict(pool_cfg)
            return cls(p.modes, True, max_len, "1_Pooling/config.json (no modules.json: normalize assumed)")
        entries = modules.get("value", [])
        types = [str(e.get("type", "")).rsplit(".", 1)[-1] for e in entries]
        unknown = [t for t in types if t not in _KNOWN_MODULES]
        if unknown:
            msg = (
                f"sentence-transformers modules {unknown} in {model_dir} are not supported "
                "(only Transformer, Pooling and Normalize are)"
            )
            raise Unsupported(msg, reason="UNSUPPORTED_SENTENCE_MODULE", modules=",".join(unknown))
        normalize = "Normalize" in types
        pool_entry = next((e for e, t in zip(entries, types, strict=True) if t == "Pooling"), None)
        if pool_entry is None:
            return cls(("cls",), normalize, max_len, "modules.json (no Pooling module: CLS token)")
        pool_path = model_dir / str(pool_entry.get("path", "1_Pooling")) / "config.json"
        pool_cfg = _json(pool_path)
        if pool_cfg is None:
            msg = f"{model_dir}/modules.json names a Pooling module but {pool_path} is missing: copy it there"
            raise NotFound(msg, reason="POOLING_CONFIG_NOT_FOUND", path=str(pool_path))
        p = cls.from_dict(pool_cfg)
        return cls(p.modes, normalize, max_len, "modules.json + " + str(pool_path.relative_to(model_dir)))


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    return _json(model_dir / "tokenizer_config.json") or {}


def max_length(model_dir: Path, max_position_embeddings: int, pooling: Pooling | None = None) -> int:
    """Truncation length: the smallest of the position table, ``model_max_length`` and ST's ``max_seq_length``."""
    limits = [max_position_embeddings]
    model_max = _tokenizer_config(model_dir).get("model_max_length")
    # HF writes a huge sentinel (1e30) when the tokenizer has no limit of its own.
    if isinstance(model_max, int) and model_max < 10**9:
        limits.append(model_max)
    if pooling is not None and pooling.max_seq_length:
        limits.append(pooling.max_seq_length)
    return min(limits)


def _special(cfg: dict[str, Any], key: str, default: str) -> str:
    value = cfg.get(key, default)
    return str(value.get("content", default) if isinstance(value, dict) else value)


def _from_vocab(model_dir: Path, cfg: dict[str, Any]) -> Tokenizer:
    """WordPiece from vocab.txt, built as transformers' ``BertConverter`` builds it."""
    vocab: dict[str, int] = {}
    for line in (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines():
        vocab.setdefault(line.rstrip("\n"), len(vocab))
    unk, cls_tok, sep = (
        _special(cfg, k, d) for k, d in (("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"))
    )
    for special in (unk, cls_tok, sep):
        if special not in vocab:
            msg = f"vocab.txt in {model_dir} lacks {special!r}: is this a BERT vocabulary?"
            raise InvalidArgument(msg, reason="BAD_TOKENIZER")
    tok = Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        strip_accents=cfg.get("strip_accents"),
        lowercase=bool(cfg.get("do_lower_case", True)),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls_tok}:0 $A:0 {sep}:0",
        pair=f"{cls_tok}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls_tok, vocab[cls_tok]), (sep, vocab[sep])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in (_special(cfg, "pad_token", "[PAD]"), unk, cls_tok, sep) if t in vocab])
    return tok


def load_tokenizer(model_dir: Path, max_len: int) -> Tokenizer:
    """``tokenizer.json`` (else vocab.txt) with its own padding/truncation replaced by pad-to-longest and
    truncation at ``max_len`` (a saved tokenizer.json may pad to a fixed 128, as all-MiniLM-L6-v2's does)."""
    model_dir = Path(model_dir)
    cfg = _tokenizer_config(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    elif (model_dir / "vocab.txt").is_file():
        tok = _from_vocab(model_dir, cfg)
    else:
        msg = f"no tokenizer.json or vocab.txt in {model_dir}: copy the tokenizer files there"
        raise NotFound(msg, reason="TOKENIZER_NOT_FOUND", path=str(model_dir))
    pad = _special(cfg, "pad_token", "[PAD]")
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        msg = f"pad token {pad!r} is not in the tokenizer vocab of {model_dir}"
        raise InvalidArgument(msg, reason="BAD_TOKENIZER")
    tok.no_padding()
    tok.enable_padding(pad_id=pad_id, pad_token=pad)
    # Counts the [CLS]/[SEP] the post-processor adds, like HF's truncation=True.
    tok.enable_truncation(max_length=max_len)
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` as int64 [n, longest]; no texts -> [0, 0]."""
    if not texts:
        empty = np.zeros((0, 0), np.int64)
        return {"input_ids": empty, "attention_mask": empty.copy(), "token_type_ids": empty.copy()}
    encs = tok.encode_batch([str(t) for t in texts])
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    # Single sentences are segment 0; HF's BERT tokenizer returns zeros too.
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def pool(hidden: mx.array, attention_mask: mx.array, pooling: Pooling) -> mx.array:
    """sentence-transformers' Pooling (+ Normalize): the enabled modes concatenated, in its order."""
    m = attention_mask.astype(hidden.dtype)[:, :, None]
    parts = []
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(mx.where(m > 0, hidden, -1e9).max(axis=1))
        else:
            total, count = (hidden * m).sum(axis=1), mx.maximum(m.sum(axis=1), 1e-9)
            parts.append(total / (mx.sqrt(count) if mode == "mean_sqrt_len" else count))
    out = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    if pooling.normalize:
        # torch.nn.functional.normalize clamps the norm at 1e-12.
        out = out / mx.maximum(mx.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def pool_torch(hidden: Any, attention_mask: Any, pooling: Pooling) -> Any:
    """sentence-transformers' Pooling + Normalize code path, in torch."""
    import torch

    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    parts = []
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(hidden.masked_fill(m == 0, -1e9).max(dim=1).values)
        else:
            count = m.sum(dim=1).clamp(min=1e-9)
            parts.append((hidden * m).sum(dim=1) / (count.sqrt() if mode == "mean_sqrt_len" else count))
    out = torch.cat(parts, dim=-1)
    return torch.nn.functional.normalize(out, p=2, dim=1) if pooling.normalize else out
