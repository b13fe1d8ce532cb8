"""Block I/O for the writer: source tensors read by position in row blocks into reused buffers, shard files
written at the offsets their header planned (by several threads at once), and the disk's writeback started as
each block lands, so the final fsync has little left to do.

Plain positional reads, never a mapping: mapped pages would count as this process's memory until unmapped, so a
large shard would look resident (mlx-lm#876).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import queue
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.shards import Shard

PAGE = 4096
FLUSH_BYTES = 8 << 20  # writeback is started in ranges of at least this much
SYNC_FILE_RANGE_WRITE = 2  # from linux/fs.h: start writeback of the range's dirty pages, do not wait for it
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.uint32: "U32", torch.uint16: "U16", torch.uint64: "U64", torch.bool: "BOOL"}  # fmt: skip


def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_SYNC_RANGE = _sync_file_range()


class SourceFiles:
    """One read-only descriptor per source file, opened on first use (sequential read-ahead hinted), shared by
    every reading thread: ``os.preadv`` needs no shared file position."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read_into(self, path: Path, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``path`` at ``offset``; a file ending first is InvalidArgument BAD_CHECKPOINT."""
        fd = self._fd(path)
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                msg = f"{path.name} ends at byte {offset + done}, inside a tensor: the file is truncated"
                raise InvalidArgument(msg, reason="BAD_CHECKPOINT", path=path)
            done += n

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead: blocks come in order
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class Buffers(threading.local):
    """Per-thread reusable byte buffers: a fresh buffer per block would page-fault its way in every time
    (filling a fresh 32 MB array cost 3-5x filling one already touched, measured on a 2-core VM; mapping the
    source instead of reading it moved the same cost into first touches)."""

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}

    def get(self, kind: str, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined) owned by this thread until its next call for ``kind``."""
        buf = self.store.get(kind)
        if buf is None or buf.numel() < nbytes:
            self.store.pop(kind, None)
            buf = self.store[kind] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


class Flusher:
    """Starts the disk's writeback of each written range on its own thread (``sync_file_range``), so the disk
    works while blocks are still being converted, without a converting thread ever waiting for it. A no-op
    where the call does not exist (not Linux)."""

    def __init__(self) -> None:
        self._ranges: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="convert-flush", daemon=True)
        if _SYNC_RANGE is not None:
            self._thread.start()

    def add(self, fd: int, offset: int, nbytes: int) -> None:
        if _SYNC_RANGE is not None:
            self._ranges.put((fd, offset, nbytes))

    def _run(self) -> None:
        while (item := self._ranges.get()) is not None:
            _SYNC_RANGE(*item, SYNC_FILE_RANGE_WRITE)  # an error here is the final fsync's to report

    def close(self) -> None:
        """Wait until every range was handed to the disk (call before closing the files)."""
        if self._thread.is_alive():
            self._ranges.put(None)
            self._thread.join()


class ShardFile:
    """A safetensors file whose header is computed from the plan (names, dtypes, shapes) before any data, so each
    block of each tensor can be written at its final offset, from any thread, in any order; the shard is never
    gathered in memory (mlx-lm#876)."""

    def __init__(self, path: Path, shard: Shard, layouts: dict[str, str], flusher: Flusher | None = None) -> None:
        expected = [o for u in shard.units for o in u.outputs]
        names = {o.name for o in expected}
        metadata = {"format": "mlx", "mlxd.layout": json.dumps({k: v for k, v in layouts.items() if k in names},
                                                               sort_keys=True)}  # fmt: skip
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        for o in expected:
            header[o.name] = {"dtype": ST_DTYPES[o.dtype], "shape": list(o.shape),
                              "data_offsets": [offset, offset + o.nbytes]}  # fmt: skip
            self.slots[o.name] = (offset, o.dtype, o.shape)
            offset += o.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path, self.complete = path, True
        self.missing = {o.name: o.nbytes for o in expected}  # bytes each tensor still lacks
        self._lock = threading.Lock()
        self._flusher = flusher
        # Writeback is started only for whole pages below the contiguous written prefix: a page under writeback
        # that is written again makes that write wait for the disk (stable pages).
        self._prefix = self._flushed = 0
        self._pending: dict[int, int] = {}  # written ranges beyond the prefix, start -> end
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        head = struct.pack("<Q", len(blob)) + blob
        self.data_start = len(head)
        self._pwrite(memoryview(head), 0)

    def write_rows(self, name: str, row0: int, part: torch.Tensor) -> None:
        """Write rows ``row0:row0 + len(part)`` (along the first dimension) of the planned tensor ``name``."""
        offset, dtype, shape = self.slots[name]
        rows = part.shape[0] if part.ndim else 1
        if (part.dtype, tuple(part.shape[1:])) != (dtype, shape[1:]) or row0 + rows > (shape[0] if shape else 1):
            msg = f"writer expected {name} {dtype} {shape}, got rows {row0}:{row0 + rows} of {part.dtype} "
            raise RuntimeError(msg + str(tuple(part.shape)))
        data = part.contiguous().reshape(-1).view(torch.uint8).numpy().data
        start = self.data_start + offset + row0 * (len(data) // max(rows, 1))
        self._pwrite(data, start)
        with self._lock:
            self.missing[name] -= len(data)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        # A write may stop short (a file size limit, a filling disk): write the rest, so the shortage surfaces
        # as its OSError (EFBIG, ENOSPC) instead of a silently truncated shard.
        start = offset
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n
        if offset == start:
            return
        with self._lock:
            self._pending[start] = offset
            while self._prefix in self._pending:
                self._prefix = self._pending.pop(self._prefix)
            ready = self._prefix - self._prefix % PAGE
            if ready - self._flushed < FLUSH_BYTES:
                return
            begin, self._flushed = self._flushed, ready
        if self._flusher is not None:  # the disk starts now, not at the final fsync
            self._flusher.add(self.fd, begin, ready - begin)

    def close(self) -> None:
        """Close the file; once ``complete``, every planned byte must have been written."""
        os.close(self.fd)
        short = [n for n, left in self.missing.items() if left]
        if self.complete and short:
            msg = f"{self.path.name}: {len(short)} planned tensor(s) not fully written, e.g. {short[0]}"
            raise RuntimeError(msg)
