"""Load: many concurrent clients, many load/unload cycles, and a bounded property-based fuzz of requests."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import DaemonProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlxd.v1 import mlxd_pb2 as pb
from mlxd.v1 import mlxd_pb2_grpc as pb_grpc
from mlxd_client import Client
from mlxd_client.discovery import is_serving

CLIENTS, REQUESTS = 16, 100


@pytest.fixture(scope="module")
def mlx_clip(daemon: DaemonProcess, tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("load") / "mlx"
    with daemon.client() as c:
        c.convert(tiny_clip, dst)
    return dst


class TestLoad:
    def test_concurrent_clients(self, daemon: DaemonProcess, mlx_clip: Path) -> None:
        """16 clients x 100 Infer requests each: no errors, and every answer equals the single-client one."""
        with daemon.client() as c:
            expected = c.infer(mlx_clip, texts=["a red circle"]).text_embeds
        errors: list[BaseException] = []
        done = [0] * CLIENTS
        batched = [0] * CLIENTS

        def worker(i: int) -> None:
            try:
                with Client(daemon.address, autostart=False) as c:
                    for _ in range(REQUESTS):
                        result = c.infer(mlx_clip, texts=["a red circle"])
                        np.testing.assert_allclose(result.text_embeds, expected, atol=1e-6)  # batches may reorder sums
                        done[i] += 1
                        batched[i] += result.batch_requests > 1
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == []
        assert sum(done) == CLIENTS * REQUESTS
        assert sum(batched) > CLIENTS * REQUESTS // 4  # requests that arrived while the worker was busy shared it

    def test_load_unload_cycles_do_not_grow_memory(self, daemon: DaemonProcess, mlx_clip: Path) -> None:
        """100 load/unload cycles: the models worker's resident memory grows by less than 64 MB."""
        with daemon.client() as c:
            for _ in range(5):  # warm up allocator and caches
                c.load_model(mlx_clip)
                c.unload_model(mlx_clip)
            before = c.list_models().worker_rss_bytes
            for _ in range(100):
                assert c.load_model(mlx_clip).model.resident_bytes > 0
                assert c.unload_model(mlx_clip).freed_bytes > 0
            after = c.list_models().worker_rss_bytes
            evictions = c.list_models().recent_evictions
        assert before > 0
        assert after - before < 64 * 1024 * 1024, (before, after)
        assert evictions and evictions[-1].reason == "requested"


C = grpc.StatusCode
ALLOWED = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.UNIMPLEMENTED, C.PERMISSION_DENIED,
           C.RESOURCE_EXHAUSTED}  # fmt: skip
paths = st.one_of(st.text(max_size=40), st.sampled_from(["/", "/tmp", "/nonexistent/x", "relative", "/dev/null"]))


class TestFuzz:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(src=paths, dst=paths, dtype=st.integers(0, 6), shard=st.text(max_size=8), bits=st.integers(0, 9),
           group=st.sampled_from([0, 1, 16, 32, 33, 64, 128, 1000]))  # fmt: skip
    def test_convert_fields(self, daemon: DaemonProcess, src: str, dst: str, dtype: int, shard: str, bits: int,
                            group: int) -> None:  # fmt: skip
        """Random Convert requests never crash the daemon and never answer UNKNOWN or INTERNAL."""
        request = pb.ConvertRequest(src=src, dst=dst, dtype=dtype, max_shard_size=shard, dry_run=True)  # type: ignore[arg-type]
        if bits:
            request.quantize.CopyFrom(pb.QuantizationSpec(bits=bits, group_size=group))
        with grpc.insecure_channel(daemon.address) as channel:
            try:
                list(pb_grpc.MlxdStub(channel).Convert(request, timeout=30))
            except grpc.RpcError as e:
                assert e.code() in ALLOWED, (e.code(), e.details())

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model=paths, texts=st.lists(st.text(max_size=30), max_size=3),
           images=st.lists(st.binary(max_size=64), max_size=2))  # fmt: skip
    def test_infer_fields(self, daemon: DaemonProcess, model: str, texts: list[str], images: list[bytes]) -> None:
        """Random Infer requests never crash the daemon and never answer UNKNOWN or INTERNAL."""
        with grpc.insecure_channel(daemon.address) as channel:
            try:
                pb_grpc.MlxdStub(channel).Infer(pb.InferRequest(model=model, texts=texts, images=images), timeout=30)
            except grpc.RpcError as e:
                assert e.code() in ALLOWED, (e.code(), e.details())

    def test_daemon_still_serving(self, daemon: DaemonProcess) -> None:
        """After the fuzzing the daemon still answers its health check."""
        assert is_serving(daemon.address)
