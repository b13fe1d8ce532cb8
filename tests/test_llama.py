"""Llama-family decoders (llama, mistral, qwen2) on the mlx-lm path: layout, parity, generation, validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlxd_client import Client
from mlxd_daemon import archs
from mlxd_daemon.archs import decoder
from mlxd_daemon.archs._lm_convert import fix_config
from mlxd_daemon.archs.decoder_validate import topk_agreement
from mlxd_daemon.convert import convert
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.fixtures import make_llama
from mlxd_daemon.quantize import QuantOptions
from mlxd_daemon.validate import validate_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that head_dim 16's wavelengths fall in all three bands (kept, smoothed, scaled).
    "original_max_position_embeddings": 32,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "tied": {"tie_word_embeddings": True},
    "llama3_rope": {"rope_scaling": LLAMA3_ROPE},
    "linear_rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "biases_head_dim": {"attention_bias": True, "mlp_bias": True, "head_dim": 32},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "sliding_window": None},
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight HF Llama (GQA: 4 heads, 2 kv heads; float32 safetensors) with a BPE tokenizer."""
    return make_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def converted(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("mlx") / "tiny-llama"
    convert(tiny_llama, dst)
    return dst


def hf_model(src: Path) -> Any:
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()


def hf_greedy(src: Path, prompt: list[int], max_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model(src).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
    return [int(t) for t in out[0, len(prompt) :]]


class TestLayout:
    def test_llama_family_routes_to_mlx_lm(self) -> None:
        """llama, mistral and qwen2 are served by mlx-lm's model classes (mistral through mlx-lm's alias)."""
        routes = {t: archs.resolve(t) for t in ("llama", "mistral", "qwen2")}
        assert {r.path for r in routes.values()} == {"mlx_lm"}
        assert routes["mistral"].mlx_lm_type == "llama" and archs.get_arch("qwen2") is decoder

    def test_transformers5_rope_parameters_reach_the_top_level(self) -> None:
        """rope_parameters' theta and scaling are copied to the top-level keys mlx-lm reads; nothing is lost."""
        src = {"model_type": "llama", "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}}
        fixed, notes = fix_config(src, {"rope_theta", "rope_scaling"})
        assert (fixed["rope_theta"], fixed["rope_scaling"]["rope_type"]) == (500000.0, "llama3")
        assert fixed["rope_parameters"] == src["rope_parameters"] and notes

    def test_converted_directory_has_mlx_lm_names_and_no_tied_head(self, tmp_path: Path) -> None:
        """A tied model converts without lm_head; every tensor keeps its HF name."""
        from safetensors import safe_open

        src = make_llama(tmp_path / "hf", tie_word_embeddings=True)
        result = convert(src, tmp_path / "mlx")
        with safe_open(tmp_path / "mlx" / "model.safetensors", framework="numpy") as f:
            names = set(f.keys())
        assert "lm_head.weight" not in names and result["path"] == "mlx_lm"
        assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"} <= names

    def test_bin_source_keeps_its_dtype(self, tmp_path: Path) -> None:
        """A pickled (.bin) bfloat16 checkpoint converts through the sanitize view with its dtype kept."""
        import mlx_lm

        src = make_llama(tmp_path / "hf", dtype="bfloat16", weights_format="bin")
        result = convert(src, tmp_path / "mlx")
        assert (result["source_format"], result["dtype"]) == ("bin", "bfloat16")
        model, _ = mlx_lm.load(str(tmp_path / "mlx"))
        assert model.model.embed_tokens.weight.dtype == mx.bfloat16

    def test_embed_says_use_generate(self, converted: Path) -> None:
        """Infer on a causal LM is refused with a reason a client can act on."""
        with pytest.raises(InvalidArgument) as e:
            decoder.load(converted).embed(["hi"], [])
        assert e.value.reason == "USE_GENERATE"


class TestParity:
    @pytest.mark.parametrize("variant", sorted(VARIANTS))
    def test_logits_match_transformers(self, variant: str, tmp_path: Path) -> None:
        """Full-sequence logits of the converted model equal LlamaForCausalLM's within 1e-4 (float32)."""
        src = make_llama(tmp_path / variant, seed=1, **VARIANTS[variant])
        convert(src, tmp_path / "mlx")
        inputs = decoder.golden_inputs(tmp_path / "mlx")
        ref = decoder.run_reference(src, inputs)
        out = decoder.run_mlx(decoder.load(tmp_path / "mlx"), inputs)
        np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4, rtol=0)

    def test_topk_agreement(self) -> None:
        """Top-k overlap: identical logits agree fully, a swapped best token halves top-2 overlap at most."""
        a = np.array([[[3.0, 2.0, 1.0, 0.0]]])
        b = np.array([[[0.0, 2.0, 1.0, 3.0]]])
        assert topk_agreement(a, a, 2) == 1.0
        assert topk_agreement(a, b, 1) == 0.0
        assert topk_agreement(a, b, 2) == 0.5


class TestGeneration:
    def test_greedy_equals_full_recompute_and_transformers(self, tiny_llama: Path, converted: Path) -> None:
        """Greedy tokens (mlx-lm's KV cache) = argmax of a full forward at each step = transformers generate."""
        bundle = decoder.load(converted)
        prompt = bundle.encode("Once upon a time")
        ours = [e["token_id"] for e in bundle.generate(prompt, max_tokens=16)]
        seq = list(prompt)
        for _ in range(len(ours)):
            seq.append(int(mx.argmax(bundle.model(mx.array([seq]))[0, -1]).item()))
        assert seq[len(prompt) :] == ours
        assert hf_greedy(tiny_llama, prompt, 16)[: len(ours)] == ours

    def test_events_text_stats_and_finish(self, converted: Path) -> None:
        """Pieces concatenate to the decoded tokens; the last event has finish_reason and stats; seeds repeat."""
        bundle = decoder.load(converted)
        events = list(bundle.generate("The quick brown fox", max_tokens=10, temperature=0.8, top_p=0.9, seed=3))
        ids = [e["token_id"] for e in events]
        stop = events[-1]["finish_reason"] == "stop"
        text = bundle.tokenizer.decode(ids[: len(ids) - stop], skip_special_tokens=True)
        assert text == "".join(e["text"] for e in events)
        last = events[-1]
        assert last["finish_reason"] in ("stop", "length") and all("finish_reason" not in e for e in events[:-1])
        assert last["stats"]["prompt_tokens"] == len(bundle.encode("The quick brown fox"))
        assert bundle.stats["generation_tokens"] == len(events) - 1  # the first token belongs to the prompt phase
        again = [e["token_id"] for e in bundle.generate("The quick brown fox", max_tokens=10, temperature=0.8, seed=3)]
        assert again == [
            e["token_id"] for e in bundle.generate("The quick brown fox", max_tokens=10, temperature=0.8, seed=3)
        ]

    def test_stops_at_generation_config_eos(self, converted: Path) -> None:
        """A stop id ends generation with finish_reason "stop" and no text; config + generation_config ids count."""
        bundle = decoder.load(converted)
        assert {1, 4} <= set(bundle.tokenizer.eos_token_ids)  # <|end_of_text|> (config) + <|eot_id|> (generation)
        prompt = bundle.encode("The quick brown fox")
        first = next(iter(bundle.generate(prompt, max_tokens=1)))["token_id"]
        bundle.tokenizer.eos_token_ids = {first}
        events = list(bundle.generate(prompt, max_tokens=5))
        assert [(first, "", "stop")] == [(e["token_id"], e["text"], e["finish_reason"]) for e in events]

    def test_streamed_text_holds_back_partial_utf8(self, converted: Path) -> None:
        """Multi-byte characters split over byte-level tokens come out whole from mlx-lm's detokenizer."""
        tok = decoder.load(converted).tokenizer
        text = "naïve 東京 ☕ 🙂 Zürich"
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > len(text.split())  # some characters span several tokens
        detok = tok.detokenizer
        detok.reset()
        pieces = []
        for i in ids:
            detok.add_token(i)
            pieces.append(detok.last_segment)
        detok.finalize()
        assert text == "".join(pieces) + detok.last_segment
        assert not any("\ufffd" in p for p in pieces)

    def test_chat_template_renders_with_bos_once(self, converted: Path) -> None:
        """apply_chat_template returns ids starting with exactly one BOS."""
        bundle = decoder.load(converted)
        ids = bundle.apply_chat_template([{"role": "user", "content": "hello"}])
        bos = bundle.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
        assert (bos, 1) == (ids[0], ids.count(bos))
        assert bundle.tokenizer.decode(ids, skip_special_tokens=False).endswith("assistant<|end_header_id|>\n\n")


class TestMlxLmCompat:
    @pytest.mark.parametrize("options", [{}, {"quantize": QuantOptions(bits=8)}, {"quantize": QuantOptions(bits=4)}])
    def test_mlx_lm_loads_our_output_and_generates_our_tokens(
        self, tiny_llama: Path, tmp_path: Path, options: dict[str, Any]
    ) -> None:
        """mlx_lm.load reads the converted directory unchanged; greedy tokens equal ours (float and q8/q4)."""
        import mlx_lm
        from mlx_lm.generate import stream_generate

        dst = tmp_path / "mlx"
        convert(tiny_llama, dst, **options)
        bundle = decoder.load(dst)
        prompt = bundle.encode("Once upon a time")
        ours = [e["token_id"] for e in bundle.generate(prompt, max_tokens=12)]
        model, tokenizer = mlx_lm.load(str(dst))
        model.set_dtype(mx.float32)  # as the CPU policy computes (quantized layers dequantized by the bundle)
        assert len(ours) > 0
        if not options:
            assert ours == [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12)]


class TestCalibration:
    def test_gptq_and_awq_run_on_mlx_lm_blocks(self, tiny_llama: Path, tmp_path: Path) -> None:
        """AWQ and GPTQ calibrate mlx-lm's own Llama blocks (each layer says its method); mlx-lm loads the result."""
        import mlx_lm

        data = tmp_path / "calib.txt"
        data.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(16)))
        for method in ("gptq", "awq"):
            out = tmp_path / method
            r = convert(tiny_llama, out, quantize=QuantOptions(bits=4, group_size=32, method=method,
                                                               calibration_data=str(data)))  # fmt: skip
            methods = {x["name"]: x["method"] for x in r["layer_reports"]}
            assert methods["model.layers.1.mlp.down_proj"].startswith(method), methods
            mlx_lm.load(str(out))

    def test_blocks_without_llama_linears_are_refused_clearly(self, tmp_path: Path) -> None:
        """GPT-2's blocks (fused c_attn) cannot be calibrated: UNSUPPORTED_CALIBRATION, not an internal error."""
        from mlxd_daemon.errors import Unsupported
        from mlxd_daemon.fixtures.decoders import make_decoder

        src = make_decoder(tmp_path / "gpt2", "gpt2")
        with pytest.raises(Unsupported) as e:
            convert(src, tmp_path / "out", quantize=QuantOptions(method="gptq"))
        assert e.value.reason == "UNSUPPORTED_CALIBRATION" and "gpt2" in e.value.message
        assert not (tmp_path / "out").exists()


class TestValidate:
    def test_correct_conversion_passes_with_full_agreement(self, tiny_llama: Path, converted: Path) -> None:
        """validate_model passes; top-1/5 and greedy agreement are 1.0; every layer is tapped and paired."""
        report = validate_model(tiny_llama, converted)
        assert report["passed"], report["outputs"]
        assert {"logits"} == {o["name"] for o in report["outputs"]}
        assert [layer["name"] for layer in report["layers"]] == ["model.layers.0", "model.layers.1"]
        agree = report["agreement"]
        assert (agree["top1_agreement"], agree["top5_agreement"], agree["greedy_exact"]) == (1.0, 1.0, 1.0)

    def test_scaled_o_proj_fails(self, tiny_llama: Path, converted: Path, tmp_path: Path) -> None:
        """One layer's o_proj scaled by 1.5 makes validation fail, and names that layer as the first divergent."""
        import shutil

        broken = tmp_path / "broken"
        shutil.copytree(converted, broken)
        weights, meta = mx.load(str(broken / "model.safetensors"), return_metadata=True)  # type: ignore[misc]
        name = "model.layers.1.self_attn.o_proj.weight"
        weights[name] = weights[name] * 1.5
        mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata=meta)
        report = validate_model(tiny_llama, broken)
        assert not report["passed"]
        assert not next(o for o in report["outputs"] if o["name"] == "logits")["passed"]
        assert report["first_divergent_layer"] == "model.layers.1"
        assert [layer["passed"] for layer in report["layers"]] == [True, False]


class TestDaemon:
    def test_convert_and_validate_over_grpc(self, client: Client, tiny_llama: Path, tmp_path: Path) -> None:
        """Convert and Validate through the real daemon: the route is recorded and the report passes."""
        dst = tmp_path / "mlx"
        result = client.convert(tiny_llama, dst)
        assert (result.model_type, result.path) == ("llama", "mlx_lm")
        assert json.loads((dst / "config.json").read_text())["rope_theta"] == 10000.0
        report = client.validate(dst, tiny_llama)
        assert report.passed, report
        assert report.agreement["top1_agreement"] == 1.0
