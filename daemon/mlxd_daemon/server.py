"""Server assembly: the Mlxd servicer, health, reflection, a canonical log line per RPC, graceful stop."""

from __future__ import annotations

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
from mlxd_client.discovery import CHANNEL_OPTIONS, is_serving

from mlxd_daemon.blas import find_blas, warning
from mlxd_daemon.servicer import MlxdServicer
from mlxd_daemon.workers import WorkerProcess

log = structlog.get_logger()
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Mlxd"].full_name


class CanonicalLogInterceptor(grpc.ServerInterceptor):
    """One log line per RPC: method, status code, latency (and job id, bound by the servicer)."""

    def __init__(self) -> None:
        self.last_activity = time.monotonic()

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]

        def finish(context: grpc.ServicerContext, start: float, error: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
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


class Daemon:
    """The front end process: gRPC server plus its two worker processes."""

    def __init__(
        self,
        address: str,
        *,
        memory_budget: int,
        max_rpc_threads: int = 16,
        log_level: str = "info",
        log_json: bool | None = None,
        idle_timeout: float = 0,
    ) -> None:
        options = {"log_level": log_level, "log_json": log_json, "memory_budget": memory_budget}
        self.address = address
        self.idle_timeout = idle_timeout
        self.jobs_worker = WorkerProcess("jobs", options)
        self.models_worker = WorkerProcess("models", options)
        self.stopping = threading.Event()
        self.interceptor = CanonicalLogInterceptor()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_rpc_threads, thread_name_prefix="rpc"),
            interceptors=[self.interceptor],
            options=CHANNEL_OPTIONS,
        )
        self.servicer = MlxdServicer(self.jobs_worker, self.models_worker, address, self.stopping.set)
        pb_grpc.add_MlxdServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)

    def start(self) -> None:
        prepare_socket(self.address)
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user may talk to the daemon
        try:
            port = self.server.add_insecure_port(self.address)
            if port == 0 and socket_path(self.address) is None:
                msg = f"could not bind {self.address}"
                raise SystemExit(msg)
            self.server.start()
        finally:
            os.umask(old_umask)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        blas = find_blas()
        log.info("daemon_started", address=self.address, pid=os.getpid(), blas=blas)
        if warning(blas):
            log.warning("slow_blas", message=warning(blas))
        # Warm the models worker in the background so the first Infer does not pay for process start-up.
        threading.Thread(target=self.models_worker.start, daemon=True).start()

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
        self.server.stop(grace).wait(grace + 1)
        self.jobs_worker.stop()
        self.models_worker.stop()
        path = socket_path(self.address)
        if path is not None and path.exists():
            path.unlink()
        log.info("daemon_stopped", address=self.address)
