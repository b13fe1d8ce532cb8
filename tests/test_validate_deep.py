"""Per-layer validation through the daemon: a correct conversion passes, and a fault is located by layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlxd_client import Client
from safetensors.torch import load_file, save_file


def edit_weights(mlx_dir: Path, edit: object) -> None:
    """Apply ``edit(tensors)`` to the converted safetensors, keeping their metadata (layout records)."""
    from safetensors import safe_open

    path = mlx_dir / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)  # type: ignore[operator]
    save_file(tensors, path, metadata=metadata)


@pytest.fixture()
def converted(client: Client, tiny_clip: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "mlx"
    client.convert(tiny_clip, dst)
    return dst


class TestLocalisation:
    def test_correct_conversion_passes_every_layer(self, client: Client, tiny_clip: Path, converted: Path) -> None:
        """Every text and vision layer is paired with its PyTorch module and within tolerance."""
        report = client.validate(converted, tiny_clip)
        assert report.passed and report.first_divergent_layer == ""
        names = [layer.name for layer in report.layers]
        assert names == [
            "text_model.embeddings", "text_model.encoder.layers.0", "text_model.encoder.layers.1",
            "vision_model.embeddings", "vision_model.encoder.layers.0", "vision_model.encoder.layers.1",
        ]  # fmt: skip
        assert all(layer.passed and layer.rel_error < 1e-5 for layer in report.layers)
        assert report.band == "float32"
        summary = json.loads((converted / "mlxd_manifest.json").read_text())["validation"]
        assert summary["passed"] is True and summary["report"] == "validation.json" and summary["min_cosine"] > 0.9999

    def test_perturbed_projection_names_its_layer(self, client: Client, tiny_clip: Path, converted: Path) -> None:
        """Scaling layer 1's q_proj in the vision tower fails validation and names vision layer 1."""

        def scale(t: dict) -> None:  # type: ignore[type-arg]
            t["vision_model.encoder.layers.1.self_attn.q_proj.weight"] *= 3

        edit_weights(converted, scale)
        report = client.validate(converted, tiny_clip)
        assert not report.passed
        assert report.first_divergent_layer == "vision_model.encoder.layers.1"
        by_name = {layer.name: layer for layer in report.layers}
        assert by_name["vision_model.encoder.layers.0"].passed
        assert all(layer.passed for layer in report.layers if layer.name.startswith("text_model"))

    def test_swapped_layers_name_the_first(self, client: Client, tiny_clip: Path, converted: Path) -> None:
        """Swapping text layers 0 and 1 names text layer 0, the first of them."""

        def swap(t: dict) -> None:  # type: ignore[type-arg]
            for key in [k for k in t if k.startswith("text_model.encoder.layers.0.")]:
                other = key.replace("layers.0.", "layers.1.")
                t[key], t[other] = t[other], t[key]

        edit_weights(converted, swap)
        report = client.validate(converted, tiny_clip)
        assert not report.passed
        assert report.first_divergent_layer == "text_model.encoder.layers.0"
        saved = json.loads((converted / "validation.json").read_text())
        assert saved["first_divergent_layer"] == "text_model.encoder.layers.0"

    def test_plot_and_json(self, daemon: object, tiny_clip: Path, converted: Path, tmp_path: Path) -> None:
        """mlxctl validate --plot writes a PNG and --json carries the layers and the first divergent layer."""
        png = tmp_path / "report.png"
        env = {"MLXD_ADDRESS": daemon.address}  # type: ignore[attr-defined]
        import os

        proc = subprocess.run([sys.executable, "-m", "mlxd_client.cli", "--json", "validate", str(converted),
                               "--reference", str(tiny_clip), "--plot", str(png)],
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(out["layers"]) == 6 and out["first_divergent_layer"] == ""


class TestUserInputs:
    def test_npz_inputs_replace_golden_ones(self, client: Client, tiny_clip: Path, converted: Path,
                                            tmp_path: Path) -> None:  # fmt: skip
        """An .npz of input_ids/attention_mask is used instead of the golden texts; unknown names are refused."""
        import numpy as np
        from mlxd_client.errors import InvalidArgumentError

        ids = np.array([[49406, 320, 1125, 49407], [49406, 320, 49407, 49407]], dtype=np.int64) % 600
        ids[:, 0], ids[0, 3], ids[1, 2:] = 598, 599, 599  # bos/eos of the tiny vocabulary
        npz = tmp_path / "inputs.npz"
        np.savez(npz, input_ids=ids, attention_mask=np.array([[1, 1, 1, 1], [1, 1, 1, 0]]))
        report = client.validate(converted, tiny_clip, inputs_npz=npz)
        assert report.passed and report.num_texts == 2  # the file's two rows, not the six golden texts
        text = next(o for o in report.outputs if o.name == "text_last_hidden_state")
        assert text.passed
        np.savez(npz, not_an_input=np.zeros(3))
        with pytest.raises(InvalidArgumentError) as err:
            client.validate(converted, tiny_clip, inputs_npz=npz)
        assert err.value.reason == "BAD_INPUTS"
