"""Example inputs for a transformers model, derived from its forward signature, config and processor.

Each input the model's ``forward`` takes and we know how to make is built at a small example shape
(``EXAMPLE_BATCH`` rows); the axes that can vary (batch, sequence, audio length) are listed per input so
``capture`` can export them symbolically. An input spec (``--input-spec``) overrides or adds inputs by name.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlxd_daemon.errors import InvalidArgument

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
DEFAULT_IMAGE_SIZE = 224  # the ImageNet size nearly every vision architecture was trained at
AUDIO_SAMPLES = 1600  # 0.1 s at 16 kHz: a few frames even through wav2vec2's 320x downsampling
# Keyword arguments fixed at capture: caches are not graph outputs (encoder-decoders serve step by step).
CONSTANT_KWARGS = {"use_cache": False}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}  # fmt: skip


@dataclass
class ExampleInputs:
    """Keyword tensors to capture with, integer ranges, dynamic axes, and fixed non-tensor keywords."""

    tensors: dict[str, torch.Tensor]
    ranges: dict[str, list[int]] = field(default_factory=dict)
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> {axis: dim name}
    constants: dict[str, Any] = field(default_factory=dict)
    max_lengths: dict[str, int] = field(default_factory=dict)  # dim name -> the model's maximum


def processor_image_size(model_dir: Path | None) -> tuple[int, int] | None:
    """(height, width) the image processor feeds the model (crop size if it crops, else its resize size)."""
    path = model_dir / "preprocessor_config.json" if model_dir else None
    if path is None or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    size = cfg.get("crop_size") if cfg.get("do_center_crop") and cfg.get("crop_size") else cfg.get("size")
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        edge = size.get("shortest_edge") or size.get("longest_edge")
        if edge:
            return int(edge), int(edge)
    return None


def _image_size(vision: Any, model_dir: Path | None) -> tuple[int, int]:
    from_processor = processor_image_size(model_dir)
    if from_processor:
        return from_processor
    size = getattr(vision, "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE


def _max_positions(cfg: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_target_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def derive_inputs(model: Any, model_dir: Path | None = None, spec: list[dict[str, Any]] | None = None) -> ExampleInputs:
    """Example inputs for every input of ``model.forward`` this module can derive (see the module docstring).

    ``InvalidArgument`` NO_EXAMPLE_INPUTS naming the input that could not be derived and how to pass it.
    """
    config = model.config
    params = inspect.signature(model.forward).parameters
    text: Any = config.get_text_config() if hasattr(config, "get_text_config") else config
    vision: Any = getattr(config, "vision_config", None) or config
    gen = torch.Generator().manual_seed(0)
    out = ExampleInputs({}, constants={k: v for k, v in CONSTANT_KWARGS.items() if k in params})
    vocab = getattr(text, "vocab_size", None)
    max_len = _max_positions(text)
    seq = min(EXAMPLE_SEQ, max_len or EXAMPLE_SEQ)
    if "input_ids" in params and vocab:
        out.ranges["input_ids"] = [0, int(vocab)]
        out.tensors["input_ids"] = torch.randint(0, int(vocab), (EXAMPLE_BATCH, seq), generator=gen)
        if "attention_mask" in params:
            mask = torch.ones((EXAMPLE_BATCH, seq), dtype=torch.long)
            mask[-1, seq - seq // 4 :] = 0  # a padded row, so masking is exercised
            out.tensors["attention_mask"], out.ranges["attention_mask"] = mask, [1, 2]  # fresh sets: unpadded
        if "token_type_ids" in params and getattr(text, "type_vocab_size", None):
            out.tensors["token_type_ids"] = torch.zeros((EXAMPLE_BATCH, seq), dtype=torch.long)
        for name in TEXT_INPUTS:
            if name in out.tensors:
                out.dynamic[name] = {0: "batch", 1: "seq"}
        if max_len:
            out.max_lengths["seq"] = max_len
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False) and vocab:
        start = getattr(config, "decoder_start_token_id", None)
        ids = torch.randint(0, int(vocab), (EXAMPLE_BATCH, seq), generator=gen)
        ids[:, 0] = int(start if start is not None else 0)
        out.tensors["decoder_input_ids"], out.ranges["decoder_input_ids"] = ids, [0, int(vocab)]
        out.dynamic["decoder_input_ids"] = {0: "batch", 1: "decoder_seq"}
        if max_len:
            out.max_lengths["decoder_seq"] = max_len
    if "pixel_values" in params:
        h, w = _image_size(vision, model_dir)
        channels = int(getattr(vision, "num_channels", 3))
        out.tensors["pixel_values"] = torch.randn((EXAMPLE_BATCH, channels, h, w), generator=gen)
        out.dynamic["pixel_values"] = {0: "batch"}
    if "input_values" in params:  # raw audio (wav2vec2, HuBERT, WavLM): 16 kHz float samples
        out.tensors["input_values"] = torch.randn((EXAMPLE_BATCH, AUDIO_SAMPLES), generator=gen)
        out.dynamic["input_values"] = {0: "batch", 1: "samples"}
    given = {entry.get("name") for entry in spec or []}
    if "input_features" in params and "input_features" not in given:
        out.tensors["input_features"] = _log_mel(config, gen)
        out.dynamic["input_features"] = {0: "batch"}  # Whisper's encoder wants exactly its window of frames
    _apply_spec(out, spec or [])
    main = getattr(model, "main_input_name", "input_ids")
    if not out.tensors or (main in params and main not in out.tensors and _required(params, main)):
        missing = main if main not in out.tensors else next(iter(params))
        msg = (
            f"cannot derive the input {missing!r} of {type(model).__name__} from its config or processor: pass it "
            f'with --input-spec \'[{{"name": "{missing}", "shape": [...], "dtype": "float32"}}]\''
        )
        raise InvalidArgument(msg, reason="NO_EXAMPLE_INPUTS", model=type(model).__name__, input=missing)
    required = [n for n in params if _required(params, n) and n not in out.tensors and n not in out.constants]
    if required:
        msg = (
            f"{type(model).__name__}.forward needs {', '.join(required)}, which cannot be derived from its config: "
            f'pass them with --input-spec \'[{{"name": "{required[0]}", "shape": [...], "dtype": ...}}]\''
        )
        raise InvalidArgument(msg, reason="NO_EXAMPLE_INPUTS", model=type(model).__name__, input=required[0])
    return out


def _required(params: Any, name: str) -> bool:
    p = params[name]
    return p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)


def _log_mel(config: Any, gen: torch.Generator) -> torch.Tensor:
    """A log-mel window as Whisper's feature extractor makes it: [batch, mel bins, 2 * encoder positions]."""
    bins, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not bins or not positions:
        msg = (
            f"cannot derive input_features for {getattr(config, 'model_type', '?')} (no num_mel_bins/"
            'max_source_positions): pass --input-spec \'[{"name": "input_features", "shape": [...]}]\''
        )
        raise InvalidArgument(msg, reason="NO_EXAMPLE_INPUTS", input="input_features")
    return torch.randn((EXAMPLE_BATCH, int(bins), 2 * int(positions)), generator=gen)


def random_inputs(spec: list[dict[str, Any]], seed: int = 0) -> list[torch.Tensor]:
    """Reproducible inputs of a spec: floats ~ N(0, 1), integers uniform in ``range`` (default [0, 2))."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in spec:
        dtype = TORCH_DTYPES[s.get("dtype", "float32")]
        shape = [int(d) for d in s["shape"]]
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            lo, hi = s.get("range") or [0, 2]
            out.append(torch.randint(int(lo), int(hi), shape, generator=gen, dtype=dtype))
    return out


def _apply_spec(out: ExampleInputs, spec: list[dict[str, Any]]) -> None:
    """Input-spec entries replace (or add) inputs by name, at the spec's shape and dtype; they are static."""
    for i, entry in enumerate(spec):
        name = entry.get("name")
        if not name or not isinstance(entry.get("shape"), list):
            msg = f"input spec entry {i} ({entry!r}) needs a name and a shape for a Hugging Face model"
            raise InvalidArgument(msg, reason="BAD_INPUT_SPEC")
        out.tensors[name] = random_inputs([entry], seed=i)[0]
        out.dynamic.pop(name, None)
        if "range" in entry:
            out.ranges[name] = [int(v) for v in entry["range"]]
