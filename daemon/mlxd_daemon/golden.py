"""Golden inputs for Validate: the deterministic texts, sentences, prompts and images each architecture's
``golden_inputs`` runs through both PyTorch and MLX when the caller gives none. Validation owns them; the test
checkpoint builders (``fixtures``) also train their tiny tokenizers on them, so every golden word is in vocab.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# CLIP: captions of the kind image-text matching is judged on.
GOLDEN_TEXTS: tuple[str, ...] = (
    "a photo of a cat",
    "a photo of a dog",
    "A red circle on a white background.",
    "two blue squares and a green triangle",
    "an empty, grey room at night",
    "the quick brown fox jumps over the lazy dog 42 times!",
)

# Varied lengths, case, accents, CJK, digits and punctuation, so tokenizer and padding paths are exercised.
GOLDEN_SENTENCES: tuple[str, ...] = (
    "A photo of a cat.",
    "the quick brown fox jumps over the lazy dog 42 times!",
    "Héllo Wörld: naïve café déjà-vu, résumé?",
    "東京 is a city; 北京 too.",
    "short",
    "Children playing football in the park while their parents watch from a wooden bench by the river, "
    "and a city street with cars, buses and bicycles in the rain beyond it.",
)

# Decoders (Llama family): prompts with code, accents, CJK and emoji.
GOLDEN_PROMPTS: tuple[str, ...] = (
    "The quick brown fox",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    return",
    "Café au lait, naïve résumé: 東京 ☕ 🙂",
)


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
