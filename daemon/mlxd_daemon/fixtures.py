"""Synthetic Hugging Face CLIP checkpoints, built offline for tests and the demo.

``make_clip`` writes what ``transformers.CLIPModel/CLIPProcessor.from_pretrained`` expect: config.json,
weights (safetensors or pytorch_model.bin), a real byte-level BPE tokenizer trained on a small built-in
corpus, and preprocessor_config.json. Weights are random but fixed by ``seed``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

from mlxd_daemon.archs.clip_processing import (
    BOS_TOKEN,
    END_OF_WORD,
    EOS_TOKEN,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    build_clip_tokenizer,
    clip_pre_tokenizer,
)
from mlxd_daemon.errors import InvalidArgument

GOLDEN_TEXTS: tuple[str, ...] = (
    "a photo of a cat",
    "a photo of a dog",
    "A red circle on a white background.",
    "two blue squares and a green triangle",
    "an empty, grey room at night",
    "the quick brown fox jumps over the lazy dog 42 times!",
)

_CORPUS = (
    "a photo of a cat. a photo of a dog. a picture of a bird sitting on a tree.",
    "the quick brown fox jumps over the lazy dog. the dog sleeps in the sun.",
    "a red circle on a white background. a blue square next to a green triangle.",
    "two people walking on the beach at sunset, the sky is orange and pink.",
    "an empty grey room at night with a single light on the ceiling.",
    "a close up photo of a yellow flower in a garden full of green leaves.",
    "a black and white drawing of a house with a tall chimney and smoke.",
    "children playing football in the park while their parents watch.",
    "a bowl of fresh fruit: apples, oranges, bananas and grapes on the table.",
    "a city street with cars, buses and bicycles in the rain.",
    "it's a painting of mountains and a lake, they're reflected in the water.",
    "we'll see 3 boats, 12 birds and 100 stars in the photo of the harbour.",
    "a diagram showing lines, circles, squares, triangles and gradients.",
    "an old man reading a newspaper on a wooden bench by the river.",
)

# Tiny: fast enough for unit tests; base: openai/clip-vit-base-patch32's shapes.
_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 30,
            "patch_size": 15,
        },
        "projection_dim": 16,
        "vocab_size": None,  # the trained tokenizer's size
    },
    "base": {
        "text": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
        },
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        "projection_dim": 512,
        "vocab_size": 49408,
    },
}
_DTYPES = ("float32", "float16", "bfloat16")
_MAX_POSITIONS = 77


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in byte order (GPT-2/CLIP scheme)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


@lru_cache(maxsize=1)
def train_tokenizer(target_size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train CLIP-style BPE merges on the built-in corpus; vocab laid out like CLIP's, specials last."""
    trainer_tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    trainer_tok.normalizer, trainer_tok.pre_tokenizer = clip_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=target_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
    )
    trainer_tok.train_from_iterator([*_CORPUS, *GOLDEN_TEXTS], trainer=trainer)
    raw = json.loads(trainer_tok.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in raw]
    # CLIP order: 256 bytes, the same with </w>, one token per merge, then <|startoftext|>, <|endoftext|>.
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet), *(a + b for a, b in merges)]
    vocab: dict[str, int] = {}
    for t in [*tokens, BOS_TOKEN, EOS_TOKEN]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges  # type: ignore[return-value]


def write_tokenizer(out_dir: Path, max_length: int = _MAX_POSITIONS) -> dict[str, int]:
    """Write vocab.json, merges.txt, tokenizer.json and the HF tokenizer configs; return the vocab."""
    vocab, merges = train_tokenizer()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_clip_tokenizer(vocab, merges).save(str(out_dir / "tokenizer.json"))
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    tok_cfg = {
        **specials,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return vocab


def write_preprocessor_config(out_dir: Path, image_size: int) -> None:
    """CLIPImageProcessor settings (OpenAI mean/std, bicubic) sized for ``image_size``."""
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def make_clip(
    out_dir: Path,
    *,
    size: str = "tiny",
    dtype: str = "float32",
    weights_format: str = "safetensors",
    seed: int = 0,
) -> Path:
    """Write a random-weight HF CLIP checkpoint of ``size`` ("tiny"/"base") to ``out_dir``; return it."""
    import torch
    import transformers

    if size not in _SIZES or dtype not in _DTYPES or weights_format not in ("safetensors", "bin"):
        msg = (
            f"make_clip(size={size!r}, dtype={dtype!r}, weights_format={weights_format!r}): "
            f"size in {sorted(_SIZES)}, dtype in {_DTYPES}, weights_format in ('safetensors', 'bin')"
        )
        raise InvalidArgument(msg, reason="BAD_FIXTURE_ARGS")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = _SIZES[size]
    vocab = write_tokenizer(out_dir)
    ids = {
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[EOS_TOKEN],
    }
    text_cfg = {
        **spec["text"],
        **ids,
        "vocab_size": spec["vocab_size"] or len(vocab),
        "max_position_embeddings": _MAX_POSITIONS,
        "projection_dim": spec["projection_dim"],
    }
    vision_cfg = {**spec["vision"], "projection_dim": spec["projection_dim"]}
    config = transformers.CLIPConfig(
        text_config=text_cfg, vision_config=vision_cfg, projection_dim=spec["projection_dim"]
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    _randomize_norms_and_biases(model, torch)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    if weights_format == "bin":
        # transformers 5 only writes safetensors; a .bin checkpoint is a plain torch.save of the state dict.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out_dir / "pytorch_model.bin")
        (out_dir / "model.safetensors").unlink()
    write_preprocessor_config(out_dir, spec["vision"]["image_size"])
    return out_dir


def _randomize_norms_and_biases(model: Any, torch: Any) -> None:
    # HF initialises LayerNorms to (1, 0) and biases to 0: randomise them so tests catch swapped tensors.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)


def golden_images(n: int = 4, size: int = 64) -> list[Image.Image]:
    """``n`` deterministic synthetic images (gradients and shapes) of varied sizes and aspect ratios.

    ``size`` is the short edge of the first image; others are taller, wider, smaller or RGBA/greyscale,
    so resizing, cropping (and padding when smaller than the crop) and RGB conversion are all exercised.
    """
    shapes = [(size, size), (size * 3 // 2, size), (size, size * 2), (max(size // 3, 4), max(size // 2, 5))]
    modes = ["RGB", "RGB", "RGBA", "L"]
    images = []
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        w, h = w + 3 * (i // len(shapes)), h + 5 * (i // len(shapes))
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack(
            [255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 127 + 120 * np.sin((x + y + 7 * i) / 5.0)], -1
        )
        im = Image.fromarray(rgb.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        draw.ellipse((w // 5, h // 5, w // 2 + i, h // 2 + i), fill=(200, 30 * i % 256, 40))
        draw.rectangle((w // 2, h // 2, w - 2, h - 2), outline=(10, 10, 200), width=2)
        mode = modes[i % len(modes)]
        if mode == "RGBA":
            alpha = Image.fromarray((255 * (x / max(w - 1, 1))).astype(np.uint8), "L")
            im = im.convert("RGBA")
            im.putalpha(alpha)
        elif mode == "L":
            im = im.convert("L")
        images.append(im)
    return images
