"""Where the per-user daemon lives, and starting it when none answers (language-server style)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mlxd_common.endpoint import (  # re-exported: clients and tests use them from here
    CHANNEL_OPTIONS,
    ENV_ADDRESS,
    ENV_IDLE_TIMEOUT,
    ENV_TLS_CA,
    ENV_TOKEN,
    MAX_MESSAGE_BYTES,
    default_address,
    is_serving,
    open_channel,
    runtime_dir,
    tls_ca,
)

__all__ = [
    "CHANNEL_OPTIONS", "ENV_ADDRESS", "ENV_IDLE_TIMEOUT", "ENV_TLS_CA", "ENV_TOKEN", "MAX_MESSAGE_BYTES",
    "call_metadata", "default_address", "ensure_daemon", "is_serving", "open_channel", "runtime_dir",
    "start_daemon", "tls_ca",
]  # fmt: skip


def call_metadata() -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the token when MLXD_TOKEN is set."""
    token = os.environ.get(ENV_TOKEN)
    return (("authorization", f"Bearer {token}"),) if token else ()


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
