"""Specs for the CLIP arch: fixtures, CLIPProcessor parity, MLX vs transformers, loading, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlxd_daemon import golden
from mlxd_daemon.archs import clip, get_arch
from mlxd_daemon.errors import InvalidArgument, NotFound
from mlxd_daemon.fixtures import clip as fixtures
from mlxd_daemon.progress import Reporter
from mlxd_daemon.quantize import QuantOptions
from mlxd_daemon.validate import validate_model

TEXTS = [*fixtures.GOLDEN_TEXTS, "Héllo wörld ☃ 日本 — don't stop"]


def convert(
    src: Path,
    dst: Path,
    *,
    dtype: str | None = None,
    layout: str = "pytorch",
    bits: int | None = None,
    scale: dict[str, float] | None = None,
) -> Path:
    """Minimal stand-in for the converter: HF tensors under ``map_weight`` names, in one safetensors file.

    ``layout``: "pytorch" keeps the conv OIHW and records DISK_LAYOUT; "mlx" stores it OHWI and records that;
    "none" keeps OIHW and records nothing. ``bits`` quantizes 2-D weights (group 32); ``scale`` perturbs.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, dst / f.name)
    if (src / "model.safetensors").exists():
        hf = mx.load(str(src / "model.safetensors"))
    else:
        import torch

        state = torch.load(src / "pytorch_model.bin", weights_only=True)
        hf = {k: mx.array(v.float().numpy()).astype(getattr(mx, str(v.dtype).split(".")[1])) for k, v in state.items()}
    out = {}
    for k, v in hf.items():
        name = clip.map_weight(k)
        if name is None:
            continue
        v = v.astype(getattr(mx, dtype)) if dtype else v
        out[name] = v * (scale or {}).get(name, 1.0)
    recorded: dict[str, str] | None = dict(clip.DISK_LAYOUT)
    if layout == "mlx":
        out[clip.PATCH_WEIGHT] = out[clip.PATCH_WEIGHT].transpose(0, 2, 3, 1)
        recorded = {}
    elif layout == "none":
        recorded = None
    config = json.loads((src / "config.json").read_text())
    if bits:
        for name in [n for n, v in out.items() if v.ndim == 2 and v.shape[-1] % 32 == 0]:
            w, s, b = mx.quantize(out[name], group_size=32, bits=bits)
            out[name], out[name[: -len(".weight")] + ".scales"], out[name[: -len(".weight")] + ".biases"] = (
                w,
                s,
                b,
            )
        config["quantization"] = {"group_size": 32, "bits": bits}
    (dst / "config.json").write_text(json.dumps(config))
    meta = {"format": "mlx"} | ({} if recorded is None else {"mlxd.layout": json.dumps(recorded)})
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata=meta)
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_clip(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def tiny_mlx(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny, tmp_path_factory.mktemp("mlx") / "tiny")


@pytest.fixture(scope="module")
def processor(tiny: Path):
    import transformers

    return transformers.CLIPProcessor.from_pretrained(tiny)


class TestFixtures:
    def test_checkpoint_loads_in_transformers(self, tiny: Path) -> None:
        """make_clip writes every HF file, and CLIPModel/CLIPTokenizer load them."""
        import transformers

        names = {
            "config.json",
            "model.safetensors",
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "preprocessor_config.json",
        }
        assert names <= {p.name for p in tiny.iterdir()}
        model = transformers.CLIPModel.from_pretrained(tiny)
        tok = transformers.CLIPTokenizer.from_pretrained(tiny)
        assert tok.eos_token == "<|endoftext|>"
        assert model.config.text_config.eos_token_id == tok.eos_token_id

    def test_token_ids_fit_the_vocab(self, tiny: Path, processor) -> None:
        """Every id the tokenizer emits is below the config's vocab_size."""
        vocab_size = json.loads((tiny / "config.json").read_text())["text_config"]["vocab_size"]
        ids = processor(text=TEXTS, padding=True, return_tensors="np")["input_ids"]
        assert ids.max() < vocab_size

    def test_tokenizer_training_is_deterministic(self) -> None:
        """The same vocab and merges come out of a second, uncached training run."""
        first = fixtures.train_tokenizer.__wrapped__()
        assert first == fixtures.train_tokenizer()

    def test_golden_images_are_deterministic_and_varied(self) -> None:
        """golden_images repeats exactly and mixes sizes, aspect ratios and modes."""
        a, b = golden.golden_images(5, 40), golden.golden_images(5, 40)
        assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in b]
        assert len({im.size for im in a}) == 5
        assert {"RGB", "RGBA", "L"} <= {im.mode for im in a}

    def test_bin_checkpoint(self, tmp_path: Path) -> None:
        """weights_format="bin" writes pytorch_model.bin (no safetensors) that transformers loads."""
        import transformers

        src = fixtures.make_clip(tmp_path / "bin", weights_format="bin")
        assert (src / "pytorch_model.bin").exists() and not (src / "model.safetensors").exists()
        transformers.CLIPModel.from_pretrained(src)

    def test_bad_arguments(self, tmp_path: Path) -> None:
        """An unknown size is InvalidArgument."""
        with pytest.raises(InvalidArgument):
            fixtures.make_clip(tmp_path, size="huge")


class TestProcessor:
    def test_tokens_match_clip_processor(self, tiny_mlx: Path, processor) -> None:
        """input_ids and attention_mask equal CLIPProcessor(padding=True)'s."""
        bundle = clip.load(tiny_mlx)
        ours = bundle.preprocess(TEXTS, [])
        hf = processor(text=TEXTS, padding=True, return_tensors="np")
        np.testing.assert_array_equal(hf["input_ids"], ours["input_ids"])
        np.testing.assert_array_equal(hf["attention_mask"], ours["attention_mask"])

    def test_pixels_match_clip_processor(self, tiny_mlx: Path, processor) -> None:
        """pixel_values equal CLIPProcessor's bit for bit (resize, crop, pad-if-small, RGBA/L -> RGB)."""
        images = golden.golden_images(8, 37)
        ours = clip.load(tiny_mlx).preprocess([], images)["pixel_values"]
        hf = processor(images=images, return_tensors="np")["pixel_values"]
        assert hf.shape == ours.shape == (8, 3, 30, 30)
        np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-5)
        assert np.array_equal(ours, hf)

    def test_truncation(self, tiny_mlx: Path, processor) -> None:
        """Long texts are cut to max_position_embeddings, ending in EOS, like truncation=True."""
        long = ["x " * 200, "short"]
        ours = clip.load(tiny_mlx).preprocess(long, [])
        hf = processor(text=long, padding=True, truncation=True, return_tensors="np")
        assert ours["input_ids"].shape == (2, 77)
        np.testing.assert_array_equal(hf["input_ids"], ours["input_ids"])

    def test_vocab_merges_fallback(self, tiny_mlx: Path, tmp_path: Path) -> None:
        """Without tokenizer.json, vocab.json + merges.txt give the same ids."""
        bare = tmp_path / "bare"
        shutil.copytree(tiny_mlx, bare)
        (bare / "tokenizer.json").unlink()
        expected = clip.load(tiny_mlx).preprocess(TEXTS, [])["input_ids"]
        np.testing.assert_array_equal(expected, clip.load(bare).preprocess(TEXTS, [])["input_ids"])

    def test_empty_inputs(self, tiny_mlx: Path) -> None:
        """Empty text and image lists give empty, correctly shaped arrays."""
        out = clip.load(tiny_mlx).preprocess([], [])
        assert out["input_ids"].shape == (0, 0)
        assert out["pixel_values"].shape == (0, 3, 30, 30)


def _assert_match(ref: dict, ours: dict, atol: float) -> None:
    assert set(ref) == set(ours)
    for k in ref:
        assert ref[k].shape == ours[k].shape, k
        np.testing.assert_allclose(ours[k], ref[k], atol=atol, rtol=1e-4, err_msg=k)


class TestClipModel:
    def test_parameter_names_are_hf_names(self, tiny: Path) -> None:
        """The MLX parameter names are the HF state-dict keys (position_ids buffers dropped)."""
        hf = {k for k in mx.load(str(tiny / "model.safetensors")) if clip.map_weight(k)}
        ours = {k for k, _ in tree_flatten(clip.CLIPModel(clip.read_config(tiny)).parameters())}
        assert hf == ours
        assert clip.map_weight("text_model.embeddings.position_ids") is None
        assert clip.map_weight(clip.map_weight("logit_scale")) == "logit_scale"

    def test_matches_transformers_fp32(self, tiny: Path, tiny_mlx: Path) -> None:
        """Every output matches transformers within 1e-4 (embeddings, logits and hidden states)."""
        inputs = clip.golden_inputs(tiny_mlx, texts=TEXTS)
        _assert_match(clip.run_reference(tiny, inputs), clip.run_mlx(clip.load(tiny_mlx), inputs), atol=1e-4)

    def test_legacy_eos_pooling(self, tiny: Path, tmp_path: Path) -> None:
        """With eos_token_id == 2 (pre-#24773 configs) pooling is at argmax(input_ids), as in transformers."""
        src = tmp_path / "src"
        shutil.copytree(tiny, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg["text_config"]["eos_token_id"] = 2
        (src / "config.json").write_text(json.dumps(cfg))
        dst = convert(src, tmp_path / "mlx")
        assert clip.read_config(dst).text.eos_token_id == 2
        inputs = clip.golden_inputs(dst)
        _assert_match(clip.run_reference(src, inputs), clip.run_mlx(clip.load(dst), inputs), atol=1e-4)

    def test_embed(self, tiny_mlx: Path) -> None:
        """embed gives unit-norm embeddings and [n_images, n_texts] logits; either list may be empty."""
        bundle = clip.load(tiny_mlx)
        out = bundle.embed(["a cat", "a dog", "a bird"], golden.golden_images(2, 40))
        assert out["logits_per_image"].shape == (2, 3)
        np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=1), 1.0, atol=1e-5)
        scale = float(np.exp(np.array(bundle.model.logit_scale)))
        np.testing.assert_allclose(
            out["logits_per_image"], scale * out["image_embeds"] @ out["text_embeds"].T, atol=1e-5
        )
        only_text = bundle.embed(["a cat"], [])
        assert only_text["image_embeds"].shape == (0, 16) and only_text["logits_per_image"].shape == (0, 1)
        only_images = bundle.embed([], golden.golden_images(1, 40))
        assert only_images["text_embeds"].shape == (0, 16) and only_images["logits_per_image"].shape == (1, 0)

    def test_one_sided_reference(self, tiny: Path, tiny_mlx: Path) -> None:
        """run_reference and run_mlx agree when there are no images."""
        inputs = clip.golden_inputs(tiny_mlx, images=[])
        _assert_match(clip.run_reference(tiny, inputs), clip.run_mlx(clip.load(tiny_mlx), inputs), atol=1e-4)

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    def test_half_precision_sources(self, dtype: str, tmp_path: Path) -> None:
        """fp16/bf16 checkpoints load as float32 compute, report the storage dtype and validate."""
        src = fixtures.make_clip(tmp_path / "src", dtype=dtype)
        dst = convert(src, tmp_path / "mlx")
        bundle = clip.load(dst)
        assert bundle.dtype == dtype
        assert all(v.dtype == mx.float32 for _, v in tree_flatten(bundle.model.parameters()))
        result = validate_model(src, dst)
        assert result["passed"], result["outputs"]
        assert result["dtype"] == dtype and result["band"] == "float32"

    def test_nbytes_counts_float32_parameters(self, tiny_mlx: Path) -> None:
        """nbytes is 4 bytes per loaded parameter."""
        bundle = clip.load(tiny_mlx)
        n = sum(v.size for v in mx.load(str(tiny_mlx / "model.safetensors")).values())
        assert bundle.nbytes == 4 * n


class TestConvLayout:
    def test_layouts_agree(self, tiny: Path, tiny_mlx: Path, tmp_path: Path) -> None:
        """OIHW with a record, OHWI with a record, and OIHW with no record (transpose fallback) agree."""
        inputs = clip.golden_inputs(tiny_mlx)
        expected = clip.run_mlx(clip.load(tiny_mlx), inputs)["image_embeds"]
        for layout in ("mlx", "none"):
            dst = convert(tiny, tmp_path / layout, layout=layout)
            np.testing.assert_allclose(clip.run_mlx(clip.load(dst), inputs)["image_embeds"], expected, atol=1e-6)

    def test_disk_tensor_keeps_pytorch_layout(self, tiny_mlx: Path) -> None:
        """On disk the patch embedding stays [O, I, kH, kW], recorded in the safetensors metadata."""
        arrays, meta = mx.load(str(tiny_mlx / "model.safetensors"), return_metadata=True)
        assert arrays[clip.PATCH_WEIGHT].shape == (32, 3, 15, 15)
        assert json.loads(meta["mlxd.layout"]) == {clip.PATCH_WEIGHT: "pytorch_conv2d_OIHW"}

    def test_manifest_record_is_honoured(self, tiny: Path, tmp_path: Path) -> None:
        """A layout recorded in mlxd_manifest.json (no metadata) is followed: OHWI stays untransposed."""
        dst = convert(tiny, tmp_path / "m", layout="mlx")
        arrays = mx.load(str(dst / "model.safetensors"))
        mx.save_safetensors(str(dst / "model.safetensors"), arrays)  # drop the metadata record
        (dst / "mlxd_manifest.json").write_text(json.dumps({"layouts": {}}))
        assert clip.load(dst).model.vision_model.embeddings.patch_embedding.weight.shape == (32, 15, 15, 3)

    def test_wrong_record_is_a_shape_error(self, tiny: Path, tmp_path: Path) -> None:
        """A record that contradicts the tensor is caught by the shape check, not silently mis-loaded."""
        dst = convert(tiny, tmp_path / "w", layout="mlx")
        arrays = mx.load(str(dst / "model.safetensors"))
        meta = {"mlxd.layout": json.dumps(clip.DISK_LAYOUT)}
        mx.save_safetensors(str(dst / "model.safetensors"), arrays, metadata=meta)
        with pytest.raises(InvalidArgument) as e:
            clip.load(dst)
        assert e.value.reason == "WEIGHTS_MISMATCH"


class TestLoad:
    def test_missing_dir(self, tmp_path: Path) -> None:
        """A missing model directory is NotFound."""
        with pytest.raises(NotFound):
            clip.load(tmp_path / "nope")

    def test_missing_tensor(self, tiny_mlx: Path, tmp_path: Path) -> None:
        """A missing tensor is InvalidArgument WEIGHTS_MISMATCH naming it."""
        dst = tmp_path / "d"
        shutil.copytree(tiny_mlx, dst)
        arrays = mx.load(str(dst / "model.safetensors"))
        del arrays["text_projection.weight"]
        mx.save_safetensors(str(dst / "model.safetensors"), arrays)
        with pytest.raises(InvalidArgument, match=r"text_projection\.weight") as e:
            clip.load(dst)
        assert e.value.reason == "WEIGHTS_MISMATCH"

    def test_quantized_weights_are_dequantized(self, tiny: Path, tmp_path: Path) -> None:
        """8-bit affine weights load as float32 and still validate (q8 band)."""
        dst = convert(tiny, tmp_path / "q8", bits=8)
        bundle = clip.load(dst)
        assert bundle.quantization == {"group_size": 32, "bits": 8}
        assert bundle.model.text_model.encoder.layers[0].mlp.fc1.weight.dtype == mx.float32
        result = validate_model(tiny, dst)
        assert result["band"] == "q8" and result["passed"], result["outputs"]

    def test_arch_registry(self) -> None:
        """get_arch("clip") is this module."""
        assert get_arch("clip") is clip


class TestValidateModel:
    def test_correct_conversion_passes(self, tiny: Path, tiny_mlx: Path) -> None:
        """A faithful conversion passes, reports every output and writes validation.json."""
        events: list[dict] = []
        result = validate_model(tiny, tiny_mlx, reporter=Reporter(events.append))
        assert result["passed"] is True
        assert result["matching_agreement"] == 1.0
        assert {o["name"] for o in result["outputs"]} == {
            "text_embeds",
            "image_embeds",
            "logits_per_image",
            "text_last_hidden_state",
            "vision_last_hidden_state",
        }
        assert json.loads((tiny_mlx / "validation.json").read_text()) == result
        assert [e["stage"] for e in events if e["kind"] == "begin"] == ["mlx", "reference", "compare"]

    def test_perturbed_tensor_fails(self, tiny: Path, tmp_path: Path) -> None:
        """Scaling one q_proj weight by 3 makes validation fail on the text outputs."""
        name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
        dst = convert(tiny, tmp_path / "bad", scale={name: 3.0})
        result = validate_model(tiny, dst)
        assert result["passed"] is False
        failed = {o["name"] for o in result["outputs"] if not o["passed"]}
        assert "text_embeds" in failed and "image_embeds" not in failed

    def test_user_inputs(self, tiny: Path, tiny_mlx: Path) -> None:
        """Caller texts and images replace the golden ones."""
        result = validate_model(tiny, tiny_mlx, texts=["one", "two", "three"], images=golden.golden_images(2, 50))
        assert (result["num_texts"], result["num_images"], result["passed"]) == (3, 2, True)

    def test_fp16_conversion_of_fp32_source(self, tiny: Path, tmp_path: Path) -> None:
        """Storing fp32 weights as fp16 is judged by the float16 band and passes."""
        dst = convert(tiny, tmp_path / "h", dtype="float16")
        result = validate_model(tiny, dst)
        assert (result["dtype"], result["band"], result["passed"]) == ("float16", "float16", True)


class TestWithConverter:
    @pytest.mark.parametrize(
        ("src_dtype", "weights_format", "kwargs", "band"),
        [
            ("float32", "safetensors", {}, "float32"),
            ("bfloat16", "safetensors", {}, "float32"),
            ("float32", "bin", {"dtype": "float16"}, "float16"),
            ("float32", "safetensors", {"max_shard_size": "20KB"}, "float32"),
            ("float32", "safetensors", {"quantize": QuantOptions(bits=4, group_size=32)}, "q4"),
        ],
    )
    def test_converted_model_validates(
        self, src_dtype: str, weights_format: str, kwargs: dict, band: str, tmp_path: Path
    ) -> None:
        """The real converter's output (dtypes, .bin source, shards, q4) loads and passes validation."""
        from mlxd_daemon.convert import convert as real_convert

        src = fixtures.make_clip(tmp_path / "src", dtype=src_dtype, weights_format=weights_format)
        real_convert(src, tmp_path / "mlx", **kwargs)
        result = validate_model(src, tmp_path / "mlx")
        assert (result["band"], result["passed"]) == (band, True), result["outputs"]


@pytest.mark.slow
class TestBaseSize:
    def test_base_forward_matches_transformers(self, tmp_path: Path) -> None:
        """The ViT-B/32-shaped model runs and matches transformers within the float32 tolerances."""
        src = fixtures.make_clip(tmp_path / "base", size="base")
        dst = convert(src, tmp_path / "mlx")
        inputs = clip.golden_inputs(dst, texts=list(fixtures.GOLDEN_TEXTS[:2]), images=golden.golden_images(2))
        _assert_match(clip.run_reference(src, inputs), clip.run_mlx(clip.load(dst), inputs), atol=1e-4)
