"""Domain errors. Core code raises these; only the servicer turns them into gRPC statuses.

    MlxdError                    (code INTERNAL)
    ├── NotFound                 NOT_FOUND            source path, model or job does not exist
    ├── InvalidArgument          INVALID_ARGUMENT     malformed checkpoint, bad flag value, bad input
    ├── FailedPrecondition       FAILED_PRECONDITION  output exists, model not loaded, ...
    ├── Unsupported              UNIMPLEMENTED        architecture, dtype or op we do not handle
    ├── ResourceExhausted        RESOURCE_EXHAUSTED   memory budget, queue full
    ├── Cancelled                CANCELLED            job cancelled by the client (or its deadline)
    ├── Aborted                  ABORTED              job interrupted by a daemon restart
    ├── PermissionDenied         PERMISSION_DENIED    path outside the allowed roots
    ├── Unauthenticated          UNAUTHENTICATED      TCP client without the daemon's token
    ├── Unavailable              UNAVAILABLE          the Hugging Face Hub cannot be reached
    ├── WorkerCrashed            UNAVAILABLE          the MLX worker process died mid-request
    └── RankLost                 UNAVAILABLE          a rank of a tensor-parallel model died or went silent

Every error carries a machine-readable ``reason`` (UPPER_SNAKE, sent as google.rpc.ErrorInfo.reason)
and ``metadata`` (str -> str) a client can act on. Messages say what to do next.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MlxdError(Exception):
    code: ClassVar[str] = "INTERNAL"
    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: Any) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def to_dict(self) -> dict[str, Any]:
        """Picklable form, used to carry an error from a worker process to the front end."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "reason": self.reason,
            "metadata": self.metadata,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> MlxdError:
        cls = _BY_NAME.get(d["type"], MlxdError)
        return cls(d["message"], reason=d["reason"], **d.get("metadata", {}))


class NotFound(MlxdError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class InvalidArgument(MlxdError):
    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"


class FailedPrecondition(MlxdError):
    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class Unsupported(MlxdError):
    code = "UNIMPLEMENTED"
    default_reason = "UNSUPPORTED"


class ResourceExhausted(MlxdError):
    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class Cancelled(MlxdError):
    code = "CANCELLED"
    default_reason = "CANCELLED"


class Aborted(MlxdError):
    code = "ABORTED"
    default_reason = "ABORTED"


class PermissionDenied(MlxdError):
    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(MlxdError):
    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class Unavailable(MlxdError):
    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class WorkerCrashed(MlxdError):
    code = "UNAVAILABLE"
    default_reason = "WORKER_CRASHED"


class RankLost(MlxdError):
    code = "UNAVAILABLE"
    default_reason = "RANK_LOST"


_BY_NAME = {
    c.__name__: c
    for c in (MlxdError, NotFound, InvalidArgument, FailedPrecondition, Unsupported, ResourceExhausted, Cancelled,
              Aborted, PermissionDenied, Unauthenticated, Unavailable, WorkerCrashed, RankLost)
}  # fmt: skip


def from_status(code: str, message: str, reason: str, metadata: dict[str, str] | None = None) -> MlxdError:
    """The error class for a gRPC status code name (a finished job's error, also from the journal)."""
    cls = next((c for c in _BY_NAME.values() if c.code == code), MlxdError)
    return cls(message, reason=reason, **(metadata or {}))
