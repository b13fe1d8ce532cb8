"""Calibration sets: what is run through the float model to collect activations.

Built-in defaults are generated offline from a word list and sentence templates (text) or drawn shapes and
gradients (images), all from ``numpy.random.default_rng(seed)``, so the same seed gives the same samples.
User data (``calibration_data``): a text file (one sample a line), a folder of images, or an ``.npz`` of model
inputs (``input_ids`` [+ ``attention_mask``], or ``pixel_values``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mlxd_daemon.errors import InvalidArgument, NotFound
from mlxd_daemon.npz import read_npz

DEFAULT_TEXTS = 1024  # MiniLM 4-bit g64 GPTQ: 0.9788 min cosine with 256 sentences, 0.9823 with 1024
DEFAULT_IMAGES = 64
MAX_SAMPLES = 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_NOUNS = [
    "cat",
    "dog",
    "bird",
    "horse",
    "child",
    "man",
    "woman",
    "teacher",
    "doctor",
    "city",
    "river",
    "mountain",
    "forest",
    "house",
    "car",
    "bus",
    "train",
    "bicycle",
    "computer",
    "phone",
    "book",
    "letter",
    "song",
    "movie",
    "painting",
    "garden",
    "kitchen",
    "market",
    "school",
    "hospital",
    "bridge",
    "road",
    "ocean",
    "island",
    "village",
    "farmer",
    "student",
    "artist",
    "engineer",
    "company",
    "government",
    "market",
    "price",
    "report",
    "system",
    "network",
    "problem",
    "question",
    "answer",
    "idea",
    "story",
    "game",
    "team",
    "player",
    "coach",
    "window",
    "door",
    "table",
    "chair",
    "coffee",
    "tea",
    "bread",
    "apple",
]
_VERBS = [
    "sees",
    "likes",
    "finds",
    "builds",
    "reads",
    "writes",
    "opens",
    "closes",
    "watches",
    "follows",
    "carries",
    "paints",
    "visits",
    "repairs",
    "sells",
    "buys",
    "describes",
    "explains",
    "remembers",
    "ignores",
    "studies",
    "crosses",
    "leaves",
    "joins",
    "answers",
    "plays",
]
_ADJS = [
    "small",
    "large",
    "old",
    "new",
    "red",
    "blue",
    "green",
    "quiet",
    "loud",
    "bright",
    "dark",
    "happy",
    "sad",
    "busy",
    "empty",
    "famous",
    "strange",
    "simple",
    "difficult",
    "beautiful",
    "ugly",
    "modern",
    "ancient",
    "wooden",
    "cold",
    "warm",
    "heavy",
    "light",
    "fast",
    "slow",
]
_ADVS = ["quickly", "slowly", "carefully", "often", "rarely", "never", "always", "suddenly", "quietly", "happily"]
_PLACES = [
    "in the park",
    "on the table",
    "near the river",
    "at the station",
    "under the bridge",
    "in the kitchen",
    "on the road",
    "behind the house",
    "in the morning",
    "after dinner",
    "during the storm",
    "before the meeting",
]
_TEMPLATES = (
    "The {a} {n} {v} the {b} {m} {p}.",
    "A {a} {n} {d} {v} a {m}.",
    "Why does the {n} {v} the {a} {m}?",
    "{N} and {m} are {a} {p}.",
    "There is a {a} {n} {p}, and it {v} the {m}.",
    "My {n} {d} {v} {k} {a} {m}s {p}.",
    "Is the {m} {a} or {b}?",
    "{N}: {k} {a} {m}s, {j} {b} {n}s.",
    "I think the {n} {v} a {m} because it is {a}.",
    "Photo of a {a} {n} {p}.",
)


@dataclass
class CalibrationSet:
    """Samples (texts, images or model-input arrays) plus what is recorded about them in the manifest."""

    kind: str  # "default-text", "default-images", "text", "images", "npz"
    seed: int
    texts: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""

    @property
    def count(self) -> int:
        if self.arrays:
            return len(next(iter(self.arrays.values())))
        return len(self.texts) or len(self.images)

    def describe(self) -> dict[str, Any]:
        """JSON form for the result and the manifest: kind, count, seed (and path, sha256 when user-given)."""
        d: dict[str, Any] = {"kind": self.kind, "count": self.count, "seed": self.seed}
        if self.path:
            d |= {"path": self.path, "sha256": self.sha256}
        return d


def vocab_words(tokenizer_json: Path) -> list[str]:
    """Whole words (ASCII letters, 2+ characters) of a tokenizer's vocabulary, sorted; [] when unreadable."""
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab()
    except Exception:  # a tokenizer this tokenizers version cannot read: templates alone still work
        return []
    # BPE marks word ends with "</w>" (CLIP) or word starts with "▁"/"Ġ" (sentencepiece, byte-level).
    words = {t.removesuffix("</w>").lstrip("▁Ġ") for t in vocab}
    return sorted(w for w in words if len(w) > 1 and w.isascii() and w.isalpha())


def default_texts(seed: int = 0, n: int = DEFAULT_TEXTS, words: list[str] | None = None) -> list[str]:
    """``n`` sentences, deterministic for ``seed``: from built-in templates and words, and (when ``words``, e.g.
    the model's own vocabulary, is given) every other one a random run of those words, for coverage: measured on
    MiniLM, templates alone gave GPTQ a narrower set than the sentences it was judged on."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if words and i % 2:
            k = int(rng.integers(6, 30))
            out.append(" ".join(words[int(j)] for j in rng.integers(0, len(words), k)).capitalize() + ".")
            continue
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        slots = {
            "n": _pick(rng, _NOUNS),
            "m": _pick(rng, _NOUNS),
            "N": _pick(rng, _NOUNS).capitalize(),
            "v": _pick(rng, _VERBS),
            "a": _pick(rng, _ADJS),
            "b": _pick(rng, _ADJS),
            "d": _pick(rng, _ADVS),
            "p": _pick(rng, _PLACES),
            "k": str(int(rng.integers(2, 100))),
            "j": str(int(rng.integers(2, 10))),
        }
        sentence = template.format(**slots)
        if rng.random() < 0.3:  # some longer samples: two sentences
            sentence += " " + _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(**slots)
        out.append(sentence)
    return out


def default_images(seed: int = 0, n: int = DEFAULT_IMAGES, size: int = 64) -> list[Image.Image]:
    """``n`` images of gradients, noise, ellipses and boxes at varied sizes; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        w, h = (int(size * f) for f in rng.uniform(0.8, 1.6, 2))
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-200, 200, (2, 3))
        rgb = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, rng.uniform(2, 30), (h, w, 3))
        im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            box = (x0, y0, int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        images.append(im)
    return images


def load(path: str | Path | None, seed: int, modality: str, words: list[str] | None = None) -> CalibrationSet:
    """The user's calibration data at ``path`` (text file, image folder, .npz), else the built-in default for
    ``modality`` ("text" or "images"; ``words`` as for ``default_texts``). InvalidArgument BAD_CALIBRATION_DATA
    when the file holds nothing usable."""
    if not path:
        if modality == "images":
            return CalibrationSet("default-images", seed, images=default_images(seed))
        return CalibrationSet("default-text", seed, texts=default_texts(seed, words=words))
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"calibration data {p} does not exist: pass a text file, an image folder or an .npz"
        raise NotFound(msg, reason="CALIBRATION_DATA_NOT_FOUND", path=str(p))
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:MAX_SAMPLES]
        if not files:
            _bad(p, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        digest = hashlib.sha256()
        images = []
        for f in files:
            data = f.read_bytes()
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(data).digest())
            try:
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                _bad(p, f"{f.name} is not a readable image ({e})")
        return CalibrationSet("images", seed, images=images, path=str(p), sha256=digest.hexdigest())
    data = p.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if p.suffix == ".npz":
        arrays = read_npz(p, f"calibration data {p}", "BAD_CALIBRATION_DATA")
        if not ({"input_ids", "pixel_values"} & arrays.keys()):
            _bad(p, f"the .npz needs input_ids or pixel_values, has {sorted(arrays)}")
        return CalibrationSet("npz", seed, arrays=arrays, path=str(p), sha256=sha)
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        _bad(p, "not UTF-8 text (one sample a line), an image folder or an .npz")
    texts = [line for line in lines if line][:MAX_SAMPLES]
    if not texts:
        _bad(p, "no non-empty lines")
    return CalibrationSet("text", seed, texts=texts, path=str(p), sha256=sha)


def text_set(model_dir: Path, path: str | Path | None, seed: int) -> CalibrationSet:
    """A text model's calibration set: the user's data at ``path``, else the built-in sentences with words of the
    model's own vocabulary (``model_dir/tokenizer.json``, when readable) mixed in."""
    return load(path, seed, "text", None if path else vocab_words(Path(model_dir) / "tokenizer.json"))


def _pick(rng: np.random.Generator, words: tuple[str, ...] | list[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _bad(path: Path, why: str) -> Any:
    msg = f"calibration data {path}: {why}"
    raise InvalidArgument(msg, reason="BAD_CALIBRATION_DATA", path=str(path))
