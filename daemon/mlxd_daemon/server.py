"""Server assembly: the Mlxd servicer, health, reflection, a canonical log line per RPC, graceful stop."""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from mlxd.v1 import mlxd_pb2 as pb
from mlxd.v1 import mlxd_pb2_grpc as pb_grpc
from mlxd_common.endpoint import CHANNEL_OPTIONS, is_serving

from mlxd_daemon import PROTOCOL_VERSION, __version__, spool
from mlxd_daemon.batching import InferBatcher
from mlxd_daemon.blas import find_blas, warning
from mlxd_daemon.errors import Unauthenticated
from mlxd_daemon.http_front import HttpServer, OpenAIFront
from mlxd_daemon.jobs import JobTable
from mlxd_daemon.servicer import MlxdServicer
from mlxd_daemon.workers import WorkerProcess

log = structlog.get_logger()
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Mlxd"].full_name


class CanonicalLogInterceptor(grpc.ServerInterceptor):
    """One log line per RPC: method, status code, latency (and job id, bound by the servicer)."""

    def __init__(self) -> None:
        self.last_activity = time.monotonic()

    def touch(self) -> None:
        """Record activity from another front (HTTP): the idle timeout counts all requests."""
        self.last_activity = time.monotonic()

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]

        def finish(context: grpc.ServicerContext, start: float, error: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None and not context.is_active():  # the client left, or its deadline passed
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            elif code is None:
                code = (
                    grpc.StatusCode.UNKNOWN
                    if error is not None and not isinstance(error, GeneratorExit)
                    else grpc.StatusCode.OK
                )
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            level = log.info if name in ("OK", "CANCELLED") else log.warning
            level("rpc", method=method, code=name, latency_ms=round((time.perf_counter() - start) * 1e3, 2))
            structlog.contextvars.clear_contextvars()
            self.last_activity = time.monotonic()

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                start, error = time.perf_counter(), None
                try:
                    return inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    finish(context, start, error)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start, error = time.perf_counter(), None
                try:
                    yield from inner_stream(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    finish(context, start, error)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def socket_path(address: str) -> Path | None:
    return Path(address[len("unix://") :]) if address.startswith("unix://") else None


def prepare_socket(address: str) -> None:
    """Refuse to start over a live daemon; remove a stale socket left by one that crashed."""
    path = socket_path(address)
    if path is None:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        if is_serving(address, timeout=1.0):
            msg = f"a daemon already serves at {address}; stop it first (mlxctl daemon stop)"
            raise SystemExit(msg)
        log.warning("stale_socket_removed", path=str(path))
        path.unlink()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """TCP listeners require ``authorization: Bearer <token>`` on every call except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            from mlxd_daemon.servicer import abort

            abort(context, Unauthenticated("missing or wrong token: set MLXD_TOKEN to the daemon's token "
                                           "(its --token-file)", reason="BAD_TOKEN"))  # fmt: skip

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get("authorization", "")), self._expected):
            return continuation(details)
        return self._deny


def discovery_path(address: str, state_dir: Path) -> Path:
    """Where the discovery file (pid, address, version) lives: beside the socket, or in the state dir."""
    sock = socket_path(address)
    if sock is not None:
        return sock.with_name(sock.name + ".json")
    return state_dir / f"mlxd-{address.rsplit(':', 1)[-1]}.json"


def write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (created private, then renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)


class Daemon:
    """The front end process: gRPC server plus its two worker processes."""

    def __init__(
        self,
        address: str,
        *,
        memory_budget: int,
        state_dir: Path,
        max_rpc_threads: int = 16,
        log_level: str = "info",
        log_json: bool | None = None,
        idle_timeout: float = 0,
        token: str | None = None,
        tls: tuple[bytes, bytes] | None = None,
        allowed_roots: tuple[str, ...] = (),
        max_queued_jobs: int = 16,
        max_batch: int = 32,
        batch_window_s: float = 0.0,
        max_generations: int = 64,
        http: tuple[str, int] | None = None,
        http_token: str | None = None,
        offline: bool = False,
        allow_hub_cache: bool = False,
    ) -> None:
        options = {"log_level": log_level, "log_json": log_json, "memory_budget": memory_budget}
        self.address = address
        self.tls = tls  # (private key PEM, certificate chain PEM) for a TCP listener
        self.idle_timeout = idle_timeout
        self.state_dir = state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        spool.remove_stale()  # request payloads a killed daemon left in /dev/shm
        self.discovery = discovery_path(address, state_dir)
        self.jobs_worker = WorkerProcess("jobs", options)
        self.models_worker = WorkerProcess("models", options)
        self.stopping = threading.Event()
        self.interceptor = CanonicalLogInterceptor()
        interceptors: list[grpc.ServerInterceptor] = [self.interceptor]
        if token:
            interceptors.append(TokenAuthInterceptor(token))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_rpc_threads, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=CHANNEL_OPTIONS,
        )
        jobs = JobTable(journal=state_dir / f"{self.discovery.stem}.jobs.jsonl", max_queued=max_queued_jobs)
        self.servicer = MlxdServicer(
            self.jobs_worker,
            self.models_worker,
            address,
            self.stopping.set,
            jobs=jobs,
            allowed_roots=allowed_roots,
            batcher=InferBatcher(self.models_worker, max_batch=max_batch, window_s=batch_window_s),
            offline=offline,
            allow_hub_cache=allow_hub_cache,
            max_generations=max_generations,
        )
        pb_grpc.add_MlxdServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.http: HttpServer | None = None
        if http is not None:
            assert http_token, "the HTTP front always requires a token"
            front = OpenAIFront(self.servicer.service, http_token, touch=self.interceptor.touch)
            self.http = HttpServer(front.app, *http)  # binds now: a taken port fails before anything starts
            self.servicer.http_address = self.http.address

    def start(self) -> None:
        prepare_socket(self.address)
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user may talk to the daemon
        try:
            if self.tls is not None:
                credentials = grpc.ssl_server_credentials([self.tls])
                port = self.server.add_secure_port(self.address, credentials)
            else:
                port = self.server.add_insecure_port(self.address)
            if port == 0 and socket_path(self.address) is None:
                msg = f"could not bind {self.address}"
                raise SystemExit(msg)
            self.server.start()
        finally:
            os.umask(old_umask)
        if self.http is not None:
            self.http.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        blas = find_blas()
        info = {"pid": os.getpid(), "address": self.address, "version": __version__, "protocol": PROTOCOL_VERSION,
                "started_at": time.time(), "blas": blas, "http_address": self.servicer.http_address}  # fmt: skip
        write_private(self.discovery, json.dumps(info))
        log.info("daemon_started", address=self.address, pid=os.getpid(), blas=blas, discovery=str(self.discovery),
                 http=self.servicer.http_address or None)  # fmt: skip
        if warning(blas):
            log.warning("slow_blas", message=warning(blas))
        # Warm the models worker in the background so the first Infer does not pay for process start-up; its first
        # request probes the quantization modes the MLX backend runs (Initialize's capabilities).
        threading.Thread(target=self.servicer.probe_capabilities, daemon=True).start()

    def wait(self) -> None:
        """Block until Shutdown, a signal, or the idle timeout."""
        while not self.stopping.wait(1.0):
            idle = time.monotonic() - self.interceptor.last_activity
            if self.idle_timeout and idle > self.idle_timeout and not self.servicer.jobs.active():
                log.info("idle_timeout", idle_s=round(idle))
                break

    def stop(self, grace: float = 5.0) -> None:
        """Drain: NOT_SERVING, cancel jobs, stop the server and workers, remove the socket."""
        self.health.enter_graceful_shutdown()
        for job in self.servicer.jobs.active():
            self.servicer.jobs.cancel(job)
        if self.http is not None:
            self.http.stop(grace + 1)
        self.server.stop(grace).wait(grace + 1)
        self.servicer.batcher.stop()
        self.jobs_worker.stop()
        self.models_worker.stop()
        path = socket_path(self.address)
        for leftover in (path, self.discovery):
            if leftover is not None and leftover.exists():
                leftover.unlink()
        log.info("daemon_stopped", address=self.address)
