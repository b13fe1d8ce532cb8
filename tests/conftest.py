"""Shared fixtures: a real daemon process on a temporary unix socket, and tiny Hugging Face checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlxd_client import Client
from mlxd_client.discovery import is_serving
from mlxd_daemon import blas

# In-process tests (convert, calibrate, the served forwards) run MLX here as the workers do: on the optimized
# BLAS, loaded before anything imports mlx.core (the wheel's reference BLAS is ~30x slower).
blas.preload()


class DaemonProcess:
    """An ``mlxd`` started as a subprocess; ``log`` collects its stderr."""

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.socket = root / "mlxd.sock"
        self.address = f"unix://{self.socket}"
        self.log = root / "mlxd.log"
        # Tests never reach the Hub: a hub id resolves from the cache or fails fast (MODEL_NOT_CACHED).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}), "MLXD_ADDRESS": self.address}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlxd_daemon",
                    "--address",
                    self.address,
                    "--log-format",
                    "json",
                    *extra,
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + 60
        while not is_serving(self.address, timeout=0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlxd did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def client(self, **kwargs: object) -> Client:
        return Client(self.address, autostart=False, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon shared by the session's end-to-end tests (worker start-up costs seconds)."""
    # A short path: unix socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="mlxd-test-") as root:
        d = DaemonProcess(Path(root))
        yield d
        d.stop()


BUG_CODES = ("INTERNAL", "UNKNOWN")  # a bug: every bad input has its own code and reason


def bug_responses(log: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The daemon's RPC log lines from byte ``start`` on whose status is INTERNAL or UNKNOWN, and the offset read to."""
    with open(log, "rb") as f:
        f.seek(start)
        data = f.read()
    data = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
    bad = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a worker's plain stderr line
        if entry.get("event") == "rpc" and entry.get("code") in BUG_CODES:
            bad.append(entry)
    return bad, start + len(data)


_log_cursor: dict[str, int] = {}


@pytest.fixture(autouse=True)
def no_internal_responses(request: pytest.FixtureRequest) -> Iterator[None]:
    """The sweep guard: after each test that used the shared daemon, none of its RPCs (nor any logged late by the
    test before) answered INTERNAL or UNKNOWN."""
    if "daemon" not in request.fixturenames:
        yield
        return
    daemon = request.getfixturevalue("daemon")
    yield
    time.sleep(0.05)  # the interceptor logs an RPC just after its response went out
    log = str(daemon.log)
    bad, _log_cursor[log] = bug_responses(daemon.log, _log_cursor.get(log, 0))
    assert not bad, f"responses that should have had a specific code and reason: {bad}"


@pytest.fixture()
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight HF CLIP checkpoint (float32 safetensors) with a real BPE tokenizer."""
    from mlxd_daemon.fixtures import make_clip

    return make_clip(tmp_path_factory.mktemp("hf") / "tiny-clip", size="tiny", seed=0)


@pytest.fixture(scope="session")
def golden_pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Deterministic test images saved as PNG files."""
    from mlxd_daemon.fixtures import golden_images

    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(golden_images(3, size=40)):
        path = root / f"image{i}.png"
        image.save(path)
        paths.append(path)
    return paths
