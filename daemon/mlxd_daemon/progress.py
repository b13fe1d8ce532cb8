"""Progress reporting and cancellation for long jobs (convert, quantize, validate).

Core functions take a ``Reporter``; they call ``begin`` once per stage, ``report`` after each unit of work
(a tensor, a layer) and ``end`` when the stage is done. ``report`` also checks for cancellation, so a
cancel takes effect between tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlxd_daemon.errors import Cancelled

Emit = Callable[[dict[str, Any]], None]


class Reporter:
    """Turns progress calls into event dicts for ``emit``; raises ``Cancelled`` once ``is_cancelled()``."""

    def __init__(self, emit: Emit | None = None, is_cancelled: Callable[[], bool] | None = None) -> None:
        self._emit = emit or (lambda _event: None)
        self._is_cancelled = is_cancelled or (lambda: False)
        self.stage = ""
        self.total_items = 0
        self.total_bytes = 0

    def check_cancelled(self) -> None:
        if self._is_cancelled():
            msg = f"cancelled during {self.stage or 'start-up'}"
            raise Cancelled(msg)

    def begin(self, stage: str, total_items: int = 0, total_bytes: int = 0, message: str = "") -> None:
        self.check_cancelled()
        self.stage, self.total_items, self.total_bytes = stage, total_items, total_bytes
        self._emit(
            {
                "kind": "begin",
                "stage": stage,
                "items_total": total_items,
                "bytes_total": total_bytes,
                "message": message,
            }
        )

    def report(self, items_done: int, bytes_done: int = 0, message: str = "") -> None:
        self._emit(
            {
                "kind": "report",
                "stage": self.stage,
                "items_done": items_done,
                "items_total": self.total_items,
                "bytes_done": bytes_done,
                "bytes_total": self.total_bytes,
                "message": message,
            }
        )
        self.check_cancelled()

    def data(self, payload: dict[str, Any]) -> None:
        """A free-form event (e.g. a generated token) for the caller's stream; checks for cancellation."""
        self._emit({"kind": "data", **payload})
        self.check_cancelled()

    def end(self, message: str = "") -> None:
        self._emit(
            {
                "kind": "end",
                "stage": self.stage,
                "items_done": self.total_items,
                "items_total": self.total_items,
                "bytes_done": self.total_bytes,
                "bytes_total": self.total_bytes,
                "message": message,
            }
        )


NULL_REPORTER = Reporter()
