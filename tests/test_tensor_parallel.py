"""Tensor-parallel serving: a decoder split over two ranks (ring backend on localhost) through the daemon."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError, UnavailableError, UnsupportedError

PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def llama(daemon: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 attention heads, 2 KV heads) converted by the daemon."""
    from mlxd_daemon.fixtures.llama import make_llama

    root = tmp_path_factory.mktemp("tp")
    src = make_llama(root / "hf", size="tiny", seed=0)
    with Client(daemon.address, autostart=False) as c:  # type: ignore[attr-defined]
        c.convert(src, root / "mlx")
    return root / "mlx"


def greedy_ids(client: Client, model: Path, n: int = 16) -> list[int]:
    events = client.generate_events(model, PROMPT, max_tokens=n)
    return [e.token_id for e in events if isinstance(e, pb.GeneratedToken)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class TestTensorParallel:
    def test_two_ranks_generate_the_tokens_of_one(self, client: Client, llama: Path) -> None:
        """Greedy tokens from two ranks equal those of the single-process model; ListModels shows both ranks."""
        client.load_model(llama)
        expected = greedy_ids(client, llama)
        info = client.load_model(llama, tensor_parallel=2).model
        assert (info.tensor_parallel, info.tensor_parallel_backend, len(info.ranks)) == (2, "ring", 2)
        assert [r.rank for r in info.ranks] == [0, 1] and all(alive(r.pid) for r in info.ranks)
        assert all(0 < r.resident_bytes < info.resident_bytes for r in info.ranks)
        assert greedy_ids(client, llama) == expected
        listed = next(m for m in client.list_models().models if m.id == str(llama.resolve()))
        assert listed.tensor_parallel == 2 and [r.pid for r in listed.ranks] == [r.pid for r in info.ranks]

    def test_cancel_then_serve_again(self, client: Client, llama: Path) -> None:
        """Closing a stream stops every rank at the same token; the next request gets a full answer."""
        events = client.generate_events(llama, PROMPT, max_tokens=1000)
        next(iter(events))
        events.close()
        result = client.generate(llama, PROMPT, max_tokens=5)
        assert result.generation_tokens == 5 and result.finish_reason == "length"
        listed = next(m for m in client.list_models().models if m.id == str(llama.resolve()))
        assert listed.tensor_parallel == 2  # still served by the same two ranks

    def test_unload_stops_every_rank(self, client: Client, llama: Path) -> None:
        """Unloading a tensor-parallel model ends its rank processes."""
        pids = [r.pid for r in client.load_model(llama, tensor_parallel=2).model.ranks]  # the one loaded above
        client.unload_model(llama)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids)

    def test_killed_rank_is_unavailable_and_the_daemon_serves_on(self, client: Client, llama: Path) -> None:
        """A rank killed mid-generation → UNAVAILABLE / RANK_LOST; the model is unloaded and others still serve."""
        ranks = client.load_model(llama, tensor_parallel=2).model.ranks
        events = iter(client.generate_events(llama, PROMPT, max_tokens=100000))
        next(events)
        os.kill(ranks[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(UnavailableError) as err:
            for _ in events:
                pass
        assert err.value.reason == "RANK_LOST"
        assert time.monotonic() - start < 60  # within the collective timeout, not a hang
        assert str(llama.resolve()) not in [m.id for m in client.list_models().models]
        assert client.generate(llama, PROMPT, max_tokens=3).finish_reason == "length"  # served again, one process

    def test_uneven_heads_are_refused(self, client: Client, llama: Path) -> None:
        """Four attention heads cannot be split three ways: INVALID_ARGUMENT before any rank starts."""
        with pytest.raises(InvalidArgumentError) as err:
            client.load_model(llama, tensor_parallel=3)
        assert err.value.reason == "BAD_TENSOR_PARALLEL"

    def test_architecture_without_a_sharding_plan(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """A model mlx-lm cannot shard → UNIMPLEMENTED / NO_SHARDING_PLAN."""
        client.convert(tiny_clip, tmp_path / "clip")
        with pytest.raises(UnsupportedError) as err:
            client.load_model(tmp_path / "clip", tensor_parallel=2)
        assert err.value.reason == "NO_SHARDING_PLAN"


class TestLaunch:
    """What each rank is started with, per backend (the NCCL run itself needs a machine with two GPUs)."""

    def test_ring_on_this_host(self, tmp_path: Path) -> None:
        """Ring: N ranks on 127.0.0.1 from a free starting port, running mlxd's rank module on the model."""
        from mlxd_daemon.tensor_parallel import launch_command

        argv, env = launch_command(2, "ring", "/tmp/c.sock", tmp_path, port=40000)
        assert argv[argv.index("--backend") + 1] == "ring" and argv[argv.index("-n") + 1] == "2"
        assert argv[argv.index("--starting-port") + 1] == "40000"
        assert argv[-4:] == ["-m", "mlxd_daemon.tp_rank", str(tmp_path), "/tmp/c.sock"]
        assert env["MLXD_TP_BACKEND"] == "ring" and "NCCL_NVLS_ENABLE" not in env
        assert env["OPENBLAS_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))  # the cores are shared

    def test_nccl_keeps_nvlink_multicast_off(self, tmp_path: Path) -> None:
        """NCCL: the ranks get NCCL_NVLS_ENABLE=0 and the launcher an NCCL port; hosts come from the hostfile."""
        from mlxd_daemon.tensor_parallel import hostfile_size, launch_command

        hosts = tmp_path / "hosts.json"
        hosts.write_text('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]')
        argv, env = launch_command(hostfile_size(str(hosts)), "nccl", "/tmp/c.sock", tmp_path, str(hosts), port=41000)
        assert argv[argv.index("--backend") + 1] == "nccl" and argv[argv.index("--hostfile") + 1] == str(hosts)
        assert argv[argv.index("--nccl-port") + 1] == "41000" and "NCCL_NVLS_ENABLE=0" in argv
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["MLXD_TP_BACKEND"] == "nccl"
