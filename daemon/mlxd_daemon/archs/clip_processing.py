"""CLIP text processing, equivalent to Hugging Face ``CLIPTokenizer`` (images: ``image_processing``).

Byte-level BPE with ``</w>`` end-of-word suffix, lowercased, wrapped in ``<|startoftext|>`` /
``<|endoftext|>``, padded to the longest text with the pad token and truncated to the context length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from mlxd_daemon.errors import InvalidArgument, NotFound

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's word splitter: specials, English contractions, letter runs, single digits, punctuation runs.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_pre_tokenizer() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    """CLIP's normalizer (NFC, collapse whitespace, lowercase) and pre-tokenizer (split, then byte-level)."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, pre


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A CLIP-style ``tokenizers.Tokenizer`` from a vocab and BPE merges (both specials must be in vocab)."""
    for special in (BOS_TOKEN, EOS_TOKEN):
        if special not in vocab:
            msg = f"tokenizer vocab lacks {special!r}: is this a CLIP vocab.json?"
            raise InvalidArgument(msg, reason="BAD_TOKENIZER")
    model = BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
        fuse_unk=False,
        unk_token=EOS_TOKEN,
    )
    tok = Tokenizer(model)
    tok.normalizer, tok.pre_tokenizer = clip_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    tok.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, vocab[EOS_TOKEN]),
        (BOS_TOKEN, vocab[BOS_TOKEN]),
        trim_offsets=False,
        add_prefix_space=False,
    )
    return tok


def load_tokenizer(model_dir: Path, max_length: int) -> Tokenizer:
    """Load ``tokenizer.json`` (or vocab.json + merges.txt) and set CLIP padding and truncation."""
    if (model_dir / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    elif (model_dir / "vocab.json").exists() and (model_dir / "merges.txt").exists():
        vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
        lines = (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        tok = build_clip_tokenizer(vocab, merges)  # type: ignore[arg-type]
    else:
        msg = f"no tokenizer.json or vocab.json+merges.txt in {model_dir}: copy the tokenizer files there"
        raise NotFound(msg, reason="TOKENIZER_NOT_FOUND", path=str(model_dir))
    pad = _pad_token(model_dir)
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        msg = f"pad token {pad!r} is not in the tokenizer vocab of {model_dir}"
        raise InvalidArgument(msg, reason="BAD_TOKENIZER")
    # Truncation counts the BOS/EOS the post-processor adds, like HF's truncation=True.
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad)
    return tok


def _pad_token(model_dir: Path) -> str:
    """HF CLIP pads with ``<|endoftext|>`` unless tokenizer_config/special_tokens_map say otherwise."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.exists():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return EOS_TOKEN


def tokenize(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` as int64 arrays [n, longest]; empty list -> shape [0, 0]."""
    if not texts:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
    encs = tok.encode_batch([str(t) for t in texts])
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask
