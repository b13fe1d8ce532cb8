"""Checkpoints holding NaN/Inf weights: Convert and Quantize list each such tensor (count, first index) in the
result and the manifest, ``strict`` refuses them with INVALID_ARGUMENT / NON_FINITE_WEIGHTS leaving nothing, and
Validate reports the poisoned outputs as failed checks naming the first layer with NaN/Inf, never INTERNAL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlxd_client import Client
from mlxd_client.discovery import is_serving
from mlxd_client.errors import MlxdClientError
from safetensors.torch import load_file, save_file

POISONED = "vision_model.encoder.layers.1.self_attn.q_proj.weight"


def poisoned_clip(tiny_clip: Path, root: Path, value: float, at: tuple[int, int]) -> Path:
    """A copy of the tiny CLIP whose vision layer 1 q_proj holds ``value`` at ``at`` (and once more further on)."""
    src = root / f"clip-{value}"
    shutil.copytree(tiny_clip, src)
    weights = load_file(src / "model.safetensors")
    weights[POISONED][at] = value
    weights[POISONED][-1, -1] = value
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module")
def nan_clip(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return poisoned_clip(tiny_clip, tmp_path_factory.mktemp("nan"), float("nan"), (3, 5))


@pytest.fixture(scope="module")
def inf_clip(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return poisoned_clip(tiny_clip, tmp_path_factory.mktemp("inf"), float("inf"), (2, 7))


class TestNonFiniteWeights:
    def test_float32_nan_listed(self, client: Client, nan_clip: Path, tmp_path: Path) -> None:
        """fp32 with NaN: converted, and the tensor is listed with its count and first index (result, manifest)."""
        result = client.convert(nan_clip, tmp_path / "out")
        [bad] = result.non_finite
        assert (bad.name, bad.nan_count, bad.inf_count, list(bad.first_index)) == (POISONED, 2, 0, [3, 5])
        manifest = json.loads((tmp_path / "out" / "mlxd_manifest.json").read_text())
        assert manifest["non_finite"] == [{"name": POISONED, "nan": 2, "inf": 0, "first_index": [3, 5]}]

    def test_q4_inf_listed_with_its_group(self, client: Client, inf_clip: Path, tmp_path: Path) -> None:
        """Quantizing a group that holds Inf (q4, g32): listed the same way, naming the spoiled group."""
        result = client.convert(inf_clip, tmp_path / "q4", q_bits=4, q_group_size=32)
        [bad] = result.non_finite
        assert (bad.name, bad.nan_count, bad.inf_count, list(bad.first_index)) == (POISONED, 0, 2, [2, 7])
        assert "group 0 of row 2" in bad.note
        [layer] = [x for x in result.layer_reports if x.name == POISONED.removesuffix(".weight")]
        assert layer.bits == 4 and not layer.HasField("rel_error")  # not measurable, so not claimed
        assert all(x.HasField("rel_error") for x in result.layer_reports if x.bits and x.name != layer.name)

    def test_quantize_rpc_lists_them_too(self, client: Client, nan_clip: Path, tmp_path: Path) -> None:
        """Quantize of an MLX directory whose weights hold NaN: the same report."""
        client.convert(nan_clip, tmp_path / "mlx")
        result = client.quantize(tmp_path / "mlx", tmp_path / "q4", bits=4, group_size=32)
        assert [b.name for b in result.non_finite] == [POISONED]

    @pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "q4"])
    def test_strict_refuses(self, client: Client, nan_clip: Path, inf_clip: Path, tmp_path: Path,
                            quantized: bool) -> None:  # fmt: skip
        """strict: INVALID_ARGUMENT / NON_FINITE_WEIGHTS naming the tensor; nothing left; daemon serving."""
        options = {"q_bits": 4, "q_group_size": 32} if quantized else {}
        for src in (nan_clip, inf_clip):
            with pytest.raises(MlxdClientError) as err:
                client.convert(src, tmp_path / "out", strict=True, **options)
            assert (err.value.code, err.value.reason) == ("INVALID_ARGUMENT", "NON_FINITE_WEIGHTS")
            assert err.value.metadata["tensors"] == POISONED and POISONED in err.value.message
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if ".mlxd-" in p.name]
        assert is_serving(client.address)


class TestValidateNonFinite:
    def test_failed_check_names_output_and_layer(self, client: Client, nan_clip: Path, tmp_path: Path) -> None:
        """Validate of a model whose weights hold NaN: a report (not INTERNAL) that fails every output the NaN
        reaches, names the first layer holding NaN and leaves matching agreement unmeasured."""
        client.convert(nan_clip, tmp_path / "out")
        report = client.validate(tmp_path / "out", nan_clip)
        assert not report.passed
        assert report.first_divergent_layer == "vision_model.encoder.layers.1"
        image = next(o for o in report.outputs if o.name == "image_embeds")
        assert not image.passed and image.note.startswith("non-finite values")
        assert "first layer with NaN/Inf: vision_model.encoder.layers.1" in image.note
        assert next(o for o in report.outputs if o.name == "text_embeds").passed  # the text tower is untouched
        assert not report.HasField("matching_agreement")
        saved = json.loads((tmp_path / "out" / "mlxd_manifest.json").read_text())["validation"]
        assert saved["passed"] is False and saved["worst_output"] in {o.name for o in report.outputs if not o.passed}
