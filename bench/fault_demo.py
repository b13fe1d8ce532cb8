"""Reproduces the README's per-layer validation figure: inject a fault into a converted ViT-B/32 CLIP
(vision layer 7's q_proj scaled by 1.5), validate it against PyTorch and plot the error per layer.

Run after `make demo` (it reuses .demo/): .venv/bin/python bench/fault_demo.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from mlxd_daemon.blas import preload

    preload()
    from mlxd_client.plot import plot_layers
    from mlxd_daemon.validate import validate_model
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src, good = ROOT / ".demo/hf-clip-vit-base-patch32", ROOT / ".demo/mlx-clip"
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "mlx-clip-fault"
        shutil.copytree(good, bad)
        weights = bad / "model.safetensors"
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(weights)
        tensors["vision_model.encoder.layers.7.self_attn.q_proj.weight"] *= 1.5
        save_file(tensors, weights, metadata=metadata)
        report = validate_model(src, bad)
    print(json.dumps({k: report[k] for k in ("passed", "first_divergent_layer", "band")}))
    for layer in report["layers"]:
        print(f"{layer['name']:<34} {layer['rel_error']:.2e} {'ok' if layer['passed'] else 'OVER'}")
    print("wrote", plot_layers(report, ROOT / "docs/validation-example.png"))


if __name__ == "__main__":
    main()
