"""Encoder-decoder models (T5, BART, Marian, Whisper, ...) as two graphs: the encoder, run once per input, and
the decoder, run on the tokens so far at each generation step. Both are captured without caches
(``use_cache=False``) and with symbolic batch and lengths, so one program serves every step.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlxd_daemon.export.capture import Captured, _check_spec, _decompose, export_dynamic, hf_model_class, load_hf
from mlxd_daemon.export.inputs import ExampleInputs, derive_inputs

# model_types whose config class sets is_encoder_decoder by default (config.json may omit it).
ENCODER_DECODER_TYPES = frozenset({"t5", "mt5", "bart", "mbart", "marian", "pegasus", "whisper", "blenderbot",
                                   "blenderbot-small", "m2m_100", "nllb-moe", "led", "longt5", "umt5"})  # fmt: skip
# What the program's generation needs from the config (and generation_config.json, which wins).
GENERATION_KEYS = ("decoder_start_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                   "forced_eos_token_id", "max_length", "suppress_tokens", "begin_suppress_tokens")  # fmt: skip


def is_seq2seq_dir(model_dir: Path) -> bool:
    """A Hugging Face directory of a generating encoder-decoder (``is_encoder_decoder`` and a class that
    generates and takes ``decoder_input_ids``, e.g. ``BartForConditionalGeneration``)."""
    if not (model_dir / "config.json").is_file():
        return False
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    cls = hf_model_class(model_dir)
    return (
        bool(config.get("is_encoder_decoder", config.get("model_type") in ENCODER_DECODER_TYPES))
        and bool(getattr(cls, "can_generate", lambda: False)())
        and "decoder_input_ids" in inspect.signature(cls.forward).parameters
    )


class TextEncoder(nn.Module):
    """``input_ids``, ``attention_mask`` -> the encoder's last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder: Any = self.model.get_encoder()  # type: ignore[operator]
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class AudioEncoder(nn.Module):
    """``input_features`` (log-mel) -> the encoder's last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        encoder: Any = self.model.get_encoder()  # type: ignore[operator]
        return encoder(input_features=input_features).last_hidden_state


class TextDecoder(nn.Module):
    """Decoder tokens so far + encoder states (+ the source's mask) -> next-token logits at every position."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        encoded = BaseModelOutput(last_hidden_state=encoder_hidden_states)
        out = self.model(attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, encoder_outputs=encoded,
                         use_cache=False)  # fmt: skip
        return out.logits


class AudioDecoder(nn.Module):
    """Decoder tokens so far + encoder states -> next-token logits (audio encoders take no mask)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        encoded = BaseModelOutput(last_hidden_state=encoder_hidden_states)
        out = self.model(decoder_input_ids=decoder_input_ids, encoder_outputs=encoded, use_cache=False)
        return out.logits


def capture_seq2seq(
    model_dir: Path, input_spec: list[dict[str, Any]] | None = None
) -> tuple[dict[str, Captured], dict[str, Any], dict[str, torch.Tensor]]:
    """({"encoder": Captured, "decoder": Captured}, source record, the whole model's example inputs)."""
    model = load_hf(model_dir)
    if input_spec:
        _check_spec(input_spec, str(model_dir))
    full = derive_inputs(model, model_dir, input_spec)
    audio = "input_features" in full.tensors
    encoder: nn.Module = AudioEncoder(model) if audio else TextEncoder(model)
    decoder: nn.Module = AudioDecoder(model) if audio else TextDecoder(model)
    enc_names = ("input_features",) if audio else ("input_ids", "attention_mask")
    enc_example = ExampleInputs({n: full.tensors[n] for n in enc_names},
                                dynamic={n: full.dynamic[n] for n in enc_names if n in full.dynamic},
                                max_lengths=full.max_lengths)  # fmt: skip
    with torch.no_grad():
        states = encoder.eval()(**enc_example.tensors)
    dec_tensors = {"decoder_input_ids": full.tensors["decoder_input_ids"], "encoder_hidden_states": states}
    dec_dynamic = {"decoder_input_ids": full.dynamic["decoder_input_ids"], "encoder_hidden_states": {0: "batch"}}
    if not audio:
        dec_tensors["attention_mask"] = full.tensors["attention_mask"]
        dec_dynamic["encoder_hidden_states"] = {0: "batch", 1: "seq"}
        dec_dynamic["attention_mask"] = full.dynamic["attention_mask"]
    dec_example = ExampleInputs(dec_tensors, dynamic=dec_dynamic, max_lengths=full.max_lengths)
    parts: dict[str, Captured] = {}
    for name, module, example in (("encoder", encoder, enc_example), ("decoder", decoder, dec_example)):
        record: dict[str, Any] = {"kind": "hf", "path": str(model_dir), "class": type(model).__name__,
                                  "ranges": {k: v for k, v in full.ranges.items() if k in example.tensors}}  # fmt: skip
        exported, decomposed = export_dynamic(module.eval(), example, record)
        parts[name] = _decompose(exported, record, None, decomposed)
    source = {"kind": "hf", "path": str(model_dir), "class": type(model).__name__, "constants": full.constants,
              "ranges": full.ranges}  # fmt: skip
    return parts, source, full.tensors


def generation_config(model_dir: Path) -> dict[str, Any]:
    """The decoding settings the program's Generate follows (config.json, overridden by generation_config.json)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    out = {k: getattr(config, k, None) for k in GENERATION_KEYS}
    path = model_dir / "generation_config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        out.update({k: saved[k] for k in GENERATION_KEYS if saved.get(k) is not None})
    return {k: v for k, v in out.items() if v is not None}
