"""Tensor-parallel serving through the daemon: one process vs two ranks (ring backend on this host).

A Llama-shaped decoder (random weights, converted by mlxd) is loaded with ``tensor_parallel`` 1 and 2; each
setting generates the same greedy tokens ``RUNS`` times. Reports prefill and decode tokens/s (median, p10/p90),
the resident bytes of each rank, and whether the tokens match.

    python bench/tensor_parallel.py            # 8 layers x 1024 hidden (~150M parameters)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, machine, spread

RUNS = 5
PROMPT = "The history of the city begins with a small settlement on the river, where traders met"
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 4}  # fmt: skip


def model() -> Path:
    from mlxd_daemon.fixtures.llama import make_llama

    src = CACHE / "hf-llama-tp-bench"
    if not (src / "config.json").exists():
        make_llama(src, size="tiny", seed=0, **SHAPE)
    return src


def main() -> None:
    from mlxd.v1 import mlxd_pb2 as pb
    from mlxd_client import Client
    from mlxd_client.discovery import start_daemon

    print(f"# tensor parallel through the daemon ({machine()}); decoder {SHAPE}")
    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix://{tmp}/mlxd.sock"
        proc = start_daemon(address, log_path=Path(tmp) / "mlxd.log", extra_args=["--memory-budget", "0.7"])
        try:
            with Client(address, autostart=False, timeout=1800) as c:
                out = Path(tmp) / "mlx"
                c.convert(model(), out)
                print("converted", flush=True)
                tokens: dict[int, list[int]] = {}
                for tp in (1, 2):
                    info = c.load_model(out, tensor_parallel=tp).model
                    print(f"loaded with tensor_parallel={tp}", flush=True)
                    prefill, decode = [], []
                    for _ in range(RUNS + 1):  # the first run warms up
                        ids, result = [], None
                        for e in c.generate_events(out, PROMPT, max_tokens=64):
                            if isinstance(e, pb.GeneratedToken):
                                ids.append(e.token_id)
                            else:
                                result = e
                        assert result is not None
                        prefill.append(result.prompt_tokens_per_second)
                        decode.append(result.generation_tokens_per_second)
                    tokens[tp] = ids
                    ranks = [r.resident_bytes / 1e6 for r in info.ranks] or [info.resident_bytes / 1e6]
                    print(f"tensor_parallel={tp}: prefill {spread(prefill[1:])} tok/s, decode {spread(decode[1:])} "
                          f"tok/s, resident MB per rank {[round(r, 1) for r in ranks]}")  # fmt: skip
                    c.unload_model(out)
                print(f"same greedy tokens at 1 and 2 ranks: {tokens[1] == tokens[2]}")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
