"""Exported programs (torch.export -> MLX) vs PyTorch eager vs the hand-written MLX modules, CLIP and BERT.

    python bench/export_programs.py [--base]      # prepares models under .demo/bench-export, prints a table

Each side runs in its own process: MLX after ``blas.preload()`` (OpenBLAS), torch with as many threads as cores.
Inputs: CLIP texts [B, 16] + images [B, 3, S, S], BERT texts [B, 16]; B = 8. Median of 5 runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, base_clip, machine, timeit

OUT = CACHE / "bench-export"
BATCH, SEQ = 8, 16


def inputs(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    text = config.get("text_config", config)
    ids = rng.integers(0, text.get("vocab_size", 99), size=(BATCH, SEQ)).astype(np.int64)
    mask = np.ones((BATCH, SEQ), np.int64)
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((BATCH, SEQ), np.int64)}
    size = config["vision_config"].get("image_size", 224)
    pixels = rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def prepare(base: bool) -> list[dict[str, Any]]:
    """HF dirs, hand-written conversions and exported programs for each model."""
    import torch
    import transformers
    from mlxd_daemon.convert import convert
    from mlxd_daemon.export import export_program
    from mlxd_daemon.fixtures import make_clip
    from mlxd_daemon.fixtures.bert import make_bert

    models = [("clip-tiny", "clip", OUT / "hf-clip-tiny"), ("bert-tiny", "bert", OUT / "hf-bert-tiny")]
    if base:
        models.append(("clip-base", "clip", base_clip()))
    rows = []
    for name, kind, hf in models:
        if not (hf / "config.json").exists():
            (make_clip(hf, size="tiny") if kind == "clip" else make_bert(hf))
        config = json.loads((hf / "config.json").read_text())
        handwritten, program = OUT / f"mlx-{name}", OUT / f"program-{name}"
        if not handwritten.exists():
            convert(hf, handwritten)
        if not program.exists():
            cls = transformers.CLIPModel if kind == "clip" else transformers.BertModel
            model = cls.from_pretrained(str(hf), dtype=torch.float32).eval()
            example = {k: torch.from_numpy(v) for k, v in inputs(kind, config).items()}
            result = export_program(model, program, example_inputs=example)
            print(f"exported {name}: {result['ops_mapped']}/{result['ops_seen']} ops in {result['seconds']} s")
        rows.append({"name": name, "kind": kind, "hf": str(hf), "mlx": str(handwritten), "program": str(program)})
    return rows


def time_mlx(row: dict[str, Any]) -> dict[str, float]:
    from mlxd_daemon import blas

    blas.preload()
    from mlxd_daemon.archs import get_arch, mlxd_program

    x = inputs(row["kind"], json.loads((Path(row["hf"]) / "config.json").read_text()))
    program = mlxd_program.load(Path(row["program"]))
    handwritten = get_arch(row["kind"]).load(Path(row["mlx"]))
    return {
        "program": timeit(lambda: program.run(x)),
        "handwritten": timeit(lambda: handwritten.forward_outputs(**x)),
    }


def time_torch(row: dict[str, Any]) -> dict[str, float]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    cls = transformers.CLIPModel if row["kind"] == "clip" else transformers.BertModel
    model = cls.from_pretrained(row["hf"], dtype=torch.float32).eval()
    x = {k: torch.from_numpy(v) for k, v in inputs(row["kind"], json.loads((Path(row["hf"]) / "config.json")
                                                                           .read_text())).items()}  # fmt: skip

    def run() -> None:
        with torch.no_grad():
            model(**x)

    return {"torch": timeit(run)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", action="store_true", help="also the ViT-B/32 CLIP (random weights)")
    parser.add_argument("--worker", choices=["mlx", "torch"])
    parser.add_argument("--row")
    args = parser.parse_args()
    if args.worker:
        row = json.loads(args.row)
        print(json.dumps(time_mlx(row) if args.worker == "mlx" else time_torch(row)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    rows = prepare(args.base)
    print(f"{machine()}; batch {BATCH}, seq {SEQ}; median of 5 (seconds)")
    print(f"{'model':<10} {'torch eager':>12} {'MLX program':>12} {'MLX hand-written':>17}")
    for row in rows:
        times: dict[str, float] = {}
        for worker in ("torch", "mlx"):
            cmd = [sys.executable, __file__, "--worker", worker, "--row", json.dumps(row)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times.update(json.loads(out.strip().splitlines()[-1]))
        print(f"{row['name']:<10} {times['torch']:>12.4f} {times['program']:>12.4f} {times['handwritten']:>17.4f}")


if __name__ == "__main__":
    main()
