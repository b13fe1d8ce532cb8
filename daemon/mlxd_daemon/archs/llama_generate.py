"""Autoregressive generation for the decoder archs: KV cache, sampling, incremental detokenizing, timing.

``generate_tokens`` drives any model with ``hidden(ids, cache)`` / ``logits(hidden)`` and ``model.layers`` (see
``llama.LlamaForCausalLM``); ``TextGenerator`` gives a bundle ``encode``/``generate``/``apply_chat_template``.
Events are plain dicts: ``{"token_id", "text"}`` per token; the last one adds ``finish_reason`` ("stop": a stop
token was produced, it is the last event's ``token_id``, with text ""; "length": ``max_tokens`` reached) and
``stats`` (a ``GenerationStats``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxd_daemon.errors import InvalidArgument

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the attention scores and the lazy graph


class KVCache:
    """Keys/values of one layer, [B, kv_heads, T, head_dim], in buffers grown ``STEP`` positions at a time."""

    STEP = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``k``/``v`` (L new positions) and return everything cached so far."""
        n = k.shape[2]
        if self.keys is None or self.values is None or self.offset + n > self.keys.shape[2]:
            # Grow by whole steps so most decode steps write into existing buffers instead of concatenating.
            grow = (n + self.STEP - 1) // self.STEP * self.STEP
            b, h, _, d = k.shape
            zeros_k = mx.zeros((b, h, grow, d), k.dtype)
            zeros_v = mx.zeros((b, h, grow, v.shape[3]), v.dtype)
            if self.keys is None or self.values is None:
                self.keys, self.values = zeros_k, zeros_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], zeros_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], zeros_v], axis=2)
        self.keys[..., self.offset : self.offset + n, :] = k
        self.values[..., self.offset : self.offset + n, :] = v
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


@dataclass
class GenerationStats:
    """Timing of one generate call. The prompt phase ends when the first new token is known (time to first
    token); the generation phase covers the tokens after it, so ``generation_tps`` is pure decode speed."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0  # tokens produced after the first one
    generation_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "prompt_tps": self.prompt_tps, "generation_tps": self.generation_tps}


class IncrementalDecoder:
    """Text pieces for a growing token list: decode a short window, emit only what the newest token added, and
    hold back while the window ends in U+FFFD (an incomplete UTF-8 sequence from byte-level or byte-fallback
    tokens). Decoding from a window start (not token by token) keeps SentencePiece's leading spaces right."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # window start
        self.done = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.start : self.done])
        now = self._decode(self.ids[self.start :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.start, self.done = self.done, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a truncated multi-byte character shows as U+FFFD)."""
        before = self._decode(self.ids[self.start : self.done])
        now = self._decode(self.ids[self.start :])
        self.start = self.done = len(self.ids)
        return now[len(before) :]


def read_stop_ids(model_dir: Path, config: dict[str, Any]) -> frozenset[int]:
    """``eos_token_id`` (int or list) from config.json and generation_config.json, together."""
    ids: set[int] = set()
    sources = [config]
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text(encoding="utf-8")))
    for src in sources:
        eos = src.get("eos_token_id")
        ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos or []])
    return frozenset(ids)


def sample(logits: mx.array, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else softmax(logits / T) restricted to the smallest top-p nucleus."""
    if temperature <= 0:
        return int(cast("int", mx.argmax(logits).item()))
    z = np.array(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        # Keep a token when the mass before it is still below top_p (so the top token always survives).
        keep = order[(np.cumsum(p[order]) - p[order]) < top_p]
        nucleus = np.zeros_like(p)
        nucleus[keep] = p[keep]
        p = nucleus / nucleus.sum()
    return int(rng.choice(p.size, p=p))


def _check_args(prompt: list[int], max_tokens: int, temperature: float, top_p: float, vocab: int) -> None:
    if not prompt:
        msg = "the prompt is empty: pass at least one token or a non-empty text"
        raise InvalidArgument(msg, reason="EMPTY_PROMPT")
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        msg = f"bad sampling options max_tokens={max_tokens}, temperature={temperature}, top_p={top_p}"
        raise InvalidArgument(msg + ": need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1", reason="BAD_SAMPLING")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        msg = f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
        raise InvalidArgument(msg, reason="BAD_TOKEN_ID")


def generate_tokens(
    model: Any,
    tokenizer: Tokenizer,
    prompt: list[int],
    *,
    stop_ids: frozenset[int],
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_context: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Prefill ``prompt`` (in chunks) into a fresh KV cache, then decode one token at a time (events: module doc)."""
    _check_args(prompt, max_tokens, temperature, top_p, model.cfg.vocab_size)
    if max_context is not None and len(prompt) + max_tokens > max_context:
        msg = f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceed the {max_context}-token attention window"
        raise InvalidArgument(msg, reason="CONTEXT_TOO_LONG", max_context=max_context)
    rng = np.random.default_rng(seed)
    cache = [KVCache() for _ in model.model.layers]
    decoder = IncrementalDecoder(tokenizer)
    stats = GenerationStats(prompt_tokens=len(prompt))
    start = time.perf_counter()
    for i in range(0, len(prompt), PREFILL_CHUNK):
        hidden = model.hidden(mx.array([prompt[i : i + PREFILL_CHUNK]]), cache)
        mx.eval([s for c in cache for s in c.state])
    # Logits of the last position only: the vocab projection over the whole prompt would dominate prefill.
    token = sample(model.logits(hidden[0, -1]), temperature, top_p, rng)
    stats.prompt_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    for n in range(1, max_tokens + 1):
        finish = "stop" if token in stop_ids else "length" if n == max_tokens else None
        if finish is None:
            # Queue the next step before handing this token out, so decoding overlaps the consumer.
            logits = model.logits(model.hidden(mx.array([[token]]), cache)[0, -1])
            mx.async_eval(logits)
        text = "" if token in stop_ids else decoder.push(token)
        if finish is not None:
            stats.generation_tokens = n - 1
            stats.generation_seconds = time.perf_counter() - decode_start
            yield {"token_id": token, "text": text + decoder.flush(), "finish_reason": finish, "stats": stats}
            return
        yield {"token_id": token, "text": text}
        token = sample(logits, temperature, top_p, rng)


class TextGenerator:
    """``encode`` / ``generate`` / ``apply_chat_template`` for a bundle that has ``model``, ``tokenizer``,
    ``stop_ids``, ``bos_token``, ``model_dir``, ``max_context``, ``stats`` and ``_chat_tokenizer``."""

    model: Any
    tokenizer: Tokenizer
    stop_ids: frozenset[int]
    bos_token: str | None
    model_dir: Path
    stats: GenerationStats | None
    _chat_tokenizer: Any

    @property
    def max_context(self) -> int | None:
        """Longest prompt + generation the model computes exactly; None: no limit of its own."""
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's specials (BOS), unless the text already starts with the BOS token."""
        add = not (self.bos_token and text.startswith(self.bos_token))  # chat templates write BOS themselves
        return list(self.tokenizer.encode(text, add_special_tokens=add).ids)

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Iterator of ``{"token_id", "text"}`` dicts; the last adds ``finish_reason`` and ``stats`` (see
        ``generate_tokens``; here ``stats`` is a plain dict). ``self.stats`` keeps the last ``GenerationStats``."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        for event in generate_tokens(
            self.model,
            self.tokenizer,
            ids,
            stop_ids=self.stop_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_context=self.max_context,
        ):
            if "stats" in event:
                self.stats = event["stats"]
                event = {**event, "stats": event["stats"].to_dict()}
            yield event

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with tokenizer_config.json's ``chat_template`` (transformers)."""
        if self._chat_tokenizer is None:
            cfg = self.model_dir / "tokenizer_config.json"
            has_template = (self.model_dir / "chat_template.jinja").exists() or (
                cfg.exists() and "chat_template" in json.loads(cfg.read_text(encoding="utf-8"))
            )
            if not has_template:
                msg = f"{self.model_dir} has no chat template: pass a plain prompt to generate"
                raise InvalidArgument(msg, reason="NO_CHAT_TEMPLATE")
            from transformers import AutoTokenizer

            self._chat_tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        text = self._chat_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(str(text))
