"""Load: many concurrent clients, many load/unload cycles, and a bounded property-based fuzz of requests (Convert,
Quantize, Validate, Infer) that never answers INTERNAL/UNKNOWN."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import BUG_CODES, DaemonProcess, bug_responses
from google.protobuf.message import Message
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


@pytest.fixture(scope="module")
def writes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where fuzzed requests that write may write (never a random path: --overwrite would replace it)."""
    return tmp_path_factory.mktemp("fuzz-writes")


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


def answer_or_specific_code(daemon: DaemonProcess, method: str, request: object, timeout: float) -> None:
    """Call ``method`` (streams are drained): an answer, or an error whose code is one of ``ALLOWED``."""
    with grpc.insecure_channel(daemon.address) as channel:
        call = getattr(pb_grpc.MlxdStub(channel), method)
        try:
            reply = call(request, timeout=timeout)
            if not isinstance(reply, Message):
                list(reply)
        except grpc.RpcError as e:
            assert e.code() in ALLOWED, (e.code(), e.details())


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
        answer_or_specific_code(daemon, "Convert", request, timeout=30)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model=paths, texts=st.lists(st.text(max_size=30), max_size=3),
           images=st.lists(st.binary(max_size=64), max_size=2))  # fmt: skip
    def test_infer_fields(self, daemon: DaemonProcess, model: str, texts: list[str], images: list[bytes]) -> None:
        """Random Infer requests never crash the daemon and never answer UNKNOWN or INTERNAL."""
        answer_or_specific_code(daemon, "Infer", pb.InferRequest(model=model, texts=texts, images=images), timeout=30)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=st.text(max_size=12), dtype=st.integers(0, 4), bits=st.sampled_from([0, 0, 2, 4, 7, 8]),
           mode=st.integers(0, 5), group=st.sampled_from([0, 16, 32, 64, 100]), overwrite=st.booleans(),
           strict=st.booleans(),
           shard=st.sampled_from(["", "1KB", "64KB", "0", "-1", "5GB"]))  # fmt: skip
    def test_convert_writes(self, daemon: DaemonProcess, tiny_clip: Path, writes_root: Path, name: str, dtype: int,
                            bits: int, mode: int, group: int, overwrite: bool, strict: bool,
                            shard: str) -> None:  # fmt: skip
        """Random real conversions (written, never dry runs) into a scratch folder: a result or a specific code."""
        dst = writes_root / (name.replace("/", "_").replace("\0", "_").strip(".") or "out")
        request = pb.ConvertRequest(src=str(tiny_clip), dst=str(dst), dtype=dtype, max_shard_size=shard,  # type: ignore[arg-type]
                                    overwrite=overwrite, strict=strict)  # fmt: skip
        if bits or mode:
            request.quantize.CopyFrom(pb.QuantizationSpec(bits=bits, group_size=group, mode=mode))  # type: ignore[arg-type]
        answer_or_specific_code(daemon, "Convert", request, timeout=60)
        assert not [p.name for p in writes_root.iterdir() if ".mlxd-" in p.name]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(src=st.one_of(paths, st.just("MLX")), name=st.text(max_size=12), bits=st.integers(0, 9),
           mode=st.integers(0, 5), group=st.sampled_from([0, 16, 32, 64, 100]), dequantize=st.booleans(),
           dtype=st.integers(0, 4), overwrite=st.booleans())  # fmt: skip
    def test_quantize_fields(self, daemon: DaemonProcess, mlx_clip: Path, writes_root: Path, src: str, name: str,
                             bits: int, mode: int, group: int, dequantize: bool, dtype: int,
                             overwrite: bool) -> None:  # fmt: skip
        """Random Quantize requests (on the converted model, or on random paths): a result or a specific code."""
        dst = writes_root / ("q-" + (name.replace("/", "_").replace("\0", "_") or "out"))
        request = pb.QuantizeRequest(src=str(mlx_clip) if src == "MLX" else src, dst=str(dst), overwrite=overwrite,
                                     spec=pb.QuantizationSpec(bits=bits, group_size=group, mode=mode),  # type: ignore[arg-type]
                                     dequantize=dequantize, dtype=dtype)  # type: ignore[arg-type]  # fmt: skip
        answer_or_specific_code(daemon, "Quantize", request, timeout=60)

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model=st.one_of(paths, st.just("MLX")), reference=st.one_of(paths, st.just("HF")),
           texts=st.lists(st.text(max_size=20), max_size=2), images=st.lists(st.binary(max_size=32), max_size=1),
           npz=st.one_of(st.just(b""), st.binary(max_size=64)))  # fmt: skip
    def test_validate_fields(self, daemon: DaemonProcess, mlx_clip: Path, tiny_clip: Path, model: str,
                             reference: str, texts: list[str], images: list[bytes], npz: bytes) -> None:  # fmt: skip
        """Random Validate requests never answer UNKNOWN or INTERNAL (garbage .npz bytes and images included)."""
        request = pb.ValidateRequest(model_dir=str(mlx_clip) if model == "MLX" else model,
                                     reference=str(tiny_clip) if reference == "HF" else reference,
                                     texts=texts, images=images, inputs_npz=npz)  # fmt: skip
        answer_or_specific_code(daemon, "Validate", request, timeout=120)

    def test_daemon_still_serving(self, daemon: DaemonProcess) -> None:
        """After the fuzzing the daemon still answers its health check."""
        assert is_serving(daemon.address)

    def test_no_fuzzed_request_was_internal(self, daemon: DaemonProcess) -> None:
        """Over the whole session so far, no RPC answered INTERNAL/UNKNOWN and no job failed with either."""
        bad, _ = bug_responses(daemon.log)
        assert bad == []
        with daemon.client() as c:
            jobs = c.list_jobs()
        assert len(jobs) > 0
        assert [(j.job_id, j.error_code, j.error_message) for j in jobs if j.error_code in BUG_CODES] == []
