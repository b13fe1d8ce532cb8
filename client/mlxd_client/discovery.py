"""Where the per-user daemon lives, and starting it when none answers (language-server style)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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


def call_metadata() -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the token when MLXD_TOKEN is set."""
    token = os.environ.get(ENV_TOKEN)
    return (("authorization", f"Bearer {token}"),) if token else ()


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


def start_daemon(
    address: str, timeout: float = 60.0, log_path: Path | None = None, extra_args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start ``mlxd`` (with ``extra_args``) in the background at ``address`` and wait until it serves."""
    log_path = log_path or runtime_dir() / "mlxd.log"
    with open(log_path, "ab") as log:
        idle = os.environ.get(ENV_IDLE_TIMEOUT, "3600")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxd_daemon", "--address", address, "--idle-timeout", idle, *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_serving(address, timeout=0.5):
            return proc
        if proc.poll() is not None:
            msg = f"mlxd exited with code {proc.returncode} while starting; see {log_path}"
            raise RuntimeError(msg)
        time.sleep(0.1)
    proc.terminate()
    msg = f"mlxd did not start serving at {address} within {timeout:.0f}s; see {log_path}"
    raise TimeoutError(msg)


def ensure_daemon(address: str, extra_args: Sequence[str] = ()) -> bool:
    """Make sure a daemon serves at ``address``; returns True if one had to be started (with ``extra_args``)."""
    if is_serving(address):
        return False
    start_daemon(address, extra_args=extra_args)
    return True
