"""CLIP input processing, equivalent to Hugging Face ``CLIPProcessor`` (PIL backend).

Text: byte-level BPE with ``</w>`` end-of-word suffix, lowercased, wrapped in ``<|startoftext|>`` /
``<|endoftext|>``, padded to the longest text with the pad token and truncated to the context length.
Images: convert to RGB (alpha composited onto white), resize the shortest edge with bicubic resampling,
center crop, rescale to [0, 1] and normalize with the mean/std of ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from mlxd_daemon.errors import InvalidArgument, NotFound

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


@dataclass(frozen=True)
class ImageConfig:
    """The subset of ``preprocessor_config.json`` that CLIP's image processor uses."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.BICUBIC
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageConfig:
        """Parse both the old (``size: 224``) and new (``size: {"shortest_edge": 224}``) spellings."""
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        size, crop = d.get("size"), d.get("crop_size")
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                msg = f"preprocessor size {size} is not supported: CLIP resizes by shortest_edge"
                raise InvalidArgument(msg, reason="BAD_PREPROCESSOR_CONFIG")
            kw["shortest_edge"] = int(size["shortest_edge"])
        elif size is not None:
            kw["shortest_edge"] = int(size)
        if isinstance(crop, dict):
            kw["crop_height"], kw["crop_width"] = int(crop["height"]), int(crop["width"])
        elif crop is not None:
            kw["crop_height"] = kw["crop_width"] = int(crop)
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        return cls(**kw)

    @classmethod
    def load(cls, model_dir: Path, image_size: int) -> ImageConfig:
        """From ``preprocessor_config.json``, or CLIP defaults sized to the model when the file is absent."""
        path = model_dir / "preprocessor_config.json"
        if path.exists():
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3]; transparency is composited onto white as HF does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _resize_shortest(image: np.ndarray, edge: int, resample: int) -> np.ndarray:
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    # int() truncation, not rounding: this is what HF's get_resize_output_image_size does.
    new_short, new_long = edge, int(edge * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=resample))


def _center_crop(image: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < ch or w < cw:
        # Too small: zero-pad to at least the crop size, centred (ceil on the leading side), then crop.
        nh, nw = max(h, ch), max(w, cw)
        top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)
        padded = np.zeros((nh, nw, *image.shape[2:]), image.dtype)
        padded[top_pad : top_pad + h, left_pad : left_pad + w] = image
        image, h, w = padded, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]


def preprocess_image(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """One image -> float32 [3, H, W], bit-for-bit what HF's PIL-backend CLIPImageProcessor returns."""
    if not isinstance(image, Image.Image):
        msg = f"expected a PIL.Image, got {type(image).__name__}"
        raise InvalidArgument(msg, reason="BAD_IMAGE")
    arr = _to_rgb(image) if cfg.do_convert_rgb else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if cfg.do_resize:
        arr = _resize_shortest(arr, cfg.shortest_edge, cfg.resample)
    if cfg.do_center_crop:
        arr = _center_crop(arr, cfg.crop_height, cfg.crop_width)
    return rescale_normalize(arr, cfg)


def rescale_normalize(arr: np.ndarray, cfg: Any) -> np.ndarray:
    """uint8 HWC -> float32 CHW with HF's ``do_rescale``/``rescale_factor`` and ``do_normalize``/mean/std
    (any image config carrying those fields: CLIP's, ViT's)."""
    out = arr.astype(np.float32)
    if cfg.do_rescale:
        # HF multiplies in float64 and then rounds to float32; doing the same keeps us bit-exact.
        out = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, np.float32)
        std = np.asarray(cfg.image_std, np.float32)
        out = (out - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def preprocess_images(images: list[Image.Image], cfg: ImageConfig) -> np.ndarray:
    """Batch of images -> float32 [n, 3, H, W]; an empty list gives shape [0, 3, crop_h, crop_w]."""
    if not images:
        return np.zeros((0, 3, cfg.crop_height, cfg.crop_width), np.float32)
    return np.stack([preprocess_image(im, cfg) for im in images])
