"""Convert benchmark: mlxd's converter against a plain copy of the same bytes (+ fsync), in one run.

Prints seconds, peak RSS and the ratio to the copy baseline for the ViT-B/32 CLIP checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_clip, machine


def plain_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return time.perf_counter() - start


def mlxd_convert(src: Path, dst: Path, dtype: str, extra: str = "") -> tuple[float, float]:
    """Run the converter in a fresh process so peak RSS is the conversion's own."""
    code = (
        "import json,sys,time; from pathlib import Path; from mlxd_daemon.convert import convert; "
        "from mlxd_daemon.malloc import peak_rss_bytes; "
        f"t=time.perf_counter(); convert(Path({str(src)!r}), Path({str(dst)!r}), dtype={dtype!r}{extra}); "
        "print(json.dumps([time.perf_counter()-t, peak_rss_bytes()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    seconds, rss = __import__("json").loads(out.strip().splitlines()[-1])
    return seconds, rss


def main() -> None:
    src = base_clip()
    size = sum(f.stat().st_size for f in src.iterdir())
    print(f"convert benchmark: ViT-B/32 CLIP ({size / 1e6:.0f} MB float32), {machine()}")
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        copy_s = plain_copy(src, Path(tmp) / "copy")
        print(f"{'plain copy + fsync (baseline)':<34} {copy_s:7.2f} s")
        for label, dtype, extra in [
            ("mlxd convert float32", "float32", ""),
            ("mlxd convert float16", "float16", ""),
            ("mlxd convert bfloat16", "bfloat16", ""),
            ("mlxd convert q4 g64", "float32", ", quantize=True, q_bits=4"),
        ]:
            seconds, rss = mlxd_convert(src, Path(tmp) / label.replace(" ", "-"), dtype, extra)
            print(f"{label:<34} {seconds:7.2f} s  {seconds / copy_s:5.2f}x copy  peak RSS {rss / 1e6:6.0f} MB")


if __name__ == "__main__":
    main()
