"""The OpenAI-compatible HTTP front: Starlette routes on uvicorn, in a thread of the daemon process.

Routes call the same ``Service`` as the gRPC servicer (the same worker processes, residency and Infer
batcher), so a model is loaded once whichever front asks for it. Every request carries the daemon's token as
``Authorization: Bearer`` (what OpenAI clients send as their API key). Domain errors become OpenAI's error JSON
with the mlxd reason; ``HTTP_STATUS`` is the one table from error code to HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxd_daemon import openai_wire as wire
from mlxd_daemon.errors import MlxdError, NotFound, Unauthenticated
from mlxd_daemon.service import Service, generate_args

log = structlog.get_logger()

# gRPC status code (errors.py) -> HTTP status; RESOURCE_EXHAUSTED also sends Retry-After.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500,
    "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
}  # fmt: skip
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}  # fmt: skip


def error_response(err: MlxdError) -> JSONResponse:
    """OpenAI's error JSON (``code`` = the mlxd reason, ``mlxd`` = code/reason/metadata) at the matching status."""
    status = HTTP_STATUS.get(err.code, 500)
    body = {"error": {"message": err.message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": err.metadata.get("param"), "code": err.reason,
                      "mlxd": {"code": err.code, "reason": err.reason, "metadata": err.metadata}}}  # fmt: skip
    headers = {"Retry-After": err.metadata.get("retry_after_s", "1")} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


def alias_of(model_id: str) -> str:
    """A model's short name: its directory's name."""
    return Path(model_id).name


class OpenAIFront:
    """The Starlette app over a ``Service``; ``touch`` records activity (the daemon's idle timeout)."""

    def __init__(self, service: Service, token: str, touch: Callable[[], None] = lambda: None) -> None:
        self.service, self.touch = service, touch
        self._expected = f"Bearer {token}".encode()
        self.seen: dict[str, None] = {}  # models this front has served, newest last
        self._resident: dict[str, dict[str, Any]] = {}  # the models worker's last listing
        routes = [
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/embeddings", self._endpoint(self.embeddings), methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)

    def _endpoint(self, fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Token check, domain error -> error JSON, and one log line per request."""

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            try:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, self._expected):
                    msg = "missing or wrong API key: send the daemon's token (its --token-file) as the Bearer token"
                    raise Unauthenticated(msg, reason="BAD_TOKEN")
                response = await fn(request)
            except MlxdError as e:
                response = error_response(e)
            log.info("http", method=request.method, path=request.url.path, status=response.status_code,
                     latency_ms=round((time.perf_counter() - start) * 1e3, 2))  # fmt: skip
            self.touch()
            return response

        return endpoint

    # -- models ------------------------------------------------------------------------------------
    async def _catalog(self, with_resident: bool) -> dict[str, dict[str, Any]]:
        """Known models by id: resident ones (asks the models worker), converted by this daemon, served here.

        While the worker is busy (a generation can take minutes) the last resident listing stands in."""
        known: dict[str, dict[str, Any]] = {}
        if with_resident:
            if not self.service.models_busy():
                listed = await anyio.to_thread.run_sync(self.service.call, "list", {})
                self._resident = {m["id"]: {"resident": True, "model_type": m["model_type"],
                                            "created": int(m["loaded_at_unix"])} for m in listed["models"]}  # fmt: skip
            known.update(self._resident)
        for model_id in [*self.service.converted_models(), *self.seen]:
            if model_id not in known and os.path.isdir(model_id):
                known[model_id] = {"resident": False, "created": int(os.path.getmtime(model_id))}
        return known

    async def resolve(self, name: str) -> str:
        """A model directory for ``model``: an absolute path as is, else a known model's id or alias."""
        if os.path.isabs(name):
            return name
        for with_resident in (False, True):  # the worker is asked only when the cheap lookup fails
            known = await self._catalog(with_resident)
            matches = [m for m in known if name in (m, alias_of(m))]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                msg = f"model {name!r} is ambiguous ({', '.join(matches)}): pass the model directory path"
                raise wire.bad("model", msg)
        msg = f"no model {name!r}: pass an absolute model directory path or an alias GET /v1/models lists"
        raise NotFound(msg, reason="MODEL_NOT_FOUND", param="model", model=name)

    async def models(self, request: Request) -> Response:
        """GET /v1/models: resident and known models; id = the model directory, alias = its name."""
        known = await self._catalog(True)
        names = [alias_of(m) for m in known]
        data = [{"id": m, "object": "model", "created": info.get("created", 0), "owned_by": "mlxd",
                 **({"alias": alias_of(m)} if names.count(alias_of(m)) == 1 else {}), **info}
                for m, info in known.items()]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    # -- completions ---------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        body = wire.parse_body(await request.body())
        messages = wire.chat_messages(body)
        return await self._complete(body, generate_args("", messages=messages, **wire.sampling(body)), chat=True)

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        body = wire.parse_body(await request.body())
        prompt = wire.completion_prompt(body)
        return await self._complete(body, generate_args("", prompt, **wire.sampling(body)), chat=False)

    async def _complete(self, body: dict[str, Any], args: dict[str, Any], *, chat: bool) -> Response:
        name = wire.model_name(body)
        args.update(model=await self.resolve(name), plain_chat_fallback=True)
        completion = wire.Completion(chat, name)
        events = self._generate(args)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            first = await anext(events)  # errors before the first token still get a proper status
            stream = self._stream(completion, first, events, include_usage=include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        count, result = 0, None
        async for batch in events:
            for kind, value in batch:
                count += kind == "token"
                if kind == "result":
                    result = value
        assert result is not None  # _generate ends with a result or raises
        return JSONResponse(completion.response(result["text"], result["finish_reason"], result["prompt_tokens"],
                                                count))  # fmt: skip

    async def _generate(self, args: dict[str, Any]) -> AsyncGenerator[list[tuple[str, Any]], None]:
        """The generation's ("token", event) ... ("result", dict) events, in batches of those that are ready
        together (a client that reads slower than tokens come gets fewer, larger writes); raises its MlxdError; a
        consumer that stops early (the HTTP client went away) cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def sink(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the HTTP front stopped
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        generation = self.service.generate(args, sink)
        done = False
        try:
            while not done:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                for i, (kind, value) in enumerate(batch):
                    if kind == "error":
                        done = True
                        if i:  # the tokens before it still go out
                            yield batch[:i]
                        raise value
                    if kind == "result":
                        done = True
                        self.seen.pop(value["model"], None)
                        self.seen[value["model"]] = None
                yield batch
        finally:
            if not done:
                generation.cancel()

    async def _stream(
        self,
        completion: wire.Completion,
        first: list[tuple[str, Any]],
        events: AsyncGenerator[list[tuple[str, Any]], None],
        *,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """Server-sent chunks in OpenAI's format (one per token; the tokens that are ready together go out in one
        write), ending with ``data: [DONE]``; an error mid-stream is sent as an error event (the status line has
        gone out already)."""
        count = 0
        if completion.chat:
            yield wire.sse(completion.chunk("", role=True))
        try:
            batch, done = first, False
            while not done:
                out = []
                for kind, value in batch:
                    if kind == "token":
                        count += 1
                        if value["text"]:
                            out.append(wire.sse(completion.chunk(value["text"])))
                    else:
                        out.append(wire.sse(completion.chunk(None if completion.chat else "", value["finish_reason"])))
                        if include_usage:
                            out.append(wire.sse(completion.usage_chunk(value["prompt_tokens"], count)))
                        done = True
                if out:
                    yield b"".join(out)
                if not done:
                    batch = await anext(events)
        except MlxdError as e:
            yield wire.sse(bytes(error_response(e).body).decode())
        finally:
            await events.aclose()  # cancels the generation if the client left mid-stream
        yield wire.sse("[DONE]")

    # -- embeddings ----------------------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        """POST /v1/embeddings: BERT sentence embeddings, CLIP text and (data URL) image embeddings."""
        body = wire.parse_body(await request.body())
        name = wire.model_name(body)
        texts, images, order = wire.embedding_inputs(body)
        model = await self.resolve(name)
        reply = await anyio.to_thread.run_sync(self.service.infer, model, texts, images)
        outputs = reply["outputs"]
        for kind, key in (("text", "text_embeds"), ("image", "image_embeds")):
            if any(k == kind for k, _ in order) and key not in outputs:
                msg = f"{name} gives no {kind} embeddings (it returns {', '.join(sorted(outputs))})"
                raise wire.bad("input", msg)
        vectors = [outputs["text_embeds" if kind == "text" else "image_embeds"][row] for kind, row in order]
        self.seen.pop(reply["model"], None)
        self.seen[reply["model"]] = None
        return JSONResponse(wire.embedding_list(vectors, name, body.get("encoding_format") or "float"))


def parse_http_address(value: str) -> tuple[str, int]:
    """``PORT`` (loopback) or ``HOST:PORT`` -> (host, port)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        msg = f"--http {value!r}: expected PORT or HOST:PORT"
        raise ValueError(msg)
    return host, int(port)


class HttpServer:
    """uvicorn serving ``app`` on its own thread and event loop; the socket is bound in ``__init__`` so a taken
    port fails at start-up and port 0 resolves to a real one (``address``)."""

    def __init__(self, app: Any, host: str, port: int, grace: int = 5) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto given explicitly: asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets, and without it each
        # streamed chunk after the first waits for the client's delayed ACK (~40 ms)
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            msg = f"could not bind the HTTP front to {host}:{port}: {e.strerror}"
            raise SystemExit(msg) from None
        bound = self.sock.getsockname()[1]
        self.address = f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=grace)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                       daemon=True)  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            msg = f"the HTTP front did not start on {self.address}"
            raise SystemExit(msg)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let open requests finish (up to the grace period), then return."""
        self.server.should_exit = True
        self.thread.join(timeout)
