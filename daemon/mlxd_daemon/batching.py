"""Dynamic batching of Infer: concurrent requests for the same model share one forward pass.

Requests queue in the front end; one dispatcher thread sends them to the models worker as ``infer_many``.
While the worker is busy, requests pile up and go together next (no added latency at low load); a latency
window (``--batch-window-ms``) can also hold the first request back briefly to gather more. A batch holds at
most ``max_batch`` inputs (texts + images); ``max_batch`` 1 turns batching off.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mlxd_daemon.errors import MlxdError
from mlxd_daemon.workers import WorkerProcess


@dataclass
class Pending:
    model: str
    texts: list[str]
    images: list[bytes]
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: MlxdError | None = None

    @property
    def size(self) -> int:
        return max(1, len(self.texts) + len(self.images))


class InferBatcher:
    def __init__(self, worker: WorkerProcess, max_batch: int = 32, window_s: float = 0.0) -> None:
        self.worker, self.max_batch, self.window_s = worker, max(1, max_batch), window_s
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = self.batched_requests = 0  # for stats
        threading.Thread(target=self._dispatch, name="infer-batcher", daemon=True).start()

    def infer(self, model: str, texts: list[str], images: list[bytes]) -> dict[str, Any]:
        """Queue one request and wait for its share of a batch; raises its MlxdError."""
        item = Pending(model, texts, images)
        with self._cond:
            self._queue.append(item)
            self._cond.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _take_batch(self) -> list[Pending]:
        """FIFO: the oldest request's model, then later requests for the same model while they fit."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return []
            first = self._queue[0]
        wait = first.arrived + self.window_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self._cond:
            batch: list[Pending] = []
            rest: deque[Pending] = deque()
            size = 0
            while self._queue:
                item = self._queue.popleft()
                if item.model == first.model and (not batch or size + item.size <= self.max_batch):
                    batch.append(item)
                    size += item.size
                else:
                    rest.append(item)
            self._queue = rest
            return batch

    def _dispatch(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            requests = [{"texts": p.texts, "images": p.images} for p in batch]
            try:
                results = self.worker.call("infer_many", {"model": batch[0].model, "requests": requests})
            except MlxdError as e:  # model-wide: not found, crashed worker, ...
                results = [{"error": e.to_dict()} for _ in batch]
            self.batches += 1
            self.batched_requests += len(batch)
            for item, result in zip(batch, results, strict=True):
                if "error" in result:
                    item.error = MlxdError.from_dict(result["error"])
                else:
                    item.result = result
                item.done.set()
