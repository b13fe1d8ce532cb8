"""Infer's named tensors for the architecture models (CLIP, BERT, ViT): what a client that already holds token ids
or pixels sends instead of texts or images (the contract: ``InferRequest.inputs`` in ``proto/mlxd/v1/mlxd.proto``).
Each input is checked here (name, dtype, shape, values), so a bad one is INVALID_ARGUMENT naming it; then the arrays
go to the same served forwards that texts and images reach. Token arrays leave as int64, as the tokenizers give
them, so both paths share compiled graphs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlxd_daemon.errors import InvalidArgument

IMAGE_INPUTS = ("pixel_values", "pixels")  # two forms of the same images
INTEGER = "an integer type (int64 or int32)"
# The optional token inputs: the dtype kinds taken, what they hold, the value when left out.
TOKEN_EXTRAS = {"attention_mask": ("iub", "a 0/1 mask", np.ones), "token_type_ids": ("iu", "segment ids", np.zeros)}


def check_names(inputs: dict[str, np.ndarray], takes: Sequence[str], model: str) -> None:
    """UNKNOWN_INPUT for a name the model does not take."""
    unknown = sorted(set(inputs) - set(takes))
    if unknown:
        msg = f"{model} takes no input {', '.join(map(repr, unknown))}; it takes {', '.join(takes)}"
        raise InvalidArgument(msg, reason="UNKNOWN_INPUT", inputs=",".join(unknown))


def _bad(name: str, problem: str, reason: str = "BAD_INPUT_SHAPE") -> InvalidArgument:
    return InvalidArgument(f"input {name!r}: {problem}", reason=reason, input=name)


def _check_dtype(name: str, x: np.ndarray, ok: bool, what: str) -> None:
    if not ok:
        raise _bad(name, f"dtype {x.dtype} is not {what}", "BAD_INPUT_DTYPE")


def _check_range(name: str, x: np.ndarray, high: int, what: str) -> None:
    low, top = int(x.min()), int(x.max())
    if low < 0 or top >= high:
        raise _bad(name, f"values span {low}..{top}; {what} must be in 0..{high - 1}", "BAD_INPUT_VALUE")


def tokens(
    inputs: dict[str, np.ndarray], *, vocab: int, positions: int, type_vocab: int = 0, required: bool = False
) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (and ``token_type_ids`` when ``type_vocab``), checked, as int64; empty
    when there are no ``input_ids`` (MISSING_INPUT if ``required`` or another token input came without them)."""
    extras = ("attention_mask", "token_type_ids") if type_vocab else ("attention_mask",)
    if "input_ids" not in inputs:
        if required or any(n in inputs for n in extras):
            msg = "input 'input_ids' is missing: send the token ids [N, L] (the other token inputs are optional)"
            raise InvalidArgument(msg, reason="MISSING_INPUT", input="input_ids")
        return {}
    ids = inputs["input_ids"]
    _check_dtype("input_ids", ids, ids.dtype.kind in "iu", INTEGER)
    if ids.ndim != 2 or not ids.size:
        raise _bad("input_ids", f"shape {list(ids.shape)} is not [N, L] with N, L >= 1")
    if ids.shape[1] > positions:
        msg = f"input 'input_ids': {ids.shape[1]} tokens, the model takes at most {positions}: truncate them"
        raise InvalidArgument(msg, reason="TEXT_TOO_LONG", input="input_ids")
    _check_range("input_ids", ids, vocab, "token ids")
    out = {"input_ids": ids.astype(np.int64)}
    for name in extras:
        kinds, what, fill = TOKEN_EXTRAS[name]
        if name not in inputs:
            out[name] = fill(ids.shape, np.int64)
            continue
        x = inputs[name]
        _check_dtype(name, x, x.dtype.kind in kinds, "bool or " + INTEGER if "b" in kinds else INTEGER)
        if x.shape != ids.shape:
            raise _bad(name, f"shape {list(x.shape)} is not input_ids' {list(ids.shape)}")
        out[name] = x.astype(np.int64)
        _check_range(name, out[name], 2 if name == "attention_mask" else type_vocab, what)
    empty = np.flatnonzero(out["attention_mask"].sum(axis=1) == 0)
    if len(empty):  # its attention would be a softmax over nothing: NaN
        raise _bad("attention_mask", f"row {int(empty[0])} attends to no token: each row needs a 1", "BAD_INPUT_VALUE")
    return out


def images(inputs: dict[str, np.ndarray], size: tuple[int, int], channels: int) -> dict[str, np.ndarray]:
    """``pixel_values`` (float32/float16 NCHW) or ``pixels`` (uint8 NHWC) at the model's image ``size``, checked;
    empty when neither is given (MIXED_INPUTS for both)."""
    given = [n for n in IMAGE_INPUTS if n in inputs]
    if not given:
        return {}
    if len(given) > 1:
        msg = "pixel_values and pixels are two forms of the same images: send one of them"
        raise InvalidArgument(msg, reason="MIXED_INPUTS", inputs=",".join(given))
    (name,) = given
    x, (h, w) = inputs[name], size
    if name == "pixel_values":
        _check_dtype(name, x, x.dtype in (np.float32, np.float16), "float32 or float16: cast it")
        want, layout = (channels, h, w), f"[N, {channels}, {h}, {w}]"
    else:
        _check_dtype(name, x, x.dtype == np.uint8, "uint8")
        want, layout = (h, w, channels), f"[N, {h}, {w}, {channels}]"
    if x.ndim != 4 or not len(x):
        raise _bad(name, f"shape {list(x.shape)} is not {layout} with N >= 1")
    if tuple(x.shape[1:]) != want:
        msg = f"input {name!r}: shape {list(x.shape)}, the model takes {layout}: resize and crop to {h}x{w}"
        raise InvalidArgument(msg, reason="BAD_IMAGE_SIZE", input=name)
    return {name: x}
