"""Exported programs (torch.export -> MLX) vs the hand-written MLX modules vs PyTorch eager, ViT and BERT, per batch.

    python bench/export_programs.py [--batches 1 8 32] [--repeat 20]   # models under .demo/bench-export

One program per model, exported once from its Hugging Face directory with symbolic batch and length, serves every
batch size (the hand-written modules are shape-agnostic too). Each side runs in its own process: MLX after
``blas.preload()`` (OpenBLAS), torch with as many threads as cores. Inputs: BERT texts [B, 16], ViT images
[B, 3, S, S]. Per cell: median (p10-p90) milliseconds of ``--repeat`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, machine

OUT = CACHE / "bench-export"
SEQ = 16


def inputs(kind: str, config: dict[str, Any], batch: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    if kind == "bert":
        ids = rng.integers(0, config["vocab_size"], size=(batch, SEQ)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    size = config["image_size"]
    return {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def prepare() -> list[dict[str, Any]]:
    """HF dirs, hand-written conversions and (dynamic) exported programs for each model."""
    from mlxd_daemon.convert import convert
    from mlxd_daemon.export import export_program
    from mlxd_daemon.fixtures.bert import make_bert
    from mlxd_daemon.fixtures.vit import make_vit

    rows = []
    for name, kind, make in (("bert-tiny", "bert", make_bert), ("vit-tiny", "vit", make_vit)):
        hf, handwritten, program = OUT / f"hf-{name}", OUT / f"mlx-{name}", OUT / f"program-{name}"
        if not (hf / "config.json").exists():
            make(hf)
        if not handwritten.exists():
            convert(hf, handwritten)
        if not program.exists():
            result = export_program(hf, program)
            dims = {i["name"]: i["shape"] for i in result["inputs"]}
            print(f"exported {name}: {result['ops_mapped']} ops, inputs {dims} in {result['seconds']} s")
        rows.append({"name": name, "kind": kind, "hf": str(hf), "mlx": str(handwritten), "program": str(program)})
    return rows


def percentiles(fn: Callable[[], object], repeat: int) -> list[float]:
    """[median, p10, p90] of ``fn``'s wall time in milliseconds, after one warm-up call."""
    import numpy as np

    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return [float(v) for v in np.percentile(times, [50, 10, 90])]


def time_mlx(row: dict[str, Any], batches: list[int], repeat: int) -> dict[str, Any]:
    from mlxd_daemon import blas

    blas.preload()
    from mlxd_daemon.archs import get_arch, mlxd_program

    config = json.loads((Path(row["hf"]) / "config.json").read_text())
    program = mlxd_program.load(Path(row["program"]))
    handwritten = get_arch(row["kind"]).load(Path(row["mlx"]))
    out: dict[str, Any] = {}
    for b in batches:
        x = inputs(row["kind"], config, b)
        out[f"program/{b}"] = percentiles(lambda x=x: program.run(x), repeat)
        out[f"handwritten/{b}"] = percentiles(lambda x=x: handwritten.forward_outputs(**x), repeat)
    return out


def time_torch(row: dict[str, Any], batches: list[int], repeat: int) -> dict[str, Any]:
    import torch
    from mlxd_daemon.export.capture import load_hf

    torch.set_num_threads(os.cpu_count() or 1)
    config = json.loads((Path(row["hf"]) / "config.json").read_text())
    model = load_hf(Path(row["hf"]))
    out: dict[str, Any] = {}
    for b in batches:
        x = {k: torch.from_numpy(v) for k, v in inputs(row["kind"], config, b).items()}

        def run(x: dict[str, Any] = x) -> None:
            with torch.no_grad():
                model(**x)

        out[f"torch/{b}"] = percentiles(run, repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--worker", choices=["mlx", "torch"])
    parser.add_argument("--row")
    args = parser.parse_args()
    if args.worker:
        row = json.loads(args.row)
        fn = time_mlx if args.worker == "mlx" else time_torch
        print(json.dumps(fn(row, args.batches, args.repeat)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    rows = prepare()
    print(f"{machine()}; BERT seq {SEQ}; median (p10-p90) ms of {args.repeat} runs")
    print(f"{'model':<10} {'batch':>5} {'torch eager':>22} {'MLX program':>22} {'MLX hand-written':>22}")
    for row in rows:
        times: dict[str, Any] = {}
        for worker in ("torch", "mlx"):
            cmd = [sys.executable, __file__, "--worker", worker, "--row", json.dumps(row), "--repeat",
                   str(args.repeat), "--batches", *map(str, args.batches)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times.update(json.loads(out.strip().splitlines()[-1]))
        for b in args.batches:
            cells = [times[f"{side}/{b}"] for side in ("torch", "program", "handwritten")]
            text = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in cells]
            print(f"{row['name']:<10} {b:>5} {text[0]:>22} {text[1]:>22} {text[2]:>22}")


if __name__ == "__main__":
    main()
