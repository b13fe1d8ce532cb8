"""MLX worker processes, seen from the front end.

MLX is not thread-safe and an MLX/Metal/CUDA out-of-memory aborts the whole process, so every MLX call
runs in a worker *process* that handles one request at a time. The front end keeps two: "jobs" (convert, quantize,
validate: long, cancellable) and "models" (resident models: load, infer), so inference is never queued behind
a conversion. A worker that dies is reported as WorkerCrashed and restarted on next use.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
from collections.abc import Callable
from typing import Any

import structlog

from mlxd_daemon.errors import Cancelled, MlxdError, WorkerCrashed
from mlxd_daemon.spool import Spool

log = structlog.get_logger()

EventCallback = Callable[[dict[str, Any]], None]


class WorkerProcess:
    """One worker process; ``call`` sends one request and blocks until its result, relaying events."""

    def __init__(self, role: str, options: dict[str, Any] | None = None) -> None:
        self.role = role
        self.options = options or {}
        self._ctx = mp.get_context("spawn")  # fork would copy gRPC's threads into the child
        self._lock = threading.Lock()
        self._cancel = self._ctx.Event()
        self._proc: Any = None
        self._conn: Any = None
        self.busy_with: str | None = None

    def start(self) -> None:
        """Start the process now (normally it starts on first use)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        from mlxd_daemon.worker_main import worker_main

        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=worker_main,
            args=(child, self._cancel, self.role, self.options),
            name=f"mlxd-worker-{self.role}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._conn = parent
        log.info("worker_started", role=self.role, pid=self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def call(
        self,
        op: str,
        args: dict[str, Any],
        on_event: EventCallback | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Any:
        """Run ``op`` in the worker. Raises the worker's MlxdError, or WorkerCrashed if it died.

        ``on_start`` runs once the worker is ours (from then on ``cancel`` targets this request).
        """
        with self._lock:
            self._ensure_started()
            self._cancel.clear()
            if on_start is not None:
                on_start()
            if is_cancelled is not None and is_cancelled():
                msg = f"{op} cancelled before it started"
                raise Cancelled(msg)
            self.busy_with = op
            spool = Spool()
            try:
                self._conn.send((op, spool.pack(args)))  # large payloads through a tmpfs file, not the pipe
                return self._receive(op, on_event)
            finally:
                spool.close()
                self.busy_with = None

    def _receive(self, op: str, on_event: EventCallback | None) -> Any:
        while True:
            try:
                ready = self._conn.poll(0.25)
                message = self._conn.recv() if ready else None
            except (EOFError, OSError):
                message = None
                ready = True
            if message is None:
                if ready or not self._proc.is_alive():
                    self._crashed(op)
                continue
            kind, payload = message
            if kind == "event":
                if on_event is not None:
                    on_event(payload)
            elif kind == "result":
                return payload
            else:
                raise MlxdError.from_dict(payload)

    def _crashed(self, op: str) -> None:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        self._proc = None
        log.error("worker_crashed", role=self.role, op=op, exit_code=code)
        what = " resident models were lost." if self.role == "models" else ""
        msg = (
            f"the {self.role} worker died (exit code {code}) while running {op}; it restarts on the next request.{what}"
        )
        raise WorkerCrashed(msg, reason="WORKER_CRASHED", exit_code=code, op=op)

    def cancel(self) -> None:
        """Ask the running request to stop at its next progress report."""
        self._cancel.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what the worker runs, ask it to exit, and make sure it is gone."""
        self._cancel.set()
        # Bounded wait for a cancelled request (or a start in progress) to unwind.
        locked = self._lock.acquire(timeout=timeout)
        try:
            proc, conn = self._proc, self._conn
            if proc is None:
                return
            if locked:
                with contextlib.suppress(OSError):  # the worker may already be gone
                    conn.send(("stop", {}))
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
            self._proc = None
        finally:
            if locked:
                self._lock.release()
