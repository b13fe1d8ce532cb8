"""Validation inputs for a text model whose directory has no tokenizer files: token ids drawn from the vocabulary.

Validation compares the MLX and PyTorch forwards on the same token ids; it needs no text. The report says the
inputs were drawn this way (``inputs_note``), since no text was tokenized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
ROWS, LENGTH = 4, 12


def has_tokenizer(model_dir: Path) -> bool:
    """Whether ``model_dir`` has any tokenizer file a text arch reads."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def vocabulary_ids(vocab_size: int, max_length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(input_ids int64 [4, <=12], attention_mask with the second row padded, the report's note)."""
    rng = np.random.default_rng(seed)
    length = min(LENGTH, max_length)
    ids = rng.integers(1, max(vocab_size, 2), size=(ROWS, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, length - length // 3 :] = 0
    ids[mask == 0] = 0
    note = f"no tokenizer files: {ROWS} rows of token ids drawn from the vocabulary [1, {vocab_size}) (seed {seed})"
    return ids, mask, note
