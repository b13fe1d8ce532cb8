"""Long jobs (convert, quantize, validate) in the front end: ids, event logs, states, cancellation, journal.

A job runs on its own thread, independent of the RPC that started it: a client that drops its stream does not
cancel it, and any client can re-attach with ``watch(job, from_seq)``. Every job ends in exactly one terminal
state. The journal (JSON lines) keeps finished jobs across restarts; a job that was still queued or running when
the daemon died is reported FAILED (reason DAEMON_RESTART) and its temporary output is removed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mlxd_daemon.errors import MlxdError, ResourceExhausted
from mlxd_daemon.workers import WorkerProcess

log = structlog.get_logger()

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
KEEP_FINISHED = 200  # jobs kept in memory and in the journal
TMP_MARKER = ".mlxd-tmp-"  # the converter writes into ".<dst name>.mlxd-tmp-<hex>" beside dst
OLD_MARKER = ".mlxd-old-"  # ... and moves an overwritten dst aside to ".<dst name>.mlxd-old-<hex>"


@dataclass
class Job:
    id: str
    kind: str
    src: str = ""
    dst: str = ""
    state: str = QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    cancel_requested: bool = False
    worker: WorkerProcess | None = None
    error: dict[str, Any] | None = None  # {"code", "reason", "message", "metadata"}
    result: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def is_cancelled(self) -> bool:
        return self.cancel_requested

    def record(self) -> dict[str, Any]:
        """What the journal keeps (events are not persisted, only the last one)."""
        return {
            "id": self.id, "kind": self.kind, "src": self.src, "dst": self.dst, "state": self.state,
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "error": self.error, "result": self.result, "last_event": self.events[-1] if self.events else None,
        }  # fmt: skip


class JobTable:
    def __init__(self, journal: Path | None = None, max_queued: int = 16) -> None:
        self._jobs: dict[str, Job] = {}
        self._cond = threading.Condition()
        self._seq = itertools.count(1)
        self.max_queued = max_queued
        self.journal = journal
        if journal is not None:
            self._recover(journal)

    # -- lifecycle of one job ---------------------------------------------------------------------
    def create(self, kind: str, src: str = "", dst: str = "") -> Job:
        """A new QUEUED job; ResourceExhausted (with a retry hint) when the queue is full."""
        with self._cond:
            queued = sum(1 for j in self._jobs.values() if j.state == QUEUED)
            if queued >= self.max_queued:
                msg = f"{queued} jobs are already queued (limit {self.max_queued}); retry when one finishes"
                raise ResourceExhausted(msg, reason="QUEUE_FULL", queued=queued, retry_after_s=5)
            job = Job(id=f"{kind}-{next(self._seq)}-{uuid.uuid4().hex[:8]}", kind=kind, src=src, dst=dst)
            self._jobs[job.id] = job
            self._append(job, {"kind": "begin", "stage": "queued"})
        self._persist(job)
        return job

    def start(self, job: Job, worker: WorkerProcess) -> None:
        """Called by the worker once it runs ``job``: from now on a cancel reaches that worker."""
        with self._cond:
            job.state, job.worker, job.started_at = RUNNING, worker, time.time()
            self._cond.notify_all()
        self._persist(job)

    def event(self, job: Job, event: dict[str, Any]) -> None:
        with self._cond:
            self._append(job, event)

    def _append(self, job: Job, event: dict[str, Any]) -> None:
        job.events.append({**event, "seq": len(job.events)})
        self._cond.notify_all()

    def succeed(self, job: Job, result: dict[str, Any]) -> None:
        self._finish(job, SUCCEEDED, result=result)

    def fail(self, job: Job, err: MlxdError) -> None:
        state = CANCELLED if err.code == "CANCELLED" else FAILED
        error = {"code": err.code, "reason": err.reason, "message": err.message, "metadata": err.metadata}
        self._finish(job, state, error=error)

    def _finish(self, job: Job, state: str, *, result: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None) -> None:  # fmt: skip
        with self._cond:
            job.state, job.result, job.error, job.finished_at = state, result, error, time.time()
            job.worker = None
            self._cond.notify_all()
            self._forget_old()
        log.info("job_finished", job=job.id, state=state, reason=(error or {}).get("reason"))
        self._persist(job)

    def cancel(self, job: Job) -> bool:
        """Request cancellation; False when the job already ended."""
        with self._cond:
            if job.state in TERMINAL:
                return False
            job.cancel_requested = True
            if job.state == RUNNING and job.worker is not None:
                job.worker.cancel()
        return True

    # -- reading ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def newest_first(self) -> list[Job]:
        with self._cond:
            return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def active(self) -> list[Job]:
        with self._cond:
            return [j for j in self._jobs.values() if j.state not in TERMINAL]

    def watch(self, job: Job, from_seq: int = 0, poll: float = 0.25) -> Iterator[dict[str, Any] | None]:
        """Yield the job's events from ``from_seq`` until it ends; ``None`` every ``poll`` seconds while idle,
        so the caller can notice a cancelled RPC."""
        next_seq = from_seq
        while True:
            with self._cond:
                if next_seq >= len(job.events) and job.state not in TERMINAL:
                    self._cond.wait(poll)
                new = job.events[next_seq:]
                done = job.state in TERMINAL
            if not new and not done:
                yield None
            yield from new
            next_seq += len(new)
            if done and next_seq >= len(job.events):
                return

    # -- journal --------------------------------------------------------------------------------------
    def _persist(self, job: Job) -> None:
        if self.journal is None:
            return
        line = json.dumps(job.record(), default=str)
        with self._cond, open(self.journal, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in TERMINAL]
        for job in sorted(finished, key=lambda j: j.finished_at)[:-KEEP_FINISHED]:
            del self._jobs[job.id]

    def _recover(self, journal: Path) -> None:
        """Load the journal; fail what a previous daemon left unfinished and clean its temporary output."""
        records: dict[str, dict[str, Any]] = {}
        if journal.exists():
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    records[record["id"]] = record
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from a crash
        for record in records.values():
            job = Job(id=record["id"], kind=record["kind"], src=record["src"], dst=record["dst"],
                      state=record["state"], created_at=record["created_at"], started_at=record["started_at"],
                      finished_at=record["finished_at"], error=record["error"], result=record["result"],
                      events=[record["last_event"]] if record.get("last_event") else [])  # fmt: skip
            if job.state not in TERMINAL:
                removed = remove_temporary_output(job.dst)
                job.state, job.finished_at = FAILED, time.time()
                msg = "the daemon stopped while this job ran; its temporary output was removed"
                job.error = {"code": "ABORTED", "reason": "DAEMON_RESTART", "message": msg}
                log.warning("job_interrupted", job=job.id, removed=removed)
            self._jobs[job.id] = job
        self._forget_old()
        # Compact: one line per remembered job, written atomically.
        tmp = journal.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(j.record(), default=str) + "\n" for j in self._jobs.values()))
        os.chmod(tmp, 0o600)
        tmp.replace(journal)


def remove_temporary_output(dst: str) -> list[str]:
    """Delete the converter's temporary directories for ``dst`` (``.<name>.mlxd-tmp-*`` beside it)."""
    if not dst:
        return []
    path = Path(dst)
    removed = []
    for tmp in path.parent.glob(f".{path.name}{TMP_MARKER}*"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(str(tmp))
    # An --overwrite interrupted between moving the old output aside and renaming the new one in: restore it.
    for old in path.parent.glob(f".{path.name}{OLD_MARKER}*"):
        if not path.exists():
            old.rename(path)
        else:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(str(old))
    return removed
