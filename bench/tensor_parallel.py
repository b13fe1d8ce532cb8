"""Tensor-parallel serving through the daemon: one process vs two ranks, same greedy tokens (issues 22 and 23).

A Llama-shaped decoder (random weights, converted by mlxd) is loaded with ``tensor_parallel`` 1 and 2; each
setting generates the same greedy tokens ``--runs`` times. Reports prefill and decode tokens/s (median, p10/p90),
each rank's resident weight bytes (and, on CUDA, each GPU's used memory from nvidia-smi), whether the tokens
match, and with ``--kill`` how long a request takes to fail with UNAVAILABLE / RANK_LOST after rank 1 is killed
mid-generation. The backend is chosen by the daemon: ring (TCP) on CPUs, NCCL on CUDA GPUs.

    python bench/tensor_parallel.py                       # CPU: 8 layers x 1024 hidden (~150M parameters)
    python bench/tensor_parallel.py --size 1b --kill      # a 2-GPU machine: the 1.24B Llama-3.2-1B shape
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, machine, spread

PROMPT = "The history of the city begins with a small settlement on the river, where traders met"
SHAPES = {
    "bench": {"size": "tiny", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4},
    "1b": {"size": "1b", "dtype": "bfloat16"},
}  # fmt: skip


def model(size: str) -> Path:
    from mlxd_daemon.fixtures.llama import make_llama

    src = CACHE / f"hf-llama-tp-{size}"
    if not (src / "config.json").exists():
        make_llama(src, seed=0, **SHAPES[size])  # type: ignore[arg-type]
    return src


def gpu_memory() -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    return "; GPU memory used: " + ", ".join(line.strip() for line in out.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kill", action="store_true", help="also kill rank 1 mid-generation")
    parser.add_argument("--dtype", default="auto", help="conversion dtype (auto keeps the checkpoint's)")
    args = parser.parse_args()

    from mlxd.v1 import mlxd_pb2 as pb
    from mlxd_client import Client
    from mlxd_client.discovery import start_daemon
    from mlxd_client.errors import MlxdClientError

    print(f"# tensor parallel through the daemon ({machine()}); decoder {SHAPES[args.size]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix://{tmp}/mlxd.sock"
        proc = start_daemon(address, log_path=Path(tmp) / "mlxd.log", extra_args=["--memory-budget", "0.7"])
        try:
            with Client(address, autostart=False, timeout=1800) as c:
                out = Path(tmp) / "mlx"
                c.convert(model(args.size), out, dtype=args.dtype)
                tokens: dict[int, list[int]] = {}
                for tp in (1, 2):
                    start = time.perf_counter()
                    info = c.load_model(out, tensor_parallel=tp).model
                    ranks = [r.resident_bytes / 1e6 for r in info.ranks] or [info.resident_bytes / 1e6]
                    print(f"tensor_parallel={tp}: loaded in {time.perf_counter() - start:.1f} s "
                          f"({info.tensor_parallel_backend or 'one process'}), weights MB per rank "
                          f"{[round(r, 1) for r in ranks]}{gpu_memory()}", flush=True)  # fmt: skip
                    prefill, decode = [], []
                    for _ in range(args.runs + 1):  # the first run warms up
                        ids, result = [], None
                        for e in c.generate_events(out, PROMPT, max_tokens=args.max_tokens):
                            if isinstance(e, pb.GeneratedToken):
                                ids.append(e.token_id)
                            else:
                                result = e
                        assert result is not None
                        prefill.append(result.prompt_tokens_per_second)
                        decode.append(result.generation_tokens_per_second)
                    tokens[tp] = ids
                    print(f"  prefill {spread(prefill[1:])} tok/s, decode {spread(decode[1:])} tok/s", flush=True)
                    if tp == 2 and args.kill:
                        events = iter(c.generate_events(out, PROMPT, max_tokens=100000))
                        next(events)
                        os.kill(info.ranks[1].pid, signal.SIGKILL)
                        start = time.perf_counter()
                        try:
                            for _ in events:
                                pass
                            print("  killed rank 1: the generation finished anyway (unexpected)")
                        except MlxdClientError as e:
                            print(f"  killed rank 1 mid-generation: {e.code} / {e.reason} after "
                                  f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
                        print(f"  the daemon serves on: {c.generate(out, PROMPT, max_tokens=4).finish_reason}")
                    else:
                        c.unload_model(out)
                same = next((i for i, (a, b) in enumerate(zip(tokens[1], tokens[2], strict=False)) if a != b), None)
                print(f"same greedy tokens at 1 and 2 ranks: {same is None} (first {same or len(tokens[1])} of "
                      f"{len(tokens[1])} equal)")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
