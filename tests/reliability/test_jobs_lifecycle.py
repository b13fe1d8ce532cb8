"""Jobs outlive their clients and their daemon: re-attach, journal across a kill -9, deadlines, a bounded queue."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import DaemonProcess
from helpers import slow_checkpoint
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client.errors import CancelledError, MlxdClientError, ResourceExhaustedError


def first_report(events: object) -> pb.Progress:
    for event in events:  # type: ignore[attr-defined]
        if isinstance(event, pb.Progress) and event.kind == pb.Progress.KIND_REPORT:
            return event
    raise AssertionError("no progress report")


class TestReattach:
    def test_dropped_stream_keeps_job_and_watch_resumes(self, daemon: DaemonProcess, tmp_path: Path) -> None:
        """Dropping the Convert stream does not cancel the job; WatchJob(from_seq) resumes and gets the result."""
        src = slow_checkpoint(tmp_path / "src", tensors=24)
        dst = tmp_path / "out"
        with daemon.client() as c:
            events = c.convert_events(src, dst, dtype="float16")
            report = first_report(events)
            events.close()  # the client goes away mid-job
        with daemon.client() as c:
            replay = list(c.watch_job(report.job_id, from_seq=report.seq + 1))
            progress = [e for e in replay if isinstance(e, pb.Progress)]
            assert progress and progress[0].seq == report.seq + 1
            assert [p.seq for p in progress] == list(range(report.seq + 1, report.seq + 1 + len(progress)))
            assert isinstance(replay[-1], pb.ConvertResult) and replay[-1].job_id == report.job_id
            job = c.get_job(report.job_id)
            assert job.job.state == pb.JOB_STATE_SUCCEEDED
            assert job.convert_result.num_tensors == 24
            assert report.job_id in [j.job_id for j in c.list_jobs()]
        assert (dst / "model.safetensors").exists()

    def test_deadline_cancels_the_job(self, daemon: DaemonProcess, tmp_path: Path) -> None:
        """A client deadline that expires cancels the server's work: no output, job CANCELLED."""
        src = slow_checkpoint(tmp_path / "src")
        dst = tmp_path / "out"
        with daemon.client(timeout=0.2) as c, pytest.raises(MlxdClientError) as err:
            c.convert(src, dst, dtype="float16")
        assert err.value.code == "DEADLINE_EXCEEDED"
        with daemon.client() as c:
            deadline = time.monotonic() + 20
            while True:
                jobs = [j for j in c.list_jobs() if j.dst == str(dst)]
                if (jobs and jobs[0].state != pb.JOB_STATE_RUNNING) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert jobs[0].state == pb.JOB_STATE_CANCELLED
        assert not dst.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["src"]


class TestQueue:
    def test_full_queue_is_resource_exhausted(self, tmp_path: Path) -> None:
        """With one job running and the queue (size 1) full, the next job gets RESOURCE_EXHAUSTED with a retry hint."""
        src = slow_checkpoint(tmp_path / "src")
        with tempfile.TemporaryDirectory(prefix="mlxd-q-") as root:
            d = DaemonProcess(Path(root), "--max-queued-jobs", "1")
            try:
                with d.client() as c:
                    running = c.convert_events(src, tmp_path / "a", q_bits=4)  # quantizing: slow enough to queue behind
                    report = first_report(running)
                    queued_events: list[object] = []
                    queued = threading.Thread(
                        target=lambda: queued_events.extend(_drain(c.convert_events(src, tmp_path / "b")))
                    )
                    queued.start()
                    deadline = time.monotonic() + 10
                    while not any(j.state == pb.JOB_STATE_QUEUED for j in c.list_jobs()):
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                    with pytest.raises(ResourceExhaustedError) as err:
                        c.convert(src, tmp_path / "c")
                    assert err.value.reason == "QUEUE_FULL" and "retry_after_s" in err.value.metadata
                    for job in c.list_jobs():
                        c.cancel_job(job.job_id)
                    queued.join(30)
                    running.close()
                    assert c.get_job(report.job_id).job.state == pb.JOB_STATE_CANCELLED
            finally:
                d.stop()


def _drain(events: object) -> list[object]:
    try:
        return list(events)  # type: ignore[call-overload]
    except CancelledError as e:
        return [e]


class TestRestart:
    def test_kill_9_mid_convert_then_restart(self, tmp_path: Path) -> None:
        """kill -9 during a convert: after restart the job is FAILED (DAEMON_RESTART), temp output gone, DST intact."""
        src = slow_checkpoint(tmp_path / "src")
        dst = tmp_path / "out"
        dst.mkdir()
        (dst / "old.txt").write_text("previous output")
        with tempfile.TemporaryDirectory(prefix="mlxd-k9-") as root:
            d = DaemonProcess(Path(root))
            with d.client() as c:
                events = c.convert_events(src, dst, dtype="float16", overwrite=True)
                report = first_report(events)
                temps = [p for p in tmp_path.iterdir() if ".mlxd-tmp-" in p.name]
                assert temps  # the converter writes beside dst
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait(10)
                for pid in _children_of(d.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                with pytest.raises(MlxdClientError):
                    list(events)
            d2 = DaemonProcess(Path(root))  # the stale socket and discovery file are replaced
            try:
                with d2.client() as c:
                    job = c.get_job(report.job_id).job
                    assert job.state == pb.JOB_STATE_FAILED
                    assert job.error_reason == "DAEMON_RESTART"
                    info = json.loads((Path(root) / "mlxd.sock.json").read_text())
                    assert info["pid"] == d2.proc.pid
            finally:
                d2.stop()
        assert not [p for p in tmp_path.iterdir() if ".mlxd-" in p.name]
        assert (dst / "old.txt").read_text() == "previous output"


def _children_of(pid: int) -> list[int]:
    """Worker processes a killed daemon left behind (they would otherwise linger)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if proc.name.isdigit() and int(stat[1]) == pid:
                out.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_sigterm_removes_discovery_file() -> None:
    """On SIGTERM the daemon drains and exits with its 0600 discovery file and socket removed."""
    with tempfile.TemporaryDirectory(prefix="mlxd-dr-") as root:
        d = DaemonProcess(Path(root))
        discovery = Path(root) / "mlxd.sock.json"
        assert discovery.exists() and oct(discovery.stat().st_mode & 0o777) == "0o600"
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        assert not discovery.exists()
        assert not d.socket.exists()


def test_idle_timeout_stops_an_unused_daemon() -> None:
    """A daemon started with --idle-timeout exits on its own (cleanly) once nobody has called it for that long."""
    with tempfile.TemporaryDirectory(prefix="mlxd-idle-") as root:
        d = DaemonProcess(Path(root), "--idle-timeout", "2")
        assert d.proc.wait(30) == 0
        assert not d.socket.exists()
        assert '"idle_timeout"' in d.log.read_text()
