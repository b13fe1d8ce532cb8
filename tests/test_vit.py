"""ViT: weight mapping, ViTImageProcessor parity, MLX vs transformers (classifier, ViTModel, bf16, .bin), convert +
validate, fault injection, and the daemon end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import mlx.core as mx
import numpy as np
import pytest
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError
from mlxd_daemon.archs import get_arch, vit
from mlxd_daemon.archs.image_processing import VitImageConfig, preprocess_images
from mlxd_daemon.convert import convert
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.fixtures import golden_images, make_vit
from mlxd_daemon.quantize import QuantOptions
from mlxd_daemon.taps import mlx_taps, torch_taps
from mlxd_daemon.validate import matching_agreement, validate_model

transformers = pytest.importorskip("transformers")
ATOL = 1e-4  # float32 on both sides: only summation order differs
LABELS = ["cat", "dog", "bird", "fish", "horse"]


def hf_pixels(model_dir: Path, images: list) -> np.ndarray:
    """transformers' ViTImageProcessor (its PIL backend here): the ground truth."""
    processor = transformers.ViTImageProcessor.from_pretrained(str(model_dir))
    return np.asarray(processor(images, return_tensors="np")["pixel_values"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViTForImageClassification (5 labels, float32 safetensors)."""
    return make_vit(tmp_path_factory.mktemp("vit") / "cls")


@pytest.fixture(scope="module")
def converted(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("vit-mlx") / "cls"
    convert(tiny, dst)
    return dst


class TestWeightMap:
    def test_names(self) -> None:
        """``vit.`` is stripped, transformers-5 in-memory names map to the saved ones, heads/mask are dropped."""
        cases = {
            "vit.encoder.layer.3.attention.attention.query.weight": "encoder.layer.3.attention.attention.query.weight",
            "vit.layers.3.attention.q_proj.weight": "encoder.layer.3.attention.attention.query.weight",
            "vit.layers.0.attention.o_proj.bias": "encoder.layer.0.attention.output.dense.bias",
            "layers.1.mlp.fc1.weight": "encoder.layer.1.intermediate.dense.weight",
            "vit.layers.1.mlp.fc2.weight": "encoder.layer.1.output.dense.weight",
            "vit.embeddings.patch_embeddings.projection.weight": vit.PATCH_WEIGHT,
            "classifier.weight": "classifier.weight",
            "pooler.dense.bias": "pooler.dense.bias",
            "vit.embeddings.mask_token": None,
            "decoder.0.weight": None,
        }
        assert {k: vit.map_weight(k) for k in cases} == cases
        mapped = [m for k in cases if (m := vit.map_weight(k)) is not None]
        assert [vit.map_weight(m) for m in mapped] == mapped  # a second pass is a no-op

    def test_registered(self) -> None:
        """``get_arch("vit")`` is this module."""
        assert get_arch("vit") is vit


class TestProcessor:
    def test_matches_vit_image_processor(self, tiny: Path) -> None:
        """RGB, RGBA, greyscale and odd-sized images give HF's pixels (max abs diff <= 1e-5)."""
        images = golden_images(8, 41)
        ours = preprocess_images(images, VitImageConfig.load(tiny, (32, 32)))
        theirs = hf_pixels(tiny, images)
        assert ours.shape == theirs.shape == (8, 3, 32, 32)
        assert float(np.abs(ours - theirs).max()) <= 1e-5

    @pytest.mark.parametrize(
        "extra", [{"resample": 3, "do_normalize": False}, {"do_rescale": False}, {"do_resize": False}]
    )
    def test_old_spelling_and_flags(self, extra: dict[str, object], tmp_path: Path) -> None:
        """``size: 24`` (old spelling), bicubic and each do_* flag off match HF (its defaults fill the rest)."""
        cfg = {"image_processor_type": "ViTImageProcessor", "size": 24, **extra}
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
        # RGB only: without do_convert_rgb HF fails on RGBA/greyscale; one 24x24 image when nothing resizes.
        images = [im.convert("RGB") for im in golden_images(3, 24 if "do_resize" in extra else 30)]
        images = images[:1] if "do_resize" in extra else images
        ours = preprocess_images(images, VitImageConfig.load(tmp_path, (24, 24)))
        assert float(np.abs(ours - hf_pixels(tmp_path, images)).max()) <= 1e-5


class TestParity:
    def test_classifier_matches_transformers(self, tiny: Path) -> None:
        """Logits, embeddings and hidden states equal transformers' (atol 1e-4); top-1 agreement is 1.0."""
        inputs = vit.golden_inputs(tiny, images=golden_images(8, 41))
        ours = vit.run_mlx(vit.load(tiny), inputs)
        ref = vit.run_reference(tiny, inputs)
        assert set(ours) == set(ref) == {"logits", "image_embeds", "last_hidden_state"}
        for name in ref:
            np.testing.assert_allclose(ours[name], ref[name], atol=ATOL, err_msg=name)
        hf = transformers.ViTForImageClassification.from_pretrained(str(tiny)).eval()
        import torch

        with torch.no_grad():
            hf_logits = hf(pixel_values=torch.from_numpy(inputs["pixel_values"])).logits.numpy()
        np.testing.assert_allclose(ours["logits"], hf_logits, atol=ATOL)
        assert matching_agreement(hf_logits, ours["logits"]) == 1.0  # top-1 agreement
        assert len(set(hf_logits.argmax(1))) > 1  # not one class for every image

    def test_embed(self, tiny: Path) -> None:
        """embed(images) gives unit-norm CLS embeddings, logits [n, labels] and id2label; texts are refused."""
        bundle = vit.load(tiny)
        out = bundle.embed([], golden_images(2, 40))
        assert out["labels"] == LABELS
        assert out["logits"].shape == (2, 5)
        np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=1), 1.0, atol=1e-6)
        assert (bundle.dtype, bundle.compute_dtype, bundle.quantization) == ("float32", "float32", None)
        assert bundle.nbytes > 0
        with pytest.raises(InvalidArgument) as e:
            bundle.embed(["a cat"], [])
        assert e.value.reason == "TEXTS_NOT_SUPPORTED"

    def test_vit_model_embeddings_only(self, tmp_path: Path) -> None:
        """A plain ViTModel serves image_embeds only; its pooler output matches transformers'."""
        src = make_vit(tmp_path / "base", classifier=False)
        bundle = vit.load(src)
        assert set(bundle.embed([], golden_images(1, 32))) == {"image_embeds"}
        inputs = vit.golden_inputs(src)
        ours, ref = vit.run_mlx(bundle, inputs), vit.run_reference(src, inputs)
        assert set(ours) == set(ref) == {"image_embeds", "last_hidden_state", "pooler_output"}
        for name in ref:
            np.testing.assert_allclose(ours[name], ref[name], atol=ATOL, err_msg=name)

    def test_taps_match_hf_module_paths(self, tiny: Path) -> None:
        """MLX tap names hook transformers' modules (``vit.embeddings``, ``vit.layers.N``) and agree per layer."""
        inputs = vit.golden_inputs(tiny)
        with mlx_taps() as tapped:
            vit.run_mlx(vit.load(tiny), inputs)
        with torch_taps(list(tapped)) as ref:
            vit.run_reference(tiny, inputs)
        assert list(tapped) == ["embeddings", "layers.0", "layers.1"] and set(ref) == set(tapped)
        for name, x in tapped.items():
            np.testing.assert_allclose(np.array(x), ref[name], atol=ATOL, err_msg=name)

    def test_bf16_source(self, tmp_path: Path) -> None:
        """A bfloat16 checkpoint loads as dtype bfloat16, computes in float32, and converts + validates
        in the float32 band (same weights on both sides)."""
        src = make_vit(tmp_path / "bf16", dtype="bfloat16")
        bundle = vit.load(src)
        assert bundle.dtype == "bfloat16"
        inputs = vit.golden_inputs(src)
        np.testing.assert_allclose(
            vit.run_mlx(bundle, inputs)["logits"], vit.run_reference(src, inputs)["logits"], atol=ATOL
        )
        convert(src, tmp_path / "mlx")
        report = validate_model(src, tmp_path / "mlx")
        assert report["passed"], report["outputs"]
        assert (report["dtype"], report["band"]) == ("bfloat16", "float32")
        assert report["matching_agreement"] == 1.0  # top-1 of the classifier logits

    def test_bin_source(self, tmp_path: Path) -> None:
        """A torch.save'd state dict (transformers-5 in-memory names) converts and validates."""
        src = make_vit(tmp_path / "bin", weights_format="bin")
        convert(src, tmp_path / "mlx")
        report = validate_model(src, tmp_path / "mlx")
        assert report["passed"], report["outputs"]


class TestConvertValidate:
    def test_converted_model_validates(self, tiny: Path, converted: Path) -> None:
        """Convert records the patch conv's PyTorch layout; validate_model passes every output and layer."""
        manifest = json.loads((converted / "mlxd_manifest.json").read_text())
        assert manifest["layouts"] == {vit.PATCH_WEIGHT: "pytorch_conv2d_OIHW"}
        report = validate_model(tiny, converted)
        assert report["passed"], report["outputs"]
        assert {o["name"] for o in report["outputs"]} == {"logits", "image_embeds", "last_hidden_state"}
        assert [layer["name"] for layer in report["layers"]] == ["embeddings", "layers.0", "layers.1"]
        assert max(o["max_abs"] for o in report["outputs"]) < ATOL

    def test_quantized_model_dequantizes_at_load(self, tiny: Path, tmp_path: Path) -> None:
        """An 8-bit conversion loads dequantized to float32 on the CPU and validates in the q8 band."""
        convert(tiny, tmp_path / "q8", quantize=QuantOptions(bits=8, group_size=32))
        bundle = vit.load(tmp_path / "q8")
        assert bundle.compute_dtype == "float32 (quantized weights dequantized at load)"
        assert bundle.quantization is not None and bundle.quantization["bits"] == 8
        report = validate_model(tiny, tmp_path / "q8")
        assert (report["band"], report["passed"]) == ("q8", True), report["outputs"]

    def test_fault_injection_names_the_layer(self, tiny: Path, converted: Path, tmp_path: Path) -> None:
        """A scaled attention query weight in layer 1 fails validation and is the first divergent layer."""
        import shutil

        dst = tmp_path / "broken"
        shutil.copytree(converted, dst)
        name = "encoder.layer.1.attention.attention.query.weight"
        loaded = mx.load(str(dst / "model.safetensors"), return_metadata=True)
        arrays, meta = cast("tuple[dict[str, mx.array], dict[str, str]]", loaded)
        arrays[name] = arrays[name] * 1.5
        mx.save_safetensors(str(dst / "model.safetensors"), arrays, metadata=meta)
        report = validate_model(tiny, dst)
        assert report["passed"] is False
        assert report["first_divergent_layer"] == "layers.1"
        assert {layer["name"]: layer["passed"] for layer in report["layers"]}["layers.0"] is True


class TestDaemonEndToEnd:
    def test_convert_validate_infer(self, client: Client, tiny: Path, tmp_path: Path) -> None:
        """Convert, validate and infer over gRPC: logits [1, labels] equal to the local bundle's, and labels."""
        dst = tmp_path / "mlx"
        assert client.convert(tiny, dst).model_type == "vit"
        report = client.validate(dst, tiny)
        assert report.passed, report
        png = tmp_path / "image.png"
        golden_images(1, 40)[0].save(png)
        out = client.infer(dst, images=[png])
        assert out.logits.shape == (1, 5)
        assert list(out.labels) == LABELS
        from PIL import Image

        local = vit.load(dst).embed([], [Image.open(png)])
        # float32 tolerance: the daemon's worker preloads OpenBLAS, this process may run MLX's reference BLAS
        # (imported first), and the two sum in different orders.
        np.testing.assert_allclose(out.logits, local["logits"], atol=1e-5)
        np.testing.assert_allclose(out.image_embeds, local["image_embeds"], atol=1e-5)
        with pytest.raises(InvalidArgumentError) as e:
            client.infer(dst, texts=["a cat"])
        assert e.value.reason == "TEXTS_NOT_SUPPORTED"
