"""Tensor-parallel models: N rank processes started through MLX's launcher, driven from the models worker.

The models worker does not join the group itself: MLX initialises one distributed group per process, and a rank
that dies must not take the worker (and every other resident model) with it. Instead it starts ``mlx.launch`` with
``mlxd_daemon.tp_rank`` (ranks on the listed hosts, default N on this one), accepts rank 0's connection on a
private unix socket and proxies Generate to it (protocol in ``tp_rank``). The launcher kills every rank when one
exits; the worker notices a closed socket, a dead launcher or a silent rank (``COLLECTIVE_TIMEOUT_S``) and
answers ``UNAVAILABLE`` / ``RANK_LOST``, after which the model is unloaded.

Backends: NCCL where MLX sees CUDA GPUs (``NCCL_NVLS_ENABLE=0``: NVLink multicast stays off), else the ring
backend over TCP (CPU hosts, Macs). The sharding plan is mlx-lm's: a model class without ``shard`` cannot be split.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import structlog

from mlxd_daemon.archs.decoder import TokenizedPrompts
from mlxd_daemon.errors import InvalidArgument, MlxdError, RankLost, Unsupported

log = structlog.get_logger()

LOAD_TIMEOUT_S = float(os.environ.get("MLXD_TP_LOAD_TIMEOUT", "300"))  # launch + every rank loading its shard
COLLECTIVE_TIMEOUT_S = float(os.environ.get("MLXD_TP_TIMEOUT", "30"))  # longest silence from rank 0 mid-request
RANK_EXIT_GRACE_S = 5.0  # after a rank's error, how long the launcher may take to end the group before we judge
NCCL_ENV = ("NCCL_NVLS_ENABLE=0",)


def choose_backend() -> str:
    """NCCL when MLX runs on CUDA GPUs here, else the ring backend (TCP)."""
    import mlx.core as mx

    return "nccl" if mx.cuda.is_available() else "ring"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(
    size: int, backend: str, control: str, model_dir: Path, hostfile: str | None = None, port: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``mlx.launch`` argv and the environment the ranks get, for ``size`` ranks of ``model_dir``."""
    argv = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "--backend", backend]
    argv += ["--hostfile", hostfile] if hostfile else ["--hosts", "127.0.0.1", "-n", str(size)]
    argv += ["--python", sys.executable, "--env", f"MLXD_TP_BACKEND={backend}"]
    if backend == "ring":
        argv += ["--starting-port", str(port or free_port())]
    elif backend == "nccl":
        argv += ["--nccl-port", str(port or free_port())]
        for e in NCCL_ENV:
            argv += ["--env", e]
    argv += ["--", "-m", "mlxd_daemon.tp_rank", str(model_dir), control]
    env = {**os.environ, "MLXD_TP_BACKEND": backend}
    if backend == "ring" and not hostfile:
        # N ranks on this host share its cores: BLAS threads beyond a rank's share spin against the other ranks
        # (2 ranks x 2 OpenBLAS threads on 2 cores stalled a collective past the timeout).
        threads = str(max(1, (os.cpu_count() or 1) // size))
        env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    if backend == "nccl":
        env.update(dict(e.split("=", 1) for e in NCCL_ENV))
    return argv, env


def hostfile_size(hostfile: str) -> int:
    """Ranks listed in an ``mlx.launch`` hostfile (a JSON list of hosts, or ``{"hosts": [...]}``)."""
    try:
        data = json.loads(Path(hostfile).read_text())
    except (OSError, json.JSONDecodeError) as e:
        msg = f"hosts file {hostfile} is not readable JSON: {e}"
        raise InvalidArgument(msg, reason="BAD_HOSTFILE", path=hostfile) from None
    hosts = data.get("hosts", []) if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        msg = f"hosts file {hostfile} lists no hosts (expected mlx.launch's format: a JSON list of hosts)"
        raise InvalidArgument(msg, reason="BAD_HOSTFILE", path=hostfile)
    return len(hosts)


def check_shardable(model_dir: Path, size: int) -> dict[str, Any]:
    """Refuse before launching anything: a model mlx-lm cannot shard, or heads that do not split ``size`` ways."""
    from mlx_lm.utils import _get_classes, load_config

    config = load_config(model_dir)
    try:
        model_class, _ = _get_classes(config)
    except ValueError as e:
        msg = f"{config.get('model_type')!r} is not an mlx-lm decoder, so it has no tensor-parallel plan: {e}"
        raise Unsupported(msg, reason="NO_SHARDING_PLAN", model_type=str(config.get("model_type"))) from None
    if not hasattr(model_class, "shard"):
        msg = (f"mlx-lm has no tensor-parallel sharding plan for {config['model_type']!r}; "
               "load it without --tensor-parallel")  # fmt: skip
        raise Unsupported(msg, reason="NO_SHARDING_PLAN", model_type=str(config["model_type"]))
    heads = config.get("num_attention_heads", 0)
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % size or kv_heads % size:
        msg = f"{heads} attention heads / {kv_heads} KV heads do not split evenly over {size} ranks"
        raise InvalidArgument(msg, reason="BAD_TENSOR_PARALLEL", heads=heads, kv_heads=kv_heads, ranks=size)
    return config


class TensorParallelModel(TokenizedPrompts):
    """A decoder served by ``size`` ranks; the models worker's stand-in for a resident bundle."""

    def __init__(self, model_dir: Path, size: int, hostfile: str | None = None) -> None:
        if hostfile:
            size = hostfile_size(hostfile)
        if size < 2:
            msg = f"tensor_parallel must be at least 2 to split a model (got {size})"
            raise InvalidArgument(msg, reason="BAD_TENSOR_PARALLEL", ranks=size)
        config = check_shardable(model_dir, size)
        from mlx_lm.utils import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
        self.model_dir = model_dir
        self.tensor_parallel, self.backend = size, choose_backend()
        self.dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
        self._dir = Path(tempfile.mkdtemp(prefix="mlxd-tp-"))
        control = str(self._dir / "control.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(control)
        self._listener.listen(1)
        argv, env = launch_command(size, self.backend, control, model_dir, hostfile)
        self._log = open(self._dir / "ranks.log", "wb")  # noqa: SIM115 - open for the life of the ranks
        self._proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self._conn: socket.socket | None = None
        self._buf = b""
        try:
            self._conn = self._accept()
            ready = self._read(LOAD_TIMEOUT_S)
            if ready.get("event") == "error":
                raise MlxdError.from_dict(ready["error"])
        except BaseException:
            self.close()
            raise
        self.ranks: list[dict[str, Any]] = ready["ranks"]
        self.nbytes = sum(int(r["resident_bytes"]) for r in self.ranks)
        log.info("tensor_parallel_loaded", model=str(model_dir), ranks=self.ranks, backend=self.backend)

    def _accept(self) -> socket.socket:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if select.select([self._listener], [], [], 0.5)[0]:
                return self._listener.accept()[0]
            if self._proc.poll() is not None:
                self._lost("the ranks exited while starting")
        self._lost(f"rank 0 did not connect within {LOAD_TIMEOUT_S:.0f} s")

    def _lost(self, why: str) -> NoReturn:
        tail = self.log_tail()
        self.close()
        msg = f"tensor-parallel model lost a rank: {why}; the model was unloaded. Rank output: {tail}"
        raise RankLost(msg, ranks=self.tensor_parallel)

    def log_tail(self, limit: int = 1500) -> str:
        try:
            return (self._dir / "ranks.log").read_bytes()[-limit:].decode(errors="replace").strip()
        except OSError:
            return ""

    def _read(self, timeout: float) -> dict[str, Any]:
        """The next message from rank 0, or ``RankLost`` when it goes silent or away."""
        assert self._conn is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self._lost(f"no answer from rank 0 within {timeout:.0f} s (collective timeout)")
            if not select.select([self._conn], [], [], min(left, 0.5))[0]:
                if self._proc.poll() is not None:
                    self._lost(f"the launcher exited with code {self._proc.returncode}")
                continue
            chunk = self._conn.recv(65536)
            if not chunk:
                self._lost("rank 0 closed its connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def _send(self, obj: dict[str, Any]) -> None:
        assert self._conn is not None
        try:
            self._conn.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as e:
            self._lost(f"cannot reach rank 0: {e}")

    @property
    def alive(self) -> bool:
        return self._conn is not None and self._proc.poll() is None

    def generate(
        self, prompt: str | list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Iterator[dict[str, Any]]:
        """Token events as the single-process bundles yield them; closing the iterator cancels on every rank."""
        if not self.alive:
            self._lost("the ranks are gone")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            msg = "nothing to generate from: the prompt is empty"
            raise InvalidArgument(msg, reason="EMPTY_INPUT")
        if max_tokens <= 0:
            msg = f"max_tokens must be positive (got {max_tokens})"
            raise InvalidArgument(msg, reason="BAD_MAX_TOKENS")
        self._send({"op": "generate", "prompt": ids, "max_tokens": max_tokens, "temperature": temperature,
                    "top_p": top_p, "seed": seed})  # fmt: skip
        done = False
        try:
            while not done:
                event = self._read(max(COLLECTIVE_TIMEOUT_S, 1.0))
                kind = event.pop("event")
                if kind == "error":
                    done = True
                    error = MlxdError.from_dict(event["error"])
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._proc.wait(timeout=RANK_EXIT_GRACE_S)  # a lost peer: the launcher ends every rank
                        self._lost(error.message)
                    raise error
                done = "finish_reason" in event
                yield event
        finally:
            if not done and self.alive:  # the consumer stopped early (cancel): stop every rank, drain to "done"
                self._send({"op": "cancel"})
                while True:
                    event = self._read(COLLECTIVE_TIMEOUT_S)
                    if event.get("event") in ("done", "error") or "finish_reason" in event:
                        break

    def info(self) -> dict[str, Any]:
        return {"tensor_parallel": self.tensor_parallel, "backend": self.backend, "ranks": self.ranks}

    def close(self) -> None:
        """Stop every rank (a polite shutdown, then the launcher's whole process group)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.sendall(b'{"op": "shutdown"}\n')
            self._conn.close()
            self._conn = None
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # ranks the launcher left behind
        self._listener.close()
        self._log.close()
