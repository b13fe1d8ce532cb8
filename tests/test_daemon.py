"""The daemon as a process: socket, handshake, health, reflection, concurrency, cancellation, crashes, stop."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import DaemonProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import slow_checkpoint, worker_pid
from mlxd.v1 import mlxd_pb2 as pb
from mlxd.v1 import mlxd_pb2_grpc as pb_grpc
from mlxd_client import Client
from mlxd_client.discovery import is_serving
from mlxd_client.errors import CancelledError, FailedPreconditionError, UnavailableError
from mlxd_daemon.quantize import RECIPES


class TestSocketAndHandshake:
    def test_socket_is_private(self, daemon: DaemonProcess) -> None:
        """The unix socket is created with mode 0600."""
        assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600

    def test_initialize_reports_versions_and_capabilities(self, client: Client) -> None:
        """Initialize returns the protocol and daemon versions and what the daemon can do."""
        info = client.initialize()
        assert info.protocol_version == 1
        assert info.daemon_version
        assert "clip" in info.capabilities.architectures
        assert pb.DTYPE_BFLOAT16 in info.capabilities.dtypes
        assert 4 in info.capabilities.quant_bits
        assert list(RECIPES) == list(info.capabilities.quant_recipes)  # the CLI's --q-recipe names come from here

    def test_protocol_mismatch_is_failed_precondition(self, daemon: DaemonProcess) -> None:
        """A client speaking another protocol version gets FAILED_PRECONDITION / PROTOCOL_MISMATCH."""
        with grpc.insecure_channel(daemon.address) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.MlxdStub(channel).Initialize(pb.InitializeRequest(protocol_version=99))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "PROTOCOL_MISMATCH" in str(err.value.trailing_metadata())

    def test_health_and_reflection(self, daemon: DaemonProcess) -> None:
        """The standard health service says SERVING and reflection lists the mlxd service."""
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        with grpc.insecure_channel(daemon.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="mlxd.v1.Mlxd"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"mlxd.v1.Mlxd", "grpc.health.v1.Health"} <= names

    def test_relative_path_is_invalid_argument(self, daemon: DaemonProcess) -> None:
        """Raw stub calls with relative paths are refused: the daemon's working directory is not the client's.

        ("rel/src" would be a Hugging Face Hub id: see test_hub.py.)"""
        with grpc.insecure_channel(daemon.address) as channel, pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.MlxdStub(channel).Convert(pb.ConvertRequest(src="./rel/src", dst="/tmp/x")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestJobs:
    def test_rpcs_answer_while_convert_runs_and_cancel_cleans_up(self, daemon: DaemonProcess, tmp_path: Path) -> None:
        """During a long convert, health and ListModels answer; CancelJob stops it and leaves no output."""
        src = slow_checkpoint(tmp_path / "src")
        dst = tmp_path / "out"
        with daemon.client() as c:
            events = c.convert_events(src, dst, dtype="float16")
            job_id = ""
            with pytest.raises(CancelledError):
                for event in events:
                    if isinstance(event, pb.Progress) and event.kind == pb.Progress.KIND_REPORT and not job_id:
                        job_id = event.job_id
                        start = time.perf_counter()
                        assert is_serving(daemon.address)
                        c.list_models()
                        assert time.perf_counter() - start < 1.0
                        assert event.items_done < event.items_total
                        assert c.cancel_job(job_id) is True
            assert job_id
            assert c.cancel_job(job_id) is False  # already ended
        assert not dst.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary directory left behind

    def test_worker_crash_is_unavailable_and_recovers(
        self, daemon: DaemonProcess, tmp_path: Path, tiny_clip: Path
    ) -> None:
        """If the jobs worker dies mid-convert the job fails with UNAVAILABLE and the next job succeeds."""
        src = slow_checkpoint(tmp_path / "src")
        with daemon.client() as c:
            with pytest.raises(UnavailableError) as err:
                for event in c.convert_events(src, tmp_path / "out", dtype="float16"):
                    if isinstance(event, pb.Progress) and event.kind == pb.Progress.KIND_REPORT:
                        os.kill(worker_pid(daemon, "jobs"), signal.SIGKILL)
            assert err.value.reason == "WORKER_CRASHED"
            result = c.convert(tiny_clip, tmp_path / "after")
            assert result.num_tensors > 0
            assert is_serving(daemon.address)


class TestLifecycle:
    def test_stale_socket_is_replaced(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        """A socket file left by a crashed daemon does not stop a new one from starting."""
        import socket
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlxd-stale-") as root:
            path = Path(root) / "mlxd.sock"
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            s.close()  # the file stays, nobody listens: a stale socket
            d = DaemonProcess(Path(root))
            try:
                with d.client() as c:
                    assert c.initialize().pid == d.proc.pid
            finally:
                d.stop()

    def test_second_daemon_on_same_socket_refuses(self, daemon: DaemonProcess) -> None:
        """Starting a daemon where one already serves fails and leaves the first one serving."""
        import subprocess
        import sys

        proc = subprocess.run(
            [sys.executable, "-m", "mlxd_daemon", "--address", daemon.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "already serves" in proc.stderr
        assert is_serving(daemon.address)

    def test_sigterm_drains_and_removes_socket(self) -> None:
        """SIGTERM stops the daemon gracefully: exit code 0 and the socket file removed."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlxd-term-") as root:
            d = DaemonProcess(Path(root))
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(30) == 0, d.log.read_text()
            assert not d.socket.exists()
            assert '"daemon_stopped"' in d.log.read_text()

    def test_shutdown_rpc_stops_daemon(self) -> None:
        """The Shutdown RPC (mlxctl daemon stop) ends the process."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlxd-stop-") as root:
            d = DaemonProcess(Path(root))
            with d.client() as c:
                c.shutdown()
            assert d.proc.wait(30) == 0
            assert not d.socket.exists()

    def test_canonical_log_line_per_rpc(self, daemon: DaemonProcess, client: Client) -> None:
        """Each RPC leaves one JSON log line with method, code and latency."""
        client.list_models()
        lines = [json.loads(x) for x in daemon.log.read_text().splitlines() if x.startswith("{")]
        rpc_lines = [x for x in lines if x.get("event") == "rpc" and x.get("method") == "ListModels"]
        assert rpc_lines and {"code", "latency_ms", "level", "timestamp"} <= set(rpc_lines[-1])

    def test_unload_frees_and_lists(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """LoadModel makes a model resident with its bytes; UnloadModel frees them; unloading twice fails."""
        dst = tmp_path / "mlx"
        client.convert(tiny_clip, dst)
        loaded = client.load_model(dst)
        assert loaded.model.resident_bytes > 0
        assert any(m.id == str(dst) for m in client.list_models().models)
        assert client.unload_model(dst).freed_bytes == loaded.model.resident_bytes
        assert all(m.id != str(dst) for m in client.list_models().models)
        with pytest.raises(FailedPreconditionError):
            client.unload_model(dst)


def test_concurrent_infer_requests(client: Client, tiny_clip: Path, tmp_path: Path) -> None:
    """Eight threads calling Infer at once all get correct, identical answers (MLX runs on one worker)."""
    dst = tmp_path / "mlx"
    client.convert(tiny_clip, dst)
    results: list[object] = []

    def call() -> None:
        with Client(client.address, autostart=False) as c:
            results.append(c.infer(dst, texts=["a cat", "a dog"]).text_embeds)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    first = results[0]
    # Batched forwards may sum in another order: equal to float32 rounding.
    assert all(np.allclose(r, first, atol=1e-6) for r in results)
