"""Where the daemon listens and how to reach it: what both the client (discovery, auto-start) and the daemon
(binding, detecting one already running) need. Imports grpc, not mlx or torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENV_ADDRESS = "MLXD_ADDRESS"
ENV_TOKEN = "MLXD_TOKEN"  # sent as "authorization: Bearer <token>" (required by TCP listeners)
ENV_TLS_CA = "MLXD_TLS_CA"  # PEM file: connect with TLS, trusting this CA (or the daemon's self-signed cert)
ENV_IDLE_TIMEOUT = "MLXD_IDLE_TIMEOUT"  # seconds an auto-started daemon waits unused before exiting
# Raw images and embeddings exceed gRPC's 4 MiB default; both sides use this limit.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/mlxd, else a private (0700) per-user directory under the temp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "mlxd" if base else Path(tempfile.gettempdir()) / f"mlxd-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def default_address() -> str:
    """MLXD_ADDRESS if set, else the per-user unix socket."""
    return os.environ.get(ENV_ADDRESS) or f"unix://{runtime_dir() / 'mlxd.sock'}"


def tls_ca() -> bytes | None:
    """The CA certificate from $MLXD_TLS_CA, if set."""
    path = os.environ.get(ENV_TLS_CA)
    return Path(path).read_bytes() if path else None


def open_channel(address: str, ca: bytes | None = None) -> grpc.Channel:
    """A channel to ``address``: TLS when a CA is given (or $MLXD_TLS_CA is set), else plaintext."""
    ca = ca or tls_ca()
    if ca is not None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def is_serving(address: str, timeout: float = 1.0) -> bool:
    """True when a daemon at ``address`` answers the standard health check with SERVING."""
    try:
        with open_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
