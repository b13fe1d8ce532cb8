"""One rank of a tensor-parallel model: ``python -m mlxd_daemon.tp_rank MODEL_DIR CONTROL_SOCKET``.

Started by MLX's launcher (``mlx.launch``), which sets the group's environment (ring hostfile or NCCL address) and
kills every rank when one exits. Each rank loads only its shard of the model (the model class's own ``shard(group)``
plan, as mlx-lm's ``sharded_load``), then all ranks run the same generation in lockstep; mlx-lm's sharded layers
all-reduce the activations. Rank 0 alone talks to the models worker, over a unix socket, in JSON lines:

    worker → rank 0: {"op": "generate", "prompt": [ids], "max_tokens", "temperature", "top_p", "seed"}
                     {"op": "cancel"} (between tokens)     {"op": "shutdown"}
    rank 0 → worker: {"event": "ready", "ranks": [{"rank", "host", "pid", "resident_bytes"}], "backend"}
                     {"event": "token", "token_id", "text"}…, the last one with "finish_reason" and "stats"
                     {"event": "done", "finish_reason": "cancelled"} (after a cancel)
                     {"event": "error", "error": MlxdError.to_dict()}

Rank 0 hands each request to the other ranks with a collective (the only channel MLX's launcher sets up across
hosts), and once per token all ranks agree whether to go on, so a cancel stops every rank at the same token.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, cast

INFO_INTS = 256  # fixed width of one rank's info record for all_gather


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


class _Lines:
    """Newline-delimited JSON from a socket; ``poll`` does not block."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buf = conn, b""

    def read(self, block: bool = True) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            if not block and not select.select([self.conn], [], [], 0)[0]:
                return None
            chunk = self.conn.recv(65536)
            if not chunk:
                return {"op": "shutdown"}  # the models worker went away
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))


def main(model_dir: str, control: str) -> None:
    from mlxd_daemon import blas
    from mlxd_daemon.errors import InvalidArgument, MlxdError

    blas.preload()  # before the first `import mlx.core`
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.generate import generation_stream, stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model, load_tokenizer

    group = mx.distributed.init(strict=True, backend=os.environ.get("MLXD_TP_BACKEND", "any"))
    rank = group.rank()
    conn = lines = None
    if rank == 0:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(control)
        lines = _Lines(conn)

    def broadcast(obj: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's object on every rank (an all_sum to which the other ranks add zeros)."""
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8).astype(np.int32) if rank == 0 else None
        n = mx.distributed.all_sum(mx.array([0 if data is None else data.size], dtype=mx.int32), group=group)
        size = int(np.array(n)[0])
        payload = mx.array(data) if data is not None else mx.zeros((size,), dtype=mx.int32)
        out = np.array(mx.distributed.all_sum(payload, group=group)).astype(np.uint8)
        return dict(json.loads(out.tobytes()))

    def agree(flag: int) -> bool:
        """True on every rank when rank 0 raised ``flag``; on the generation stream so collectives stay ordered."""
        total = mx.distributed.all_sum(mx.array([flag], dtype=mx.int32), group=group, stream=generation_stream)
        return bool(np.array(total)[0] > 0)

    try:
        # mlx-lm's sharded_load, minus its CPU-stream barrier (the NCCL backend has no CPU-stream collectives)
        model, config = load_model(Path(model_dir), lazy=True)
        model.shard(group)
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(Path(model_dir), eos_token_ids=config.get("eos_token_id"))
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every rank loaded before serving
    except Exception as e:  # reported to the worker, which turns it into a load error
        if conn is not None:
            msg = f"rank {rank} could not load its shard: {type(e).__name__}: {e}"
            _send(conn, {"event": "error", "error": InvalidArgument(msg, reason="TP_LOAD_FAILED").to_dict()})
        raise
    params = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    nbytes = sum(int(v.nbytes) for _, v in params)
    info = json.dumps({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "resident_bytes": nbytes})
    row = np.zeros(INFO_INTS, dtype=np.int32)
    row[: len(info)] = np.frombuffer(info.encode(), dtype=np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(row)[None], group=group)).astype(np.uint8)
    ranks = [json.loads(r.tobytes().rstrip(b"\0")) for r in rows]
    if conn is not None:
        _send(conn, {"event": "ready", "ranks": ranks, "backend": os.environ.get("MLXD_TP_BACKEND", "")})

    def next_request() -> dict[str, Any] | None:
        while lines is not None:
            request = lines.read()
            if request and request.get("op") != "cancel":  # a cancel that came after "done" is moot
                return request
        return None

    while True:
        request = broadcast(next_request())
        if request.get("op") != "generate":
            break
        mx.random.seed(int(request["seed"]))
        sampler = make_sampler(temp=float(request["temperature"]), top_p=float(request["top_p"]))
        try:
            for response in stream_generate(model, tokenizer, request["prompt"], max_tokens=request["max_tokens"],
                                            sampler=sampler):  # fmt: skip
                cancel = 0
                if conn is not None and lines is not None:
                    event = {"event": "token", "token_id": int(response.token), "text": response.text}
                    if response.finish_reason:
                        event["finish_reason"] = response.finish_reason
                        event["stats"] = {
                            "prompt_tokens": response.prompt_tokens, "prompt_tps": response.prompt_tps,
                            "generation_tokens": response.generation_tokens, "generation_tps": response.generation_tps,
                        }  # fmt: skip
                    _send(conn, event)
                    cancel = int((lines.read(block=False) or {}).get("op") in ("cancel", "shutdown"))
                if agree(cancel):
                    if conn is not None:
                        _send(conn, {"event": "done", "finish_reason": "cancelled"})
                    break
        except Exception as e:
            if conn is None:
                raise
            err = MlxdError(f"rank 0 failed to generate: {type(e).__name__}: {e}")
            _send(conn, {"event": "error", "error": err.to_dict()})
            traceback.print_exc()
    if conn is not None:
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
