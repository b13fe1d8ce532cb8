"""Causal LMs of every model_type the installed mlx-lm has (route ``mlx_lm``), served by mlx-lm itself.

Loading is ``mlx_lm.utils.load_model`` / ``load_tokenizer`` on the converted directory (the same files
``mlx_lm.load`` reads), then mlxd's compute policy (``_quant.use_kernels``): on a Linux CPU quantized modules are
dequantized once (mlx-lm's ``dequantize_model``) and everything computes in float32; on a GPU quantized kernels
and the stored dtype stay. Generation is ``mlx_lm.generate.stream_generate`` with ``make_sampler``; chat
templates come from mlx-lm's tokenizer wrapper. Validation taps (``decoder_validate``) wrap the model's own
layer modules, so no model file is copied here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxd_daemon.archs._loading import read_json, require_dir
from mlxd_daemon.archs._quant import use_kernels
from mlxd_daemon.archs.contract import Stored
from mlxd_daemon.archs.decoder_validate import agreement, golden_inputs, run_mlx, run_reference
from mlxd_daemon.errors import InvalidArgument

if TYPE_CHECKING:
    from mlxd_daemon.calibrate.models import Stream, Weights

__all__ = ["DecoderBundle", "agreement", "calibration_streams", "golden_inputs", "load", "map_weight", "run_mlx",
           "run_reference"]  # fmt: skip

ROUTE = "mlx_lm"  # Convert reads the checkpoint through mlx-lm's sanitize (_lm_convert), not map_weight
DISK_LAYOUT: dict[str, str] = {}  # names and layouts are mlx-lm's (see _lm_convert)
# Per-layer relative error floor for validation. Some mlx-lm models fix an activation where transformers follows
# the config (exact GELU for starcoder2/gemma's gelu_pytorch_tanh, tanh GELU for gpt_neox's gelu): ~1.2-1.9e-4
# per layer on the tiny test models, with identical top-1 and greedy tokens; a real mapping error is >= 1e-2.
LAYER_REL_TOL_FLOOR = 1e-3
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
# Config keys for the experts each token is routed to, across architectures.
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token")


def map_weight(name: str) -> str:
    """Names on disk are already mlx-lm's: Convert maps through the model's own ``sanitize`` (``LmCheckpoint``)."""
    return name


class TokenizedPrompts:
    """Prompt text -> token ids for a decoder with mlx-lm's ``TokenizerWrapper`` (``tokenizer``, None without
    tokenizer files) and its ``model_dir``: shared by the single-process bundle and the tensor-parallel one."""

    tokenizer: Any
    model_dir: Path

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            msg = f"{self.model_dir} has no tokenizer files: pass token ids, or copy the tokenizer next to it"
            raise InvalidArgument(msg, reason="NO_TOKENIZER", path=str(self.model_dir))
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's specials (BOS), unless the text already starts with the BOS token."""
        tok = self._require_tokenizer()
        add = tok.bos_token is None or not text.startswith(tok.bos_token)  # chat templates write BOS themselves
        return list(tok.encode(text, add_special_tokens=add))

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (mlx-lm's tokenizer wrapper)."""
        tok = self._require_tokenizer()
        if not tok.has_chat_template:
            msg = f"{self.model_dir} has no chat template: pass a plain prompt to generate"
            raise InvalidArgument(msg, reason="NO_CHAT_TEMPLATE")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.encode(str(text))


@dataclass
class DecoderBundle(TokenizedPrompts, Stored):
    """A loaded mlx-lm model and its tokenizer (mlx-lm's ``TokenizerWrapper``; None without tokenizer files)."""

    model: nn.Module
    tokenizer: Any
    config: dict[str, Any]
    total_parameters: int = 0
    active_parameters: int = 0  # per token: MoE models count only the routed experts a token uses
    stats: dict[str, Any] = field(default_factory=dict)  # of the last finished generate()

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.config)

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, np.ndarray]:
        """Not offered: a causal LM has no embedding output of its own."""
        msg = f"{self.model_type} is a text-generation model: use Generate (mlxctl generate), not Infer"
        raise InvalidArgument(msg, reason="USE_GENERATE", model_type=self.model_type)

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """``{"token_id", "text"}`` per token from mlx-lm's ``stream_generate``; the last event adds
        ``finish_reason`` ("stop": an EOS id from config/generation_config, which is its ``token_id``;
        "length") and ``stats`` (prompt_tokens, generation_tokens after the first, prompt_tps, generation_tps)."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        tok = self._require_tokenizer()
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        check_sampling(ids, max_tokens, temperature, top_p, self.vocab_size)
        mx.random.seed(seed)
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
        for r in stream_generate(self.model, tok, ids, max_tokens=max_tokens, sampler=sampler):
            event: dict[str, Any] = {"token_id": int(r.token), "text": r.text}
            if r.finish_reason is not None:
                # generation_tokens: the tokens after the first (whose time is the prompt phase), as the handler
                # and both fronts report it; generation_tps is mlx-lm's own figure, as mlx_lm.generate prints it.
                self.stats = {"prompt_tokens": r.prompt_tokens, "generation_tokens": r.generation_tokens - 1,
                              "prompt_tps": r.prompt_tps, "generation_tps": r.generation_tps}  # fmt: skip
                event.update(finish_reason=r.finish_reason, stats=dict(self.stats))
            yield event

    def forward_outputs(self, input_ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """``logits`` [n, L, vocab] of right-padded rows (float32), positions past each length zeroed."""
        logits = self.model(mx.array(np.asarray(input_ids, np.int32))).astype(mx.float32)
        valid = mx.array(np.arange(input_ids.shape[1])[None, :] < np.asarray(lengths)[:, None])[..., None]
        out = mx.where(valid, logits, 0.0)
        mx.eval(out)
        return {"logits": np.array(out)}


def vocab_size(config: dict[str, Any]) -> int:
    return int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0)


def check_sampling(prompt: list[int], max_tokens: int, temperature: float, top_p: float, vocab: int) -> None:
    """InvalidArgument for an empty prompt, bad sampling options or token ids outside the vocabulary."""
    if not prompt:
        msg = "the prompt is empty: pass at least one token or a non-empty text"
        raise InvalidArgument(msg, reason="EMPTY_PROMPT")
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        msg = f"bad sampling options max_tokens={max_tokens}, temperature={temperature}, top_p={top_p}"
        raise InvalidArgument(msg + ": need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1", reason="BAD_SAMPLING")
    bad = [t for t in prompt if not 0 <= t < vocab] if vocab else []
    if bad:
        msg = f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
        raise InvalidArgument(msg, reason="BAD_TOKEN_ID")


def _storage_dtype(model: nn.Module) -> str:
    counts: dict[str, int] = {}
    params = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))  # a list without destination=
    for _, v in params:
        if v.dtype in _FLOATS:
            name = str(v.dtype).removeprefix("mlx.core.")
            counts[name] = counts.get(name, 0) + v.size
    return max(counts, key=counts.__getitem__) if counts else "float32"


def parameter_counts(model: nn.Module, config: dict[str, Any]) -> tuple[int, int]:
    """(total, active per token): routed experts (SwitchLinear layers, [E, out, in]) count k/E of their weights."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.utils import get_total_parameters

    total = int(get_total_parameters(model))
    k = next((int(config[key]) for key in TOP_K_KEYS if isinstance(config.get(key), int)), 0)
    routed = 0
    for _, m in model.named_modules():
        if isinstance(m, SwitchLinear | QuantizedSwitchLinear):
            experts = m.weight.shape[0]
            n = m.weight.size * (32 // m.bits if isinstance(m, QuantizedSwitchLinear) else 1)
            routed += n - (n * min(k, experts) // experts if k else n)
    return total, total - routed


def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load(model_dir: Path) -> DecoderBundle:
    """Load a converted directory with mlx-lm, apply the compute policy, and wrap it for the models worker."""
    from mlx_lm.utils import dequantize_model, load_model, load_tokenizer

    model_dir = require_dir(model_dir)
    read_json(model_dir / "config.json")  # NotFound / BAD_CONFIG with mlxd's reasons first
    try:
        model, config = load_model(model_dir, lazy=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = f"mlx-lm cannot load {model_dir}: {e}; convert the checkpoint with mlxctl convert"
        raise InvalidArgument(msg, reason="WEIGHTS_MISMATCH", path=str(model_dir)) from None
    dtype = _storage_dtype(model)
    quant = config.get("quantization")
    if use_kernels():
        compute = dtype + (" with quantized kernels" if quant else "")
    else:
        # Linux CPU: quantized and half-precision matmuls are far slower than float32 (see _quant).
        if quant:
            dequantize_model(model)
        model.set_dtype(mx.float32)
        compute = "float32 (quantized weights dequantized at load)" if quant else "float32"
    params = dict(tree_flatten(model.parameters()))
    mx.eval(params)
    total, active = parameter_counts(model, config)
    eos = config.get("eos_token_id")  # config.json and generation_config.json, merged by mlx-lm's load_config
    tokenizer = load_tokenizer(model_dir, eos_token_ids=eos) if _has_tokenizer(model_dir) else None
    return DecoderBundle(
        model=model,
        tokenizer=tokenizer,
        config=config,
        model_dir=model_dir,
        dtype=dtype,
        nbytes=sum(v.nbytes for v in params.values()),
        quantization=quant,
        compute_dtype=compute,
        total_parameters=total,
        active_parameters=active,
    )


def calibration_streams(config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int) -> list[Stream]:
    """AWQ/GPTQ: mlx-lm's layer modules, Llama-style blocks (``decoder_calibrate``)."""
    from mlxd_daemon.archs.decoder_calibrate import calibration_streams

    return calibration_streams(config, weights, data, seed)
