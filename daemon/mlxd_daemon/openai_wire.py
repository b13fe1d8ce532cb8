"""The OpenAI wire format: request bodies -> plain arguments, results -> response and stream-chunk dicts.

Shapes follow the ``openai`` package's types (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``,
``CreateEmbeddingResponse``). Bad bodies raise ``InvalidArgument`` naming the field (``param``). Pure functions:
no I/O, no worker calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any

import numpy as np

from mlxd_daemon.errors import InvalidArgument

DATA_URL_IMAGE = "data:image/"


def bad(param: str, what: str) -> InvalidArgument:
    """The error for a malformed field: HTTP 400 with ``param`` set, like OpenAI's own."""
    return InvalidArgument(f"'{param}': {what}", reason="BAD_REQUEST", param=param)


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object body."""
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"the request body is not JSON: {e}"
        raise InvalidArgument(msg, reason="BAD_JSON") from None
    if not isinstance(body, dict):
        msg = "the request body must be a JSON object"
        raise InvalidArgument(msg, reason="BAD_JSON")
    return body


def _get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad(name, f"expected {types}, got a boolean")
    if not isinstance(value, types):
        raise bad(name, f"expected {getattr(types, '__name__', types)}, got {type(value).__name__}")
    return value


def model_name(body: dict[str, Any]) -> str:
    name = _get(body, "model", str, "")
    if not name:
        raise bad("model", "required: a model directory path or its alias (GET /v1/models lists them)")
    return str(name)


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    """max_tokens, temperature, top_p, seed and stop; defaults as ``mlxctl generate`` (greedy, 64 tokens)."""
    if _get(body, "n", int, 1) != 1:
        raise bad("n", "this server returns one choice per request: send n=1 (or several requests)")
    max_tokens = _get(body, "max_completion_tokens", int) or _get(body, "max_tokens", int, 0)
    if max_tokens < 0:
        raise bad("max_tokens", "must be >= 1")
    temperature = float(_get(body, "temperature", (int, float), 0.0))
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if temperature < 0 or not 0 < top_p <= 1:
        raise bad("temperature" if temperature < 0 else "top_p", "need temperature >= 0 and 0 < top_p <= 1")
    seed = _get(body, "seed", int, 0)
    stop = _get(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stops):
        raise bad("stop", "a string or a list of strings")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed % 2**64,
            "stop": stops}  # fmt: skip


def _text_of(content: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "only text parts ({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content", "a string or a list of text parts")


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """``messages`` as {"role", "content"} dicts of plain text."""
    messages = _get(body, "messages", list, [])
    if not messages:
        raise bad("messages", "required: a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "each message is an object with a string 'role'")
        out.append({"role": m["role"], "content": _text_of(m.get("content"), i)})
    return out


def completion_prompt(body: dict[str, Any]) -> str | list[int]:
    """``prompt``: a string, a list of one string, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    raise bad("prompt", "required: a non-empty string, a list of one string, or a list of token ids")


def embedding_inputs(body: dict[str, Any]) -> tuple[list[str], list[bytes], list[tuple[str, int]]]:
    """``input`` split into texts and images (base64 ``data:image/...`` URLs), and each input's (kind, row)."""
    value = body.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise bad("input", "a string or a non-empty list of strings (token-id inputs are not supported)")
    encoding = _get(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise bad("encoding_format", "'float' or 'base64'")
    texts: list[str] = []
    images: list[bytes] = []
    order: list[tuple[str, int]] = []
    for i, item in enumerate(items):
        if item.startswith(DATA_URL_IMAGE):
            header, _, data = item.partition(",")
            if not header.endswith(";base64"):
                raise bad(f"input[{i}]", "an image must be a base64 data URL (data:image/png;base64,...)")
            try:
                images.append(base64.b64decode(data, validate=True))
            except (binascii.Error, ValueError):
                raise bad(f"input[{i}]", "the data URL's base64 payload does not decode") from None
            order.append(("image", len(images) - 1))
        else:
            texts.append(item)
            order.append(("text", len(texts) - 1))
    return texts, images, order


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


class Completion:
    """One chat or text completion's response and stream chunks (same id and created time throughout)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = _id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" + (".chunk" if stream else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._envelope(False), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        """A stream chunk: the assistant role first (chat), then text pieces, then the finish reason."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**self._envelope(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The extra last chunk of ``stream_options: {"include_usage": true}``: usage, no choices."""
        return {**self._envelope(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def embedding_list(vectors: list[np.ndarray], model: str, encoding: str) -> dict[str, Any]:
    """``CreateEmbeddingResponse``; base64 is the little-endian float32 bytes, as OpenAI sends them."""
    data = []
    for i, v in enumerate(vectors):
        v32 = np.asarray(v, dtype="<f4")
        embedding = base64.b64encode(v32.tobytes()).decode() if encoding == "base64" else v32.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": model}
