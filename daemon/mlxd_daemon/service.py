"""Request handling shared by the front ends (the gRPC servicer and the OpenAI-compatible HTTP front).

Plain arguments in, calls on the same worker processes and Infer batcher, plain results or events out; a
failure raises a domain error (``errors.py``) that each front turns into its own status. Imports neither
protobuf nor mlx/torch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from mlxd_daemon import hub
from mlxd_daemon.batching import InferBatcher
from mlxd_daemon.errors import Cancelled, InvalidArgument, MlxdError, PermissionDenied, ResourceExhausted
from mlxd_daemon.jobs import SUCCEEDED, JobTable
from mlxd_daemon.workers import WorkerProcess

log = structlog.get_logger()

DEFAULT_MAX_TOKENS = 64
Sink = Callable[[str, Any], None]


class Service:
    """What both fronts call: path checks, models-worker calls, batched Infer, streamed Generate."""

    def __init__(
        self,
        models_worker: WorkerProcess,
        batcher: InferBatcher,
        jobs: JobTable,
        allowed_roots: tuple[str, ...] = (),
        *,
        offline: bool = False,
        allow_hub_cache: bool = False,
        max_generations: int = 64,
    ) -> None:
        self.models_worker = models_worker
        self.batcher = batcher
        self.jobs = jobs
        self.allowed_roots = tuple(os.path.realpath(r) for r in allowed_roots)
        self.offline = offline  # Hub ids resolve from the cache only (mlxd --offline)
        self.allow_hub_cache = allow_hub_cache  # the Hub cache is readable even outside the allowed roots
        self.max_generations = max_generations  # running + waiting for the models worker, over both fronts
        self._generations = 0
        self._lock = threading.Lock()

    def _allowed(self, real: str) -> bool:
        return not self.allowed_roots or any(real == r or real.startswith(r + os.sep) for r in self.allowed_roots)

    def check_paths(self, *paths: str) -> None:
        """Paths must be absolute and, when the daemon has allowed roots, inside one of them."""
        for path in paths:
            if not path or not os.path.isabs(path):
                msg = f"path {path!r} must be absolute (the daemon has its own working directory)"
                raise InvalidArgument(msg, reason="RELATIVE_PATH", path=path)
            real = os.path.realpath(path)  # symlinks cannot escape the roots
            if not self._allowed(real):
                msg = f"{path} is outside the daemon's allowed roots ({', '.join(self.allowed_roots)})"
                raise PermissionDenied(msg, reason="PATH_NOT_ALLOWED", path=path)

    def hub_args(self, source: str, revision: str) -> dict[str, Any] | None:
        """For a source shaped like a Hub id (not an absolute path): what the jobs worker needs to resolve it.

        The Hub cache is read (and written) like any path: inside an allowed root, or with --allow-hub-cache."""
        parsed = hub.split_source(source, revision)
        if parsed is None:
            return None
        self._check_hub_cache(f"{source} is a Hugging Face Hub id, but")
        return {"repo_id": parsed[0], "revision": parsed[1], "offline": self.offline}

    def cached_models(self) -> dict[str, Any]:
        """The models worker's listing of the Hub cache (each with how mlxd would convert it)."""
        self._check_hub_cache("listing it:")
        return self.call("hub_cache", {})

    def _check_hub_cache(self, what: str) -> None:
        cache = os.path.realpath(hub.cache_dir())
        if not self.allow_hub_cache and not self._allowed(cache):
            msg = (f"{what} the Hugging Face cache {cache} is outside the daemon's allowed roots: start mlxd with "
                   f"--allow-hub-cache, or put HF_HUB_CACHE inside an allowed root")  # fmt: skip
            raise PermissionDenied(msg, reason="HUB_CACHE_NOT_ALLOWED", path=cache)

    def models_busy(self) -> bool:
        """Whether the models worker is running a request now (a call would wait for it)."""
        return self.models_worker.busy_with is not None

    def call(self, op: str, args: dict[str, Any]) -> Any:
        """One request on the models worker (load, unload, list, run)."""
        return self.models_worker.call(op, args)

    def infer(self, model: str, texts: list[str], images: list[bytes]) -> dict[str, Any]:
        """Embed texts/images through the batcher: this request's rows of a (possibly shared) forward."""
        self.check_paths(model)
        return self.batcher.infer(model, texts, images)

    def generate(self, args: dict[str, Any], sink: Sink) -> Generation:
        """Start a generation (args from ``generate_args``); its events go to ``sink`` (see ``Generation``)."""
        self._admit(args["model"])
        return Generation(self.models_worker, args, sink, on_end=self._ended)

    def _admit(self, model: str) -> None:
        """Count a streamed generation (text or image) against --max-generations; QUEUE_FULL beyond it."""
        self.check_paths(model)
        with self._lock:
            if self._generations >= self.max_generations:
                msg = (f"{self._generations} generations are already running or waiting (limit "
                       f"{self.max_generations}, --max-generations); retry shortly")  # fmt: skip
                raise ResourceExhausted(msg, reason="QUEUE_FULL", queued=self._generations, retry_after_s=1)
            self._generations += 1

    def _ended(self) -> None:
        with self._lock:
            self._generations -= 1

    def generate_image(self, args: dict[str, Any], sink: Sink) -> Generation:
        """Start a Stable Diffusion run; ("step", {"step", "total", "seconds"}) events, then the result with the
        PNG bytes of each image (see ``handlers.generate_image``)."""
        self._admit(args["model"])
        return Generation(self.models_worker, args, sink, on_end=self._ended, op="generate_image", event="step")

    def converted_models(self) -> list[str]:
        """Output directories of this daemon's finished convert/quantize jobs that still hold a model."""
        seen: dict[str, None] = {}
        for job in self.jobs.newest_first():
            done = job.kind in ("convert", "quantize") and job.state == SUCCEEDED and job.dst
            if done and (Path(job.dst) / "config.json").is_file():
                seen.setdefault(str(Path(job.dst).resolve()))
        return list(seen)


def generate_args(
    model: str,
    prompt: str | list[int] = "",
    messages: Sequence[dict[str, str]] = (),
    *,
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    seed: int = 0,
    stop: Sequence[str] = (),
) -> dict[str, Any]:
    """The models worker's ``generate`` arguments; 0 means the default for max_tokens (64) and top_p (1)."""
    return {
        "model": model, "prompt": prompt, "messages": [dict(m) for m in messages],
        "max_tokens": max_tokens or DEFAULT_MAX_TOKENS, "temperature": temperature,
        "top_p": top_p if 0 < top_p <= 1 else 1.0, "seed": seed, "stop": [s for s in stop if s],
    }  # fmt: skip


class Generation:
    """One streamed models-worker call (``op``: generate, generate_image) on its own thread. ``sink(kind, value)``
    receives (``event``, data) events ("token": {"token_id", "text"}; "step": {"step", "total", "seconds"}), then
    exactly one ("result", dict) or ("error", MlxdError). ``cancel`` stops it between tokens or steps."""

    def __init__(
        self,
        worker: WorkerProcess,
        args: dict[str, Any],
        sink: Sink,
        on_end: Callable[[], None] = lambda: None,
        op: str = "generate",
        event: str = "token",
    ) -> None:
        self.worker, self.args, self.sink, self.on_end = worker, args, sink, on_end
        self.op, self.event = op, event
        self.running = False  # the worker is on this request now (so a cancel targets it)
        self.stopped = False
        self.tokens = 0  # events so far (tokens, or steps), for the cancel log line
        threading.Thread(target=self._run, name=op, daemon=True).start()

    def _token(self, event: dict[str, Any]) -> None:
        self.tokens += 1
        self.sink(self.event, event)

    def _started(self) -> None:
        self.running = True

    def _run(self) -> None:
        try:
            end = self._call()
        finally:
            self.running = False
            self.on_end()  # before the client hears the end, so its next request finds the slot free
        self.sink(*end)

    def _call(self) -> tuple[str, Any]:
        try:
            return "result", self.worker.call(self.op, self.args, on_event=self._token,
                                              is_cancelled=lambda: self.stopped, on_start=self._started)  # fmt: skip
        except Cancelled as e:
            counted = {"tokens" if self.event == "token" else "steps": self.tokens}
            log.info(f"{self.op}_cancelled", model=self.args["model"], **counted)
            return "error", e
        except MlxdError as e:
            return "error", e
        except Exception as e:  # a bug must still end the stream, not leave the client waiting
            return "error", MlxdError(f"internal error: {type(e).__name__}: {e}", reason="INTERNAL")

    def cancel(self) -> None:
        """The client went away: stop generating for nobody (a no-op once the generation ended)."""
        self.stopped = True
        if self.running:
            self.worker.cancel()
