"""Long jobs (convert, quantize, validate) as seen by the front end: ids, states and cancellation."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlxd_daemon.workers import WorkerProcess

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"


@dataclass
class Job:
    id: str
    kind: str
    state: str = QUEUED
    created_at: float = field(default_factory=time.time)
    cancel_requested: bool = False
    worker: WorkerProcess | None = None
    error: str = ""

    def is_cancelled(self) -> bool:
        return self.cancel_requested


class JobTable:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def create(self, kind: str) -> Job:
        job = Job(id=f"{kind}-{next(self._seq)}-{uuid.uuid4().hex[:8]}", kind=kind)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def active(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state in (QUEUED, RUNNING)]

    def start(self, job: Job, worker: WorkerProcess) -> None:
        """Called by the worker once it runs ``job``: from now on a cancel reaches that worker."""
        with self._lock:
            job.state, job.worker = RUNNING, worker

    def cancel(self, job: Job) -> bool:
        """Request cancellation; False when the job already ended."""
        with self._lock:
            if job.state not in (QUEUED, RUNNING):
                return False
            job.cancel_requested = True
            if job.state == RUNNING and job.worker is not None:
                job.worker.cancel()
        return True

    def finish(self, job: Job, state: str, error: Any = "") -> None:
        job.state, job.error = state, str(error)
