"""Destinations that cannot take the output: a full disk (a 4 MB tmpfs when root, else a tiny RLIMIT_FSIZE), a
read-only filesystem, a file where the model directory belongs. Each gets its code and reason, before writing
where the plan can tell; nothing is left behind; the daemon keeps serving."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import DaemonProcess
from helpers import worker_pid
from mlxd_client import Client
from mlxd_client.discovery import is_serving
from mlxd_client.errors import MlxdClientError
from safetensors.torch import save_file

SMALL_FS = 4 << 20


def can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (root only); skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def source(root: Path, mb: int = 6) -> Path:
    """A CLIP-typed checkpoint of one ``mb`` MB float32 tensor (the converter passes unknown names through)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "clip"}))
    save_file({"text_model.w": torch.randn(mb * 256, 1024)}, root / "model.safetensors")
    return root


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".mlxd-" in p.name) if folder.is_dir() else []


def assert_refused(client: Client, err: pytest.ExceptionInfo[MlxdClientError], code: str, reason: str) -> None:
    assert (err.value.code, err.value.reason) == (code, reason), err.value.message
    assert is_serving(client.address)


class TestFullDisk:
    def test_preflight_refuses_before_writing(self, client: Client, tmp_path: Path, tmpfs: Path) -> None:
        """6 MB into a 4 MB filesystem: RESOURCE_EXHAUSTED / NO_SPACE with both numbers, and nothing written."""
        src = source(tmp_path / "src")
        with pytest.raises(MlxdClientError) as err:
            client.convert(src, tmpfs / "out")
        assert_refused(client, err, "RESOURCE_EXHAUSTED", "NO_SPACE")
        needed, free = int(err.value.metadata["needed_bytes"]), int(err.value.metadata["free_bytes"])
        assert needed > 6 << 20 and free <= SMALL_FS
        assert f"{needed:,}" in err.value.message and f"{free:,}" in err.value.message
        assert list(tmpfs.iterdir()) == []
        [job] = [j for j in client.list_jobs() if j.dst == str(tmpfs / "out")]
        assert job.last_progress.stage != "convert"  # refused before the writing stage began

    def test_quantize_and_overwrite_preflight(self, client: Client, tmp_path: Path, tmpfs: Path) -> None:
        """Quantize checks the room too; with --overwrite the old output is kept and counts as used space."""
        mlx = tmp_path / "mlx"
        client.convert(source(tmp_path / "src", mb=2), mlx)
        client.quantize(mlx, tmpfs / "q", bits=8, group_size=32)  # 2 MB (+ the reserve): fits once
        before = sorted(p.name for p in (tmpfs / "q").iterdir())
        with pytest.raises(MlxdClientError) as err:
            client.quantize(mlx, tmpfs / "q2", bits=8, group_size=32)
        assert_refused(client, err, "RESOURCE_EXHAUSTED", "NO_SPACE")
        with pytest.raises(MlxdClientError) as err:
            client.convert(source(tmp_path / "src2", mb=3), tmpfs / "q", overwrite=True)
        assert_refused(client, err, "RESOURCE_EXHAUSTED", "NO_SPACE")
        assert "old output" in err.value.message
        assert sorted(p.name for p in (tmpfs / "q").iterdir()) == before  # the old output is intact
        assert leftovers(tmpfs) == [] and not (tmpfs / "q2").exists()

    def test_file_size_limit_mid_write(self, client: Client, daemon: DaemonProcess, tmp_path: Path) -> None:
        """The jobs worker under RLIMIT_FSIZE 1 MB (the fallback that needs no root): the write that hits the limit
        is RESOURCE_EXHAUSTED / FILE_TOO_LARGE, not a silently truncated shard; no output, no temp dir."""
        client.convert(source(tmp_path / "warm", mb=1), tmp_path / "warm-out")  # the jobs worker is running
        pid = worker_pid(daemon, "jobs")
        old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (min(1 << 20, old[1]) if old[1] >= 0 else 1 << 20, old[1]))
        try:
            with pytest.raises(MlxdClientError) as err:
                client.convert(source(tmp_path / "src", mb=2), tmp_path / "out")
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
        assert_refused(client, err, "RESOURCE_EXHAUSTED", "FILE_TOO_LARGE")
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


class TestUnwritableDestination:
    def test_read_only_filesystem(self, client: Client, tmp_path: Path, tmpfs: Path) -> None:
        """A read-only mount: FAILED_PRECONDITION / READ_ONLY_DESTINATION before any weight is read."""
        src = source(tmp_path / "src", mb=1)
        (tmpfs / "models").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        for dst in (tmpfs / "out", tmpfs / "models" / "out", tmpfs / "new" / "deeper" / "out"):
            with pytest.raises(MlxdClientError) as err:
                client.convert(src, dst)
            assert_refused(client, err, "FAILED_PRECONDITION", "READ_ONLY_DESTINATION")
        assert sorted(p.name for p in tmpfs.iterdir()) == ["models"]

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
    def test_folder_without_write_permission(self, client: Client, tmp_path: Path) -> None:
        """A folder the daemon's user may not write: PERMISSION_DENIED / DESTINATION_NOT_WRITABLE."""
        src = source(tmp_path / "src", mb=1)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(MlxdClientError) as err:
            client.convert(src, locked / "out")
        assert_refused(client, err, "PERMISSION_DENIED", "DESTINATION_NOT_WRITABLE")

    def test_destination_is_a_file(self, client: Client, tmp_path: Path) -> None:
        """A file as the destination (even with --overwrite), or as one of its folders: INVALID_ARGUMENT /
        DESTINATION_NOT_DIRECTORY, and the file is left as it was."""
        src = source(tmp_path / "src", mb=1)
        file = tmp_path / "notes.txt"
        file.write_text("keep me")
        for dst, overwrite in ((file, True), (file / "out", False), (file / "a" / "b", True)):
            with pytest.raises(MlxdClientError) as err:
                client.convert(src, dst, overwrite=overwrite)
            assert_refused(client, err, "INVALID_ARGUMENT", "DESTINATION_NOT_DIRECTORY")
        assert file.read_text() == "keep me"
        assert leftovers(tmp_path) == []
