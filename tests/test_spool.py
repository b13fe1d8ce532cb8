"""Large request payloads cross to a worker through a /dev/shm file (``spool``): they come back equal and of the same
type, small ones stay in the message, the file is gone after the call, a missing or full tmpfs falls back to the
message, and files of killed daemons are removed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlxd_daemon import spool

pytestmark = pytest.mark.skipif(not spool.DIR.is_dir(), reason="no /dev/shm here: payloads stay in the message")


def payload() -> dict:
    rng = np.random.default_rng(0)
    return {
        "model": "/m",
        "inputs": {
            "pixels": rng.integers(0, 255, (3, 100, 100, 3), dtype=np.uint8),
            "pixel_values": rng.normal(size=(4, 3, 64, 64)).astype(np.float16),
            "input_ids": np.arange(12).reshape(2, 6),  # small: stays inline
            "strided": rng.normal(size=(200, 200))[:, ::2],
        },
        "requests": [{"texts": ["a"], "images": [os.urandom(200_000), b"tiny"]}],
    }


def equal(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def test_round_trip_and_cleanup() -> None:
    args = payload()
    s = spool.Spool()
    packed = s.pack(args)
    assert s.path is not None and s.path.exists()
    handles = [packed["inputs"][k] for k in ("pixels", "pixel_values", "strided")]
    assert all(isinstance(h, spool.Spooled) for h in handles)
    assert isinstance(packed["inputs"]["input_ids"], np.ndarray)  # under MIN_BYTES
    assert isinstance(packed["requests"][0]["images"][0], spool.Spooled)
    assert packed["requests"][0]["images"][1] == b"tiny"
    assert equal(spool.unpack(packed), args)
    s.close()
    assert not s.path and not list(spool.DIR.glob(f"{spool.PREFIX}{os.getpid()}-*"))


def test_nothing_large_means_no_file() -> None:
    s = spool.Spool()
    args = {"texts": ["a"], "ids": np.zeros(4)}
    assert s.pack(args) is args and s.path is None


def test_no_room_falls_back_to_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    args = payload()
    s = spool.Spool()
    assert s.pack(args) is args
    assert s.path is None and not list(spool.DIR.glob(f"{spool.PREFIX}{os.getpid()}-*"))
    monkeypatch.setattr(spool, "DIR", Path("/nonexistent-mlxd-spool-dir"))
    assert spool.Spool().pack(args) is args


def test_remove_stale_spares_live_daemons() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = spool.DIR / f"{spool.PREFIX}{int(gone.stdout)}-0"
    live = spool.DIR / f"{spool.PREFIX}{os.getpid()}-999999"
    for f in (dead, live):
        f.write_bytes(b"x")
    try:
        spool.remove_stale()
        assert not dead.exists() and live.exists()
    finally:
        live.unlink(missing_ok=True)
        dead.unlink(missing_ok=True)
