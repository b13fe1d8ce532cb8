"""Exported programs take their inputs from the model and serve any batch and length: derived example inputs,
symbolic dims in program.json, one conversion at many shapes, errors that name what to pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zoo
from mlxd_client import Client
from mlxd_client.errors import MlxdClientError
from mlxd_daemon.archs import mlxd_program
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.export import export_program
from mlxd_daemon.validate import TOLERANCES

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
HIDDEN = TOLERANCES["float32"]["hidden"]


def entry(name: str) -> zoo.Entry:
    return next(e for e in zoo.ZOO if e.name == name)


@pytest.fixture(scope="module")
def roberta(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny RoBERTa directory (128 positions) and its program, exported once."""
    root = tmp_path_factory.mktemp("roberta")
    src = zoo.build(entry("roberta"), root)
    export_program(src, root / "mlx")
    return src, root / "mlx"


def text(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def reference(src: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import transformers

    model = transformers.RobertaModel.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


class TestDynamicShapes:
    def test_dims_are_recorded(self, roberta: tuple[Path, Path]) -> None:
        """Batch and sequence are symbolic in program.json, the sequence capped at the model's positions."""
        spec = json.loads((roberta[1] / "program.json").read_text())
        shapes = {i["name"]: i["shape"] for i in spec["inputs"]}
        assert shapes == {key: ["batch", "seq"] for key in ("input_ids", "attention_mask", "token_type_ids")}
        assert spec["dims"]["batch"]["min"] == 1
        assert spec["dims"]["seq"]["max"] <= 128
        assert spec["outputs"][0]["shape"] == ["batch", "seq", 32]

    @pytest.mark.parametrize(("batch", "seq"), [(1, 4), (3, 100), (16, 4), (16, 100), (1, 100), (3, 4)])
    def test_one_conversion_serves_many_shapes(self, roberta: tuple[Path, Path], batch: int, seq: int) -> None:
        """Batch 1, 3 and 16 at lengths 4 and 100 from one program, each equal to PyTorch within the band."""
        src, mlx = roberta
        rng = np.random.default_rng(batch * 1000 + seq)
        ids = rng.integers(3, 99, size=(batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, seq - seq // 4 :] = 0
        got = mlxd_program.load(mlx).run(text(ids, mask))["last_hidden_state"]
        np.testing.assert_allclose(got, reference(src, ids, mask), atol=HIDDEN.atol, rtol=HIDDEN.rtol)

    def test_shape_errors_name_the_dim(self, roberta: tuple[Path, Path]) -> None:
        """Past the model's maximum, or disagreeing batch sizes: BAD_INPUT_SHAPE naming the dim."""
        bundle = mlxd_program.load(roberta[1])
        with pytest.raises(InvalidArgument) as e:
            bundle.run(text(np.zeros((1, 500), np.int64), np.ones((1, 500), np.int64)))
        assert e.value.reason == "BAD_INPUT_SHAPE" and "seq" in str(e.value)
        with pytest.raises(InvalidArgument) as e:
            bundle.run(
                {**text(np.zeros((2, 5), np.int64), np.ones((2, 5), np.int64)), "attention_mask": np.ones((3, 5))}
            )
        assert e.value.reason == "BAD_INPUT_SHAPE" and "batch" in str(e.value)

    def test_daemon_validates_at_two_shapes_and_runs_others(self, client: Client, roberta: tuple[Path, Path]) -> None:
        """Validate compares at the captured shape and another; Run serves a third shape over gRPC."""
        src, mlx = roberta
        report = client.validate(mlx, src)
        assert report.passed and {"last_hidden_state", "last_hidden_state@random"} <= {o.name for o in report.outputs}
        ids = np.arange(3, 3 + 5 * 7).reshape(5, 7).astype(np.int64) % 99
        out = client.run(mlx, text(ids, np.ones_like(ids)))
        ref = reference(src, ids, np.ones_like(ids))
        np.testing.assert_allclose(out["last_hidden_state"], ref, atol=HIDDEN.atol, rtol=HIDDEN.rtol)

    def test_quantized_program_validates_in_its_band(self, client: Client, roberta: tuple[Path, Path],
                                                     tmp_path: Path) -> None:  # fmt: skip
        """Quantize works on an exported program (Linear and Embedding weights, the same report as hand-written
        archs); the q8 program still serves other shapes and validates in the q8 band."""
        src, mlx = roberta
        result = client.quantize(mlx, tmp_path / "q8", bits=8, group_size=32)
        assert any("word_embeddings" in name for name in result.quantized_layers)
        assert any("attention" in name for name in result.quantized_layers) and result.bits_per_weight > 8
        report = client.validate(tmp_path / "q8", src)
        assert (report.passed, report.band) == (True, "q8")


class TestDerivedInputs:
    @pytest.mark.parametrize(("name", "input_name", "shape"), [
        ("resnet", "pixel_values", ["batch", 3, 32, 32]),  # no image_size: the processor's size
        ("regnet", "pixel_values", ["batch", 3, 224, 224]),  # no processor either: the architecture default
        ("wav2vec2", "input_values", ["batch", "samples"]),  # raw audio
        ("whisper", "input_features", ["batch", 16, 100]),  # log-mel window
    ])  # fmt: skip
    def test_inputs_come_from_the_model(self, name: str, input_name: str, shape: list[object], tmp_path: Path) -> None:
        """Each model's main input is derived from its processor, config or architecture default."""
        src = zoo.build(entry(name), tmp_path)
        result = export_program(src, tmp_path / "mlx")
        assert {i["name"]: i["shape"] for i in result["inputs"]}[input_name] == shape

    def test_underivable_input_names_it_and_the_flag(self, client: Client, tmp_path: Path) -> None:
        """A model whose input cannot be derived: NO_EXAMPLE_INPUTS naming it and --input-spec; with the spec it
        converts and validates."""
        import transformers

        cfg = transformers.Speech2TextConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1,
                                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                             decoder_ffn_dim=37, input_feat_per_channel=16, conv_channels=16,
                                             max_source_positions=64, max_target_positions=64)  # fmt: skip
        torch.manual_seed(0)
        src = tmp_path / "s2t"
        transformers.Speech2TextModel(cfg).save_pretrained(src)
        with pytest.raises(MlxdClientError) as e:
            client.convert(src, tmp_path / "mlx")
        assert (e.value.code, e.value.reason) == ("INVALID_ARGUMENT", "NO_EXAMPLE_INPUTS")
        assert "input_features" in e.value.message and "--input-spec" in e.value.message
        assert not (tmp_path / "mlx").exists()
        spec = json.dumps([{"name": "input_features", "shape": [2, 32, 16], "dtype": "float32"}])
        client.convert(src, tmp_path / "mlx", input_spec=spec)
        assert client.validate(tmp_path / "mlx", src).passed
