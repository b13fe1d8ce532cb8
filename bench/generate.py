"""Generate through the daemon vs ``mlx_lm.generate`` in process, on the same converted model, same machine.

The model: the Llama-3.2-1B-shape checkpoint of bench/convert.py (random bf16 weights), converted to float32 so
both sides compute in float32 (mlx-lm computes in the stored dtype, and half precision is ~40x slower on a Linux
CPU). Reported: the converted model's load time (mlxd's decoder.load and mlx_lm.load), decode tokens/s
(mlx-lm's own generation_tps on both sides), end-to-end tokens/s seen by the client, and the ratio.

Run `python bench/generate.py` (or `--tiny` for a quick check on a tiny model; `--dtype bfloat16` on a GPU, where
MLX computes in half precision at full speed; `--torch` adds transformers' greedy generate on the source checkpoint,
on the GPU when torch sees one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, machine
from infer import start_daemon

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat. " * 4
TOKENS, REPEAT = 128, 3


def model_dir(tiny: bool, dtype: str) -> Path:
    from mlxd_daemon.convert import convert

    if tiny:
        from mlxd_daemon.fixtures import make_llama

        root = Path(tempfile.mkdtemp())
        src = make_llama(root / "hf", size="tiny")
        convert(src, root / "mlx", dtype=dtype)
        return root / "mlx"
    from convert import llama_1b

    out = CACHE / f"bench-mlx-llama-1b-{dtype}"
    if not (out / "config.json").exists():
        convert(llama_1b(), out, dtype=dtype)
    return out


def in_process(path: Path) -> tuple[float, float]:
    """(mlx_lm.load seconds, median decode tokens/s of mlx_lm's stream_generate)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import stream_generate

    mx.set_memory_limit(32 << 30)  # as the daemon's residency caps its worker

    start = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(path))
    load_s = time.perf_counter() - start
    tps = []
    for _ in range(REPEAT):
        *_, last = stream_generate(model, tokenizer, PROMPT, max_tokens=TOKENS)
        tps.append(last.generation_tps)
    return load_s, statistics.median(tps)


def torch_decode(src: Path, dtype: str) -> float:
    """transformers' greedy ``generate`` on the source checkpoint (the GPU if torch sees one): median decode
    tokens/s, the prefill taken out by timing 1 and ``TOKENS`` new tokens from the same prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=getattr(torch, dtype)).to(device).eval()
    ids = AutoTokenizer.from_pretrained(src)(PROMPT, return_tensors="pt").input_ids.to(device)

    def run(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(TOKENS)  # warm-up
    tps = []
    for _ in range(REPEAT):
        one, full = run(1), run(TOKENS)
        tps.append((TOKENS - 1) / (full - one))
    return statistics.median(tps)


def through_daemon(path: Path) -> tuple[float, float, float]:
    """(LoadModel seconds, median daemon-reported decode tokens/s, median client-side tokens/s)."""
    from mlxd_client import Client

    address = f"unix://{tempfile.mkdtemp()}/mlxd.sock"
    proc = start_daemon(address)
    try:
        with Client(address, autostart=False) as c:
            start = time.perf_counter()
            c.load_model(path)
            load_s = time.perf_counter() - start
            tps, wall = [], []
            for _ in range(REPEAT):
                start = time.perf_counter()
                r = c.generate(path, PROMPT, max_tokens=TOKENS)
                wall.append((r.generation_tokens + 1) / (time.perf_counter() - start))  # + the first token
                tps.append(r.generation_tokens_per_second)
            return load_s, statistics.median(tps), statistics.median(wall)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama (a quick check, not a benchmark)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="also transformers' generate on the source checkpoint")
    a = parser.parse_args()
    tiny = a.tiny
    path = model_dir(tiny, a.dtype)
    from mlxd_daemon.archs import decoder

    start = time.perf_counter()
    decoder.load(path)
    mlxd_load = time.perf_counter() - start
    lm_load, lm_tps = in_process(path)
    d_load, d_tps, d_wall = through_daemon(path)
    print(f"# Generate vs mlx_lm.generate ({'tiny llama' if tiny else 'Llama-3.2-1B shape'}, {a.dtype}; {machine()})")
    print(f"load: decoder.load {mlxd_load:.2f}s, mlx_lm.load {lm_load:.2f}s, daemon LoadModel {d_load:.2f}s")
    print(f"decode tokens/s: mlx_lm.generate {lm_tps:.1f}, daemon Generate {d_tps:.1f} ({d_tps / lm_tps:.2f}x), "
          f"client-side end to end {d_wall:.1f}")  # fmt: skip
    if a.torch and not tiny:
        from convert import llama_1b

        t_tps = torch_decode(llama_1b(), a.dtype)
        print(f"transformers generate (greedy, {a.dtype}): {t_tps:.1f} tok/s; Generate / torch {d_tps / t_tps:.2f}x")


if __name__ == "__main__":
    main()
