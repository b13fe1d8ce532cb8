"""`make demo`: build the default CLIP, start a daemon, convert -> validate -> infer with mlxctl, print results.

The default model is the openai/clip-vit-base-patch32 *architecture* with random weights from a fixed seed
(nothing can be downloaded here), plus a real BPE tokenizer trained offline. Its embeddings are therefore
not semantically meaningful, but conversion, validation against PyTorch and serving are exactly what a real
checkpoint gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
TEXTS = ["a photo of a cat", "a red circle on a gradient", "a blue square"]


def mlxctl(*args: str, env: dict[str, str]) -> None:
    print(f"\n$ mlxctl {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "mlxd_client.cli", *args], env=env)
    if proc.returncode != 0:
        sys.exit(proc.returncode)


def main() -> None:
    from mlxd_daemon.fixtures import golden_images, make_clip

    hf = DEMO / "hf-clip-vit-base-patch32"
    if not (hf / "config.json").exists():
        print(f"building the default model (ViT-B/32 CLIP architecture, seed 0) in {hf} ...", flush=True)
        make_clip(hf, size="base", seed=0)
    images = []
    for i, image in enumerate(golden_images(2, size=256)):
        path = DEMO / f"image{i}.png"
        image.save(path)
        images.append(str(path))

    with tempfile.TemporaryDirectory(prefix="mlxd-demo-") as run:
        env = {**os.environ, "MLXD_ADDRESS": f"unix://{run}/mlxd.sock"}
        try:
            mlxctl("daemon", "start", env=env)
            mlxctl("convert", str(hf), str(DEMO / "mlx-clip"), "--overwrite", env=env)
            mlxctl("validate", str(DEMO / "mlx-clip"), "--reference", str(hf), env=env)
            text_args = [a for t in TEXTS for a in ("--text", t)]
            image_args = [a for p in images for a in ("--image", p)]
            mlxctl("infer", str(DEMO / "mlx-clip"), *text_args, *image_args, env=env)
            mlxctl("daemon", "status", env=env)
        finally:
            subprocess.run([sys.executable, "-m", "mlxd_client.cli", "daemon", "stop"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
