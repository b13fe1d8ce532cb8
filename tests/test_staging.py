"""staging: the destination checks, the free-space preflight and the OS-error mapping every writing job shares."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from mlxd_daemon.errors import MlxdError
from mlxd_daemon.staging import check_free_space, os_error, staged


class TestOsError:
    @pytest.mark.parametrize(
        ("code", "status", "reason"),
        [
            (errno.ENOSPC, "RESOURCE_EXHAUSTED", "NO_SPACE"),
            (errno.EDQUOT, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
            (errno.EFBIG, "RESOURCE_EXHAUSTED", "FILE_TOO_LARGE"),
            (errno.EROFS, "FAILED_PRECONDITION", "READ_ONLY_DESTINATION"),
            (errno.EACCES, "PERMISSION_DENIED", "DESTINATION_NOT_WRITABLE"),
        ],
    )
    def test_each_errno_has_its_reason(self, tmp_path: Path, code: int, status: str, reason: str) -> None:
        """A write error at the destination becomes its specific status and reason, naming the destination."""
        err = os_error(OSError(code, os.strerror(code)), tmp_path / "out", needed=123)
        assert err is not None and (err.code, err.reason) == (status, reason)
        assert err.metadata["path"] == str(tmp_path / "out")

    def test_permission_error_elsewhere_is_not_the_destinations(self, tmp_path: Path) -> None:
        """EACCES on a file outside the destination's folder (e.g. reading the source) is not mapped."""
        assert os_error(OSError(errno.EACCES, "denied", "/etc/shadow"), tmp_path / "out") is None

    def test_other_errors_are_not_mapped(self, tmp_path: Path) -> None:
        """Errors that say nothing about the destination's room or rights stay as they are."""
        assert os_error(OSError(errno.EIO, "I/O error"), tmp_path / "out") is None


class TestPreflight:
    def test_not_enough_space_names_both_numbers(self, tmp_path: Path) -> None:
        """More bytes than the filesystem has free: NO_SPACE, with needed and free bytes in message and metadata."""
        with pytest.raises(MlxdError) as err:
            check_free_space(tmp_path / "a" / "b", 1 << 62, overwrite=False)
        assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "NO_SPACE")
        assert err.value.metadata["needed_bytes"] == str(1 << 62)
        assert f"{1 << 62:,}" in err.value.message and f"{int(err.value.metadata['free_bytes']):,}" in err.value.message

    def test_staged_publishes_and_cleans_up(self, tmp_path: Path) -> None:
        """The block's output appears as dst; on an error inside the block the temp dir is gone, dst untouched."""
        with staged(tmp_path / "ok", 10, overwrite=False) as tmp:
            (tmp / "f").write_text("x")
        assert (tmp_path / "ok" / "f").read_text() == "x"
        with pytest.raises(RuntimeError), staged(tmp_path / "bad", 10, overwrite=False) as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]

    @pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
    def test_disk_filling_mid_write(self, tmp_path: Path) -> None:
        """When the plan underestimates and the disk fills while writing: NO_SPACE, and the temp dir is gone."""
        mnt = tmp_path / "small"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        try:
            with pytest.raises(MlxdError) as err, staged(mnt / "out", 0, overwrite=False) as tmp:
                (tmp / "big").write_bytes(b"\0" * (2 << 20))
            assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "NO_SPACE")
            assert list(mnt.iterdir()) == []
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
