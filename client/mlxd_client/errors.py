"""Client-side errors: one class per gRPC status code a caller may want to catch.

MlxdClientError            any failed RPC; .code, .reason, .metadata, .message
├── NotFoundError          NOT_FOUND
├── InvalidArgumentError   INVALID_ARGUMENT
├── FailedPreconditionError FAILED_PRECONDITION (output exists, protocol mismatch, ...)
├── UnsupportedError       UNIMPLEMENTED (architecture, dtype, op)
├── ResourceExhaustedError RESOURCE_EXHAUSTED
├── CancelledError         CANCELLED
└── UnavailableError       UNAVAILABLE (no daemon, worker crashed)
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "mlxd"


class MlxdClientError(Exception):
    def __init__(self, code: str, message: str, reason: str = "", metadata: dict[str, str] | None = None):
        super().__init__(f"{message} [{code}{' ' + reason if reason else ''}]")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "reason": self.reason, "message": self.message, "metadata": self.metadata}


class NotFoundError(MlxdClientError):
    pass


class InvalidArgumentError(MlxdClientError):
    pass


class FailedPreconditionError(MlxdClientError):
    pass


class UnsupportedError(MlxdClientError):
    pass


class ResourceExhaustedError(MlxdClientError):
    pass


class CancelledError(MlxdClientError):
    pass


class UnavailableError(MlxdClientError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[MlxdClientError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_rpc_error(err: grpc.RpcError) -> MlxdClientError:
    """Build the matching exception from a failed call, reading the ErrorInfo detail when present."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    reason, metadata = "", {}
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
    cls = _BY_CODE.get(code, MlxdClientError)
    return cls(code.name, message or "", reason, metadata)
