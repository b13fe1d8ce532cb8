"""Where every job that writes a model directory puts its output: checks on the destination, a free-space
preflight, a temp dir beside ``dst``, an fsync'd atomic publish, and OS errors turned into domain errors.

Used by ``convert`` (convert, quantize, dequantize) and the export path. Order: ``check_destination`` before any
weight is read; ``staged(dst, needed, overwrite)`` once the plan knows how many bytes it will write::

    with staged(dst, needed_bytes, overwrite) as tmp:
        ...write into tmp...            # published as dst when the block ends; removed on any error

Filesystem errors while writing: ENOSPC → RESOURCE_EXHAUSTED / NO_SPACE, EDQUOT → RESOURCE_EXHAUSTED /
QUOTA_EXCEEDED, EFBIG → RESOURCE_EXHAUSTED / FILE_TOO_LARGE, EROFS → FAILED_PRECONDITION / READ_ONLY_DESTINATION,
EACCES/EPERM → PERMISSION_DENIED / DESTINATION_NOT_WRITABLE.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from mlxd_daemon.errors import (
    FailedPrecondition,
    InvalidArgument,
    MlxdError,
    PermissionDenied,
    ResourceExhausted,
)
from mlxd_daemon.jobs import OLD_MARKER, TMP_MARKER

# Beyond the weights: config.json, the manifest, index and safetensors headers, filesystem block rounding.
RESERVE_BYTES = 1 << 20


def check_destination(src: Path | None, dst: Path, overwrite: bool) -> None:
    """Refuse a destination before any work: the source itself, an existing output (without ``overwrite``), a
    file where a directory belongs, a folder that cannot be written or a read-only filesystem."""
    if src is not None and (src.resolve() == dst.resolve() or dst.resolve() in src.resolve().parents):
        msg = f"output {dst} is or contains the source: choose another path"
        raise InvalidArgument(msg, reason="OUTPUT_IS_SOURCE", path=dst)
    if dst.exists() and not overwrite:
        msg = f"output {dst} already exists: pass --overwrite or choose another path"
        raise FailedPrecondition(msg, reason="OUTPUT_EXISTS", path=dst)
    if dst.exists() and not dst.is_dir():
        msg = f"output {dst} is a file, not a model directory: choose another path (it was left as it is)"
        raise InvalidArgument(msg, reason="DESTINATION_NOT_DIRECTORY", path=dst)
    parent = _existing_ancestor(dst.parent)
    if not parent.is_dir():
        msg = f"cannot create {dst}: {parent} is a file, not a directory"
        raise InvalidArgument(msg, reason="DESTINATION_NOT_DIRECTORY", path=dst, file=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only(parent) else errno.EACCES
        err = os_error(OSError(code, os.strerror(code), str(parent)), dst)
        assert err is not None  # both codes are mapped
        raise err


def needed_bytes(weights: int, extra_files: list[Path] | tuple[Path, ...] = ()) -> int:
    """Bytes an output will take: its weights, the files copied beside them, and ``RESERVE_BYTES``."""
    return weights + sum(f.stat().st_size for f in extra_files) + RESERVE_BYTES


def check_free_space(dst: Path, needed: int, overwrite: bool) -> None:
    """RESOURCE_EXHAUSTED / NO_SPACE (with both numbers) when the destination's filesystem cannot hold ``needed``
    bytes. With ``overwrite`` the old output stays until the new one is complete, so it frees nothing."""
    parent = _existing_ancestor(dst.parent)
    st = os.statvfs(parent)
    free = st.f_bavail * st.f_frsize
    if needed <= free:
        return
    old = " (the old output is removed only after the new one is complete)" if overwrite and dst.exists() else ""
    msg = (
        f"not enough space for {dst}: the output needs {needed:,} bytes, the filesystem of {parent} has {free:,} "
        f"free{old}; free some space or choose another destination"
    )
    raise ResourceExhausted(msg, reason="NO_SPACE", path=dst, needed_bytes=needed, free_bytes=free)


@contextlib.contextmanager
def staged(dst: Path, needed: int, overwrite: bool) -> Iterator[Path]:
    """Preflight, then a fresh temp dir beside ``dst`` to write into; published as ``dst`` (fsync'd, atomic) when
    the block ends, removed on any error (an OSError becomes its domain error)."""
    check_destination(None, dst, overwrite)
    check_free_space(dst, needed, overwrite)
    tmp = dst.parent / f".{dst.name}{TMP_MARKER}{secrets.token_hex(4)}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        sync_tree(tmp)
        publish(tmp, dst, overwrite)
    except BaseException as e:
        mapped = os_error(_as_os_error(e), dst, needed)  # free bytes as they were at the failure
        shutil.rmtree(tmp, ignore_errors=True)
        if mapped is not None:
            raise mapped from e
        raise


def os_error(e: OSError | None, dst: Path, needed: int = 0) -> MlxdError | None:
    """The domain error for a filesystem error met while writing ``dst``; None for errors of other causes."""
    if e is None:
        return None
    where = f" (writing {dst}{f', {needed:,} bytes planned' if needed else ''})"
    free = _free_bytes(dst)
    if e.errno == errno.ENOSPC:
        msg = f"the filesystem ran out of space{where}: free some space or choose another destination"
        return ResourceExhausted(msg, reason="NO_SPACE", path=dst, needed_bytes=needed, free_bytes=free)
    if e.errno == errno.EDQUOT:
        msg = f"the disk quota is exhausted{where}: free some space or choose another destination"
        return ResourceExhausted(msg, reason="QUOTA_EXCEEDED", path=dst, needed_bytes=needed, free_bytes=free)
    if e.errno == errno.EFBIG:
        msg = f"a file grew past the size this process may write (RLIMIT_FSIZE or the filesystem's limit){where}"
        return ResourceExhausted(msg, reason="FILE_TOO_LARGE", path=dst, needed_bytes=needed)
    if e.errno == errno.EROFS:
        msg = f"the destination's filesystem is read-only{where}: choose a writable destination"
        return FailedPrecondition(msg, reason="READ_ONLY_DESTINATION", path=dst)
    if e.errno in (errno.EACCES, errno.EPERM) and _under(e.filename, dst):
        msg = f"the daemon may not write there: {e.strerror}: {e.filename}{where}; choose a writable destination"
        return PermissionDenied(msg, reason="DESTINATION_NOT_WRITABLE", path=dst)
    return None


def sync_tree(path: Path) -> None:
    """fsync every file and folder (depth first), so the rename never publishes files that are not on disk yet."""
    for f in path.iterdir():
        if f.is_dir():
            sync_tree(f)
            continue
        _fsync(f)
    _fsync(path)


def publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished output into place; an old ``dst`` is removed only once the new one is there."""
    if not dst.exists() and not dst.is_symlink():
        tmp.rename(dst)
        return
    if not overwrite:  # someone created dst while we were converting
        msg = f"output {dst} already exists: pass --overwrite or choose another path"
        raise FailedPrecondition(msg, reason="OUTPUT_EXISTS", path=dst)
    old = dst.parent / f".{dst.name}{OLD_MARKER}{secrets.token_hex(4)}"
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _as_os_error(e: BaseException) -> OSError | None:
    """``e`` as an OSError: itself, or the ``(os error N)`` that safetensors' Rust writer puts in its message."""
    if isinstance(e, OSError):
        return e
    found = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(found.group(1)), str(e)) if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``dst``'s parents are created when missing)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _free_bytes(dst: Path) -> int:
    try:
        st = os.statvfs(_existing_ancestor(dst.parent))
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _under(filename: object, dst: Path) -> bool:
    """Writes through a file descriptor carry no file name; named ones must be at the destination."""
    if filename is None:
        return True
    try:
        return Path(os.fsdecode(filename)).absolute().is_relative_to(dst.parent.absolute())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
