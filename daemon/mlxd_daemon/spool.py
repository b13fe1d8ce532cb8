"""Large request payloads (encoded images, tensors) from the front end to a worker through one tmpfs file per call,
not through the pipe: the pipe pickles, copies through the kernel in small writes and unpickles (a 19 MB array took
55 ms to cross on the 2-core VM), while one ``pwritev`` into ``/dev/shm`` and one ``preadv`` per payload out of it
took 23 ms. Where there is no ``/dev/shm`` (macOS), or it lacks the room, the payloads stay in the message.

The front end ``pack``s a call's arguments (each ``bytes`` or numpy array of at least ``MIN_BYTES`` becomes a
``Spooled`` handle into the file), the worker ``unpack``s them into private copies before running the call, and
the front end removes the file once the call has returned (``Spool.close``). A daemon killed in between leaves a
file named after its pid: ``remove_stale`` deletes those of processes that are gone.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIR = Path("/dev/shm")
MIN_BYTES = 64 << 10  # smaller payloads cost less in the message than a file's system calls
PREFIX = "mlxd-spool-"
_count = itertools.count()


@dataclass(frozen=True)
class Spooled:
    """Where one payload lies in the call's spool file; ``dtype`` None for ``bytes``."""

    path: str
    offset: int
    nbytes: int
    dtype: str | None = None
    shape: tuple[int, ...] = ()


class Spool:
    """The payloads of one call, written to one file (or none)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._parts: list[memoryview] = []
        self._size = 0

    def pack(self, value: Any) -> Any:
        """``value`` with its large payloads replaced by handles (dicts, lists and tuples walked), all written to
        the spool file; ``value`` itself when there is none, or no room for them."""
        planned = self._plan(value)
        if not self._parts or not self._write():
            return value
        return planned

    def _plan(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._plan(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._plan(v) for v in value)
        if isinstance(value, bytes) and len(value) >= MIN_BYTES:
            return self._add(memoryview(value), None, ())
        if isinstance(value, np.ndarray) and value.nbytes >= MIN_BYTES and value.dtype.kind in "biuf":
            array = np.ascontiguousarray(value)
            return self._add(array.data.cast("B"), array.dtype.str, array.shape)
        return value

    def _add(self, data: memoryview, dtype: str | None, shape: tuple[int, ...]) -> Spooled:
        if self.path is None:
            self.path = DIR / f"{PREFIX}{os.getpid()}-{next(_count)}"
        handle = Spooled(str(self.path), self._size, len(data), dtype, tuple(shape))
        self._parts.append(data)
        self._size += len(data)
        return handle

    def _write(self) -> bool:
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:  # no /dev/shm, or not writable
            self.path = None
            return False
        try:
            os.posix_fallocate(fd, 0, self._size)  # a full tmpfs says so here, not with SIGBUS later
            done = 0
            while done < self._size:  # pwritev may write less than asked
                done += os.pwritev(fd, _rest(self._parts, done), done)
        except OSError:
            os.close(fd)
            self.close()
            return False
        os.close(fd)
        return True

    def close(self) -> None:
        """Remove the file (once the worker has read it)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _rest(parts: list[memoryview], start: int) -> list[memoryview]:
    """The buffers of ``parts`` from byte ``start`` of their concatenation on."""
    out, offset = [], 0
    for p in parts:
        if offset + len(p) > start:
            out.append(p[max(0, start - offset) :])
        offset += len(p)
    return out


def unpack(value: Any) -> Any:
    """In the worker: ``value`` with every ``Spooled`` handle read back into a private ``bytes`` or array."""
    files: dict[str, int] = {}
    try:
        return _read(value, files)
    finally:
        for fd in files.values():
            os.close(fd)


def _read(value: Any, files: dict[str, int]) -> Any:
    if isinstance(value, dict):
        return {k: _read(v, files) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_read(v, files) for v in value)
    if not isinstance(value, Spooled):
        return value
    fd = files.get(value.path)
    if fd is None:
        fd = files[value.path] = os.open(value.path, os.O_RDONLY)
    if value.dtype is None:
        chunks, done = [], 0
        while done < value.nbytes:  # one read in practice
            chunk = os.pread(fd, value.nbytes - done, value.offset + done)
            if not chunk:
                raise EOFError(f"{value.path} ends before byte {value.offset + value.nbytes}")
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    array = np.empty(value.shape, np.dtype(value.dtype))
    data, done = array.data.cast("B"), 0
    while done < value.nbytes:
        n = os.preadv(fd, [data[done:]], value.offset + done)
        if n == 0:
            raise EOFError(f"{value.path} ends before byte {value.offset + value.nbytes}")
        done += n
    return array


def remove_stale() -> None:
    """Delete spool files left by daemons that are gone (killed between writing a file and removing it)."""
    if not DIR.is_dir():
        return
    for path in DIR.glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (and file): not ours to remove
        return True
    return True
