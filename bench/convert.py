"""Convert benchmark, every ratio against baselines measured in the same run:

1. Llama-3.2-1B-shaped checkpoint (1.24B parameters, bf16, 1 GB shards; random weights, built once into
   .demo/): the plain-copy floor (copy the shard bytes + fsync), `mlx_lm.convert` and mlxd, to float16 and to
   q4 g64: wall time and peak RSS (VmHWM of a fresh process each), and mlxd's profile: thread-seconds per phase
   of its block pipeline (read, NaN/Inf scan, cast or quantize, quantization-error sample, write; summed over
   its worker threads, so they add up to more than the wall time when the cores overlap), the wall time of the
   weights and of the final fsync + rename. `mlx_lm.convert` does not fsync what it wrote; mlxd does (so a
   second mlx_lm row adds the fsync of its output, timed after its clock stops). Every side reads the source
   from the page cache (it is read once before the floor). A second floor writes the same number of bytes from
   memory + fsync (the disk alone: a float16 output is as large as the bf16 source). Each side's
   modules are imported before its clock starts (mlx_lm.convert; mlxd's convert, mlx_lm and the route's arch).
2. ViT-B/32 CLIP (float32 safetensors): mlxd to float32 / float16 / bfloat16 / q4 against the copy floor.

`--llama-only` / `--clip-only` run one part; MLXD_BENCH_ROUNDS (default 3) sets the Llama rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, base_clip, machine, spread

PEAK = "from mlxd_daemon.malloc import peak_rss_bytes as _peak"
MLXD = (
    PEAK
    + """
import json, sys, time
from pathlib import Path
from mlxd_daemon.convert import convert
from mlxd_daemon.quantize import QuantOptions
opts = json.loads(sys.argv[4])
q = opts.pop("quantize", None)
# Imported before the clock starts, as the mlx_lm side imports mlx_lm.convert (a daemon's worker has them warm).
import mlx_lm.utils
from mlxd_daemon import archs
archs.get_arch(json.loads((Path(sys.argv[1]) / "config.json").read_text())["model_type"])
t = time.perf_counter()
r = convert(Path(sys.argv[1]), Path(sys.argv[2]), dtype=sys.argv[3], quantize=QuantOptions(**q) if q else None, **opts)
print(json.dumps([time.perf_counter() - t, _peak(), r["phases"]]))
"""
)
MLX_LM = (
    PEAK
    + """
import json, sys, time
from mlx_lm.convert import convert
import os
from pathlib import Path
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], **json.loads(sys.argv[4]))
seconds = time.perf_counter() - t
for f in Path(sys.argv[2]).iterdir():  # what mlx_lm leaves to the page cache, made durable as mlxd's output is
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
print(json.dumps([seconds, _peak(), {"fsync": time.perf_counter() - t - seconds}]))
"""
)


def llama_1b() -> Path:
    from mlxd_daemon.fixtures.llama import make_llama

    path = CACHE / "hf-llama-1b-bf16"
    if not (path / "config.json").exists():
        print(f"building the Llama-3.2-1B-shaped bf16 checkpoint in {path} (once) ...", flush=True)
        make_llama(path, size="1b", dtype="bfloat16", seed=0, max_shard_size=1 << 30)
    return path


def plain_copy(src: Path, dst: Path) -> float:
    for f in src.iterdir():  # every side reads the source from the page cache, the floor too
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    start = time.perf_counter()
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return time.perf_counter() - start


def write_floor(nbytes: int, dst: Path) -> float:
    """Writing ``nbytes`` from memory (16 MB pwrites of non-zero bytes) + fsync: what any converter that makes
    its output durable pays for the disk alone, with no reading or converting."""
    block = os.urandom(16 << 20)
    start = time.perf_counter()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, nbytes, len(block)):
            os.pwrite(fd, block[: nbytes - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    dst.unlink()
    return seconds


def run(script: str, src: Path, dst: Path, dtype: str, options: dict[str, object]) -> tuple[float, float, dict]:
    """(seconds, peak RSS bytes, mlxd's phases) of one conversion in a fresh process."""
    out = subprocess.run([sys.executable, "-c", script, str(src), str(dst), dtype, json.dumps(options)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    seconds, peak, phases = json.loads(out.strip().splitlines()[-1])
    return seconds, peak, phases


def profile(phases: dict[str, float]) -> str:
    """mlxd's per-phase profile as one line."""
    busy = ", ".join(f"{k} {phases[k]:.2f}" for k in ("read", "scan", "convert", "error", "write") if k in phases)
    return (f"{'':<30} thread-s: {busy}; walls: weights {phases['weights_wall']:.2f} s, "
            f"fsync + rename {phases['sync_wall']:.2f} s")  # fmt: skip


def row(label: str, seconds: float, peak: float, floor: float, other: tuple[float, float] | None = None) -> str:
    text = f"{label:<30} {seconds:7.2f} s {seconds / floor:6.2f}x copy  peak RSS {peak / 1e6:6.0f} MB"
    if other:
        text += f"   vs mlx_lm: {other[0] / seconds:4.2f}x faster, {peak / other[1]:4.2f}x the RSS"
    return text


def llama_section(rounds: int) -> None:
    """``rounds`` interleaved rounds (floor, then each side of each target), each output deleted once measured;
    medians with p10/p90 of the seconds, and ratios of the medians."""
    src = llama_1b()
    size = sum(f.stat().st_size for f in src.iterdir())
    print(f"\nLlama-3.2-1B shape, 1.24B parameters, {size / 1e9:.2f} GB bf16 in 1 GB shards, {rounds} rounds")
    targets = [
        ("float16", "float16", {}, {}),
        ("q4 g64", "bfloat16", {"quantize": True, "q_bits": 4, "q_group_size": 64},
         {"quantize": {"bits": 4, "group_size": 64}}),
    ]  # fmt: skip
    runs: dict[str, list[tuple[float, float, dict]]] = {}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for _ in range(rounds):
            runs.setdefault("floor", []).append((plain_copy(src, Path(tmp) / "copy"), 0.0, {}))
            shutil.rmtree(Path(tmp) / "copy")
            runs.setdefault("write", []).append((write_floor(size, Path(tmp) / "write"), 0.0, {}))
            for label, dtype, lm_opts, mlxd_opts in targets:
                for side, script, opts in (("mlx_lm", MLX_LM, lm_opts), ("mlxd", MLXD, mlxd_opts)):
                    out = Path(tmp) / f"{side}-{label}"
                    runs.setdefault(f"{side} {label}", []).append(run(script, src, out, dtype, opts))
                    shutil.rmtree(out)
    med = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    peak = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    floor = med["floor"]
    print(f"{'plain copy + fsync (floor)':<30} {floor:7.2f} s   {spread([r[0] for r in runs['floor']])}")
    print(f"{'write same bytes + fsync':<30} {med['write']:7.2f} s   {spread([r[0] for r in runs['write']])}")
    for label, *_ in targets:
        lm, ours = f"mlx_lm {label}", f"mlxd {label}"
        durable = statistics.median(r[0] + r[2]["fsync"] for r in runs[lm])
        print(row(f"mlx_lm.convert {label}", med[lm], peak[lm], floor) + f"   {spread([r[0] for r in runs[lm]])}")
        print(row("  + fsync of its output", durable, peak[lm], floor))
        print(row(f"mlxd convert {label}", med[ours], peak[ours], floor, (med[lm], peak[lm]))
              + f"   {spread([r[0] for r in runs[ours]])}")  # fmt: skip
        print(f"{'':<30} vs mlx_lm + fsync: {durable / med[ours]:4.2f}x faster")
        print(profile(min(runs[ours], key=lambda r: abs(r[0] - med[ours]))[2]))


def clip_section() -> None:
    src = base_clip()
    size = sum(f.stat().st_size for f in src.iterdir())
    print(f"\nViT-B/32 CLIP, {size / 1e6:.0f} MB float32")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        floor = plain_copy(src, Path(tmp) / "copy")
        print(f"{'plain copy + fsync (floor)':<30} {floor:7.2f} s")
        for label, dtype, opts in [("float32", "float32", {}), ("float16", "float16", {}),
                                   ("bfloat16", "bfloat16", {}),
                                   ("q4 g64", "float32", {"quantize": {"bits": 4}})]:  # fmt: skip
            print(row(f"mlxd convert {label}", *run(MLXD, src, Path(tmp) / label, dtype, opts)[:2], floor))


def main() -> None:
    print(f"convert benchmark, {machine()}")
    if "--clip-only" not in sys.argv:
        llama_section(int(os.environ.get("MLXD_BENCH_ROUNDS", "3")))
    if "--llama-only" not in sys.argv:
        clip_section()


if __name__ == "__main__":
    main()
