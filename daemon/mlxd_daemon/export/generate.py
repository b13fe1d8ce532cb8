"""Generate with an exported encoder-decoder: the encoder once per prompt, the decoder on the tokens so far.

The decoder graph has no cache (captured with ``use_cache=False``): each step reruns it on every token so far.
Lengths are padded up to a power of two, so ``mx.compile`` keeps a handful of traces (one per bucket) instead of
one per step; a causal decoder's logits at position t do not depend on the padding after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import numpy as np

from mlxd_daemon.archs.contract import Stored
from mlxd_daemon.errors import InvalidArgument, NotFound
from mlxd_daemon.export.program import MX_DTYPES, Program, check_shape

MIN_BUCKET = 8
SAMPLE_RATE = 16_000  # what speech feature extractors (Whisper's) expect


def read_wav(data: bytes) -> np.ndarray:
    """A 16-bit PCM WAV file's samples as float32 in [-1, 1] (mono: channels averaged); BAD_AUDIO otherwise."""
    import io
    import wave

    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2 or w.getframerate() != SAMPLE_RATE:
                msg = (f"WAV is {8 * w.getsampwidth()}-bit at {w.getframerate()} Hz: only 16-bit PCM at "
                       f"{SAMPLE_RATE} Hz is read (resample it first)")  # fmt: skip
                raise InvalidArgument(msg, reason="BAD_AUDIO")
            frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
    except (wave.Error, EOFError) as e:
        msg = f"the wav input is not a readable WAV file: {e}"
        raise InvalidArgument(msg, reason="BAD_AUDIO") from None
    return (frames.astype(np.float32) / 32768.0).mean(axis=1)


def bucket(length: int, cap: int | None) -> int:
    """The padded length a decoder step runs at: the next power of two >= ``length`` (at least 8), capped."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, cap) if cap else size


@dataclass
class Seq2SeqBundle(Stored):
    """An exported encoder-decoder: ``run`` (the whole model on named arrays, as validation needs) and
    ``generate`` (the interface of decoder Generate: token events, then finish_reason and stats)."""

    encoder: Program
    decoder: Program
    spec: dict[str, Any]
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def program(self) -> Any:  # the whole model's input spec, for callers that describe a program's inputs
        return self

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return list(self.spec["inputs"])

    @property
    def generation(self) -> dict[str, Any]:
        return dict(self.spec["source"].get("generation", {}))

    def encode_states(self, inputs: dict[str, np.ndarray]) -> mx.array:
        """The encoder's last hidden state for named inputs (input_ids + attention_mask, or input_features)."""
        arrays = [mx.array(np.asarray(inputs[s["name"]])).astype(MX_DTYPES[s["dtype"]]) for s in self.encoder.inputs]
        return self.encoder(arrays)[0]

    def decode_logits(self, decoder_input_ids: np.ndarray, states: mx.array, mask: np.ndarray | None) -> mx.array:
        """Logits at every decoder position: [batch, length, vocab]."""
        values = {"decoder_input_ids": mx.array(decoder_input_ids), "encoder_hidden_states": states}
        if mask is not None:
            values["attention_mask"] = mx.array(mask)
        arrays = [values[s["name"]].astype(MX_DTYPES[s["dtype"]]) for s in self.decoder.inputs]
        return self.decoder(arrays)[0]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The whole model (encoder, then the decoder on ``decoder_input_ids``): logits and encoder states.
        An audio model also takes ``audio`` (16 kHz float PCM) or ``wav`` (a WAV file's bytes as uint8) alone and
        returns the greedy transcript as ``tokens``."""
        if set(inputs) in ({"audio"}, {"wav"}):
            pcm = inputs["audio"] if "audio" in inputs else read_wav(np.asarray(inputs["wav"], np.uint8).tobytes())
            return {"tokens": np.array(self.transcribe(pcm), np.int64)}

        bound: dict[str, int] = {}
        for s in self.spec["inputs"]:
            if s["name"] not in inputs:
                msg = f"missing input {s['name']!r}; the program takes {', '.join(i['name'] for i in self.inputs)}"
                raise InvalidArgument(msg, reason="MISSING_INPUT", input=s["name"])
            check_shape(s, np.asarray(inputs[s["name"]]).shape, self.spec.get("dims", {}), bound)
        states = self.encode_states(inputs)
        logits = self.decode_logits(np.asarray(inputs["decoder_input_ids"]), states, inputs.get("attention_mask"))
        mx.eval(logits, states)
        return {"logits": np.array(logits), "encoder_last_hidden_state": np.array(states)}

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        """An encoder-decoder generates (Generate) or runs on named arrays (Run), it does not embed."""
        msg = f"{self.model_dir} is an exported encoder-decoder: use Generate, or Run with named arrays"
        raise InvalidArgument(msg, reason="USE_GENERATE", model=str(self.model_dir))

    # ---- generation ---------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.model_dir / "tokenizer.json"
            if not path.is_file():
                msg = f"{self.model_dir} has no tokenizer.json (its source had none): pass prompt token ids"
                raise NotFound(msg, reason="TOKENIZER_NOT_FOUND", path=str(self.model_dir))
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """A prompt's token ids (with the specials the tokenizer's post-processor adds, e.g. ``</s>``)."""
        return list(self.tokenizer.encode(text).ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Encoder-decoders have no chat template."""
        msg = f"{self.model_dir} is an encoder-decoder without a chat template: pass a plain prompt"
        raise InvalidArgument(msg, reason="NO_CHAT_TEMPLATE")

    def generate(
        self, prompt: str | list[int], *, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Events ``{"token_id", "text"}`` per new token; the last adds ``finish_reason`` and ``stats``."""
        from mlx_lm.sample_utils import make_sampler

        if "input_ids" not in {s["name"] for s in self.encoder.inputs}:
            msg = f"{self.model_dir} takes audio features, not a text prompt: use Run with input_features"
            raise InvalidArgument(msg, reason="USE_RUN")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        vocab = int(self.decoder.outputs[0]["shape"][-1])
        if not ids or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or not all(0 <= t < vocab for t in ids):
            msg = (f"bad generation request: {len(ids)} prompt tokens (ids in [0, {vocab})), max_tokens={max_tokens},"
                   f" temperature={temperature}, top_p={top_p}")  # fmt: skip
            raise InvalidArgument(msg, reason="BAD_SAMPLING")
        sampler = make_sampler(temp=temperature, top_p=top_p)
        mx.random.seed(seed)
        start = time.perf_counter()
        source = np.array([ids], np.int64)
        mask = np.ones_like(source)
        states = self.encode_states({"input_ids": source, "attention_mask": mask})
        # .item()'s stub is every scalar type; a sampled token id is an int.
        pick = lambda logits: int(cast(int, sampler(logits[None].astype(mx.float32))[0].item()))  # noqa: E731
        tokens: list[int] = []
        text, first_at, finish = "", 0.0, "length"
        for token, stop in self.decode_steps(states, mask, max_tokens, pick):
            first_at = first_at or time.perf_counter()
            tokens.append(token)
            now = self.tokenizer.decode(tokens, skip_special_tokens=True) if self._has_tokenizer() else ""
            event: dict[str, Any] = {"token_id": token, "text": now[len(text) :]}
            text = now
            if stop or len(tokens) == max_tokens:
                finish = "stop" if stop else "length"
                break
            yield event
        end = time.perf_counter()
        n = len(tokens)
        stats = {"prompt_tokens": len(ids), "generation_tokens": max(n - 1, 0),
                 "prompt_tps": len(ids) / max(first_at - start, 1e-9),
                 "generation_tps": max(n - 1, 0) / max(end - first_at, 1e-9)}  # fmt: skip
        last = event if n else {"token_id": 0, "text": ""}  # the decoder's position limit left no room
        yield {**last, "finish_reason": finish, "stats": stats}

    def decode_steps(
        self, states: mx.array, mask: np.ndarray | None, max_tokens: int, pick: Any, prefix: list[int] | None = None
    ) -> Iterator[tuple[int, bool]]:
        """(token, is_stop) per step: the decoder on the start token (+ ``prefix``) and every token so far, with
        the generation config's forced and suppressed tokens applied as transformers applies them."""
        gen = self.generation
        eos = gen.get("eos_token_id")
        stops = {int(eos)} if isinstance(eos, int) else {int(e) for e in eos or []}
        cap = self.spec.get("dims", {}).get("decoder_seq", {}).get("max")
        tokens = [int(gen.get("decoder_start_token_id", 0)), *(prefix or [])]
        pad = int(gen.get("pad_token_id", 0))
        suppress = [int(t) for t in gen.get("suppress_tokens") or []]
        for step in range(max_tokens):
            if cap and len(tokens) >= cap:
                return
            padded: np.ndarray = np.full((1, bucket(len(tokens), cap)), pad, np.int64)
            padded[0, : len(tokens)] = tokens
            logits = self.decode_logits(padded, states, mask)[0, len(tokens) - 1]
            banned = suppress + ([int(t) for t in gen.get("begin_suppress_tokens") or []] if step == 0 else [])
            banned = [t for t in banned if 0 <= t < logits.shape[-1]]
            if banned:
                logits[mx.array(banned)] = -mx.inf
            if step == 0 and gen.get("forced_bos_token_id") is not None:
                token = int(gen["forced_bos_token_id"])
            elif step == max_tokens - 1 and gen.get("forced_eos_token_id") is not None:
                token = int(gen["forced_eos_token_id"])  # transformers forces EOS when the length runs out
            else:
                token = pick(logits)
            tokens.append(token)
            yield token, token in stops
            if token in stops:
                return

    def transcribe(self, audio: np.ndarray, max_tokens: int = 64) -> list[int]:
        """Greedy transcript token ids of 16 kHz float PCM (Whisper-style: log-mel features from the program's
        feature extractor, the encoder once, the decoder step by step)."""
        from transformers import WhisperFeatureExtractor

        if "input_features" not in {s["name"] for s in self.encoder.inputs}:
            msg = f"{self.model_dir} takes text, not audio: use Generate"
            raise InvalidArgument(msg, reason="USE_GENERATE")
        if not (self.model_dir / "preprocessor_config.json").is_file():
            msg = f"{self.model_dir} has no preprocessor_config.json: copy the feature extractor's config there"
            raise NotFound(msg, reason="PROCESSOR_NOT_FOUND", path=str(self.model_dir))
        extractor = WhisperFeatureExtractor.from_pretrained(str(self.model_dir))
        pcm = np.asarray(audio, np.float32).reshape(-1)
        features = extractor(pcm, sampling_rate=extractor.sampling_rate, return_tensors="np").input_features
        states = self.encode_states({"input_features": features})
        argmax = lambda logits: int(mx.argmax(logits).item())  # type: ignore[arg-type]  # noqa: E731
        return [t for t, _ in self.decode_steps(states, None, max_tokens, argmax)]

    def _has_tokenizer(self) -> bool:
        return (self.model_dir / "tokenizer.json").is_file()
