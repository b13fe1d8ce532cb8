"""Specs for quantization: every mode and setting, overrides, recipes, group fallbacks, the mlx-lm config format,
the per-layer report, validation within its band, dequantization, and the same through the daemon and mlxctl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlxd_client.errors import FailedPreconditionError, InvalidArgumentError
from mlxd_daemon import quantize as q
from mlxd_daemon.archs import clip
from mlxd_daemon.archs._quant import dequantize_weights
from mlxd_daemon.convert import convert, dequantize, quantize
from mlxd_daemon.errors import FailedPrecondition, InvalidArgument, Unsupported
from mlxd_daemon.quantize import QuantOptions
from mlxd_daemon.validate import validate_model
from safetensors.torch import save_file

# Upper bounds on a layer's ||W - dequant(q(W))|| / ||W|| for Gaussian-like weights (measured ~0.37, 0.17, 0.08,
# 0.04, 0.02, 0.005 on the tiny CLIP), with headroom.
MAX_REL_ERROR = {2: 0.5, 3: 0.25, 4: 0.12, 5: 0.06, 6: 0.03, 8: 0.008}
MX_MAX_REL_ERROR = {"mxfp4": 0.16, "mxfp8": 0.04, "nvfp4": 0.13}


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlxd_daemon.fixtures import make_clip

    return make_clip(tmp_path_factory.mktemp("qhf") / "clip", size="tiny", seed=0)


@pytest.fixture(scope="module")
def mlx_clip(hf_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP converted to a float32 MLX directory: what Quantize starts from."""
    out = tmp_path_factory.mktemp("qmlx") / "clip"
    convert(hf_clip, out)
    return out


def weights(path: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(f)))  # type: ignore[arg-type]
    return out


def config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def check_mlx_lm_config(out: Path, default: dict[str, Any]) -> None:
    """mlx-lm's format: defaults + entries for layers that differ; every entry has scales and vice versa."""
    cfg = config(out)
    quant = cfg["quantization"]
    assert quant == cfg["quantization_config"]
    assert default == {k: quant[k] for k in ("group_size", "bits", "mode")}
    w = weights(out)
    quantized = {k.removesuffix(".scales") for k in w if k.endswith(".scales")}
    entries = {k: v for k, v in quant.items() if isinstance(v, dict)}
    assert set(entries) <= quantized
    assert all(set(v) == {"group_size", "bits", "mode"} and v != default for v in entries.values())


class TestAffine:
    @pytest.mark.parametrize("group", [32, 64, 128])
    @pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
    def test_every_setting(self, mlx_clip: Path, tmp_path: Path, bits: int, group: int) -> None:
        """Each bits x group quantizes, reports every layer, writes mlx-lm's config and loads back."""
        out = tmp_path / "q"
        r = quantize(mlx_clip, out, options=QuantOptions(bits=bits, group_size=group))
        assert {"group_size": group, "bits": bits, "mode": "affine", "overrides": [], "recipe": None} == r[
            "quantization"
        ]
        check_mlx_lm_config(out, {"group_size": group, "bits": bits, "mode": "affine"})
        reports = {x["name"]: x for x in r["layer_reports"]}
        assert set(r["quantized_layers"]) <= set(reports)
        assert {s["name"] for s in r["skipped_layers"]} <= set(reports)
        for name in r["quantized_layers"]:
            x = reports[name]
            assert (bits, "affine") == (x["bits"], x["mode"])
            assert 0 < x["rel_error"] < MAX_REL_ERROR[bits]
            assert x["bytes_after"] < x["bytes_before"]
        # tiny CLIP is 32/64 wide: groups 64 and 128 must fall back for some layers, and say so; 32 never does
        fallbacks = [x for x in reports.values() if x["bits"] and x["group_size"] != group]
        assert (group > 32) == bool(fallbacks)
        for x in fallbacks:
            assert f"not divisible by group size {group}: quantized with group size {x['group_size']}" in x["reason"]
            assert config(out)["quantization"][x["name"]]["group_size"] == x["group_size"]
        assert r["total_bytes"] == sum(a.nbytes for a in weights(out).values())
        assert clip.load(out).quantization == config(out)["quantization"]

    def test_report_numbers(self, mlx_clip: Path, tmp_path: Path) -> None:
        """rel_error is ||W - dequant(q(W))|| / ||W|| of the written layer; bits per weight and bytes add up."""
        out = tmp_path / "q"
        r = quantize(mlx_clip, out, options=QuantOptions(bits=4, group_size=32))
        src, dst = weights(mlx_clip), weights(out)
        name = "text_model.encoder.layers.0.mlp.fc1"
        w = src[f"{name}.weight"]
        restored = mx.dequantize(dst[f"{name}.weight"], dst[f"{name}.scales"], dst[f"{name}.biases"], 32, 4)
        want = float(np.linalg.norm(np.array(w - restored)) / np.linalg.norm(np.array(w)))
        got = next(x for x in r["layer_reports"] if x["name"] == name)
        assert want == pytest.approx(got["rel_error"], rel=1e-4)
        assert got["bytes_after"] == sum(dst[f"{name}.{k}"].nbytes for k in ("weight", "scales", "biases"))
        params = sum(x["bytes_before"] for x in r["layer_reports"]) / 4  # float32 source
        bpw = 8 * sum(x["bytes_after"] for x in r["layer_reports"]) / params
        assert r["bits_per_weight"] == pytest.approx(bpw, rel=1e-4)
        assert r["bytes_before"] == 4 * params
        manifest = json.loads((out / "mlxd_manifest.json").read_text())
        assert manifest["layer_reports"] == r["layer_reports"]
        assert (manifest["bits_per_weight"], manifest["bytes_before"]) == (r["bits_per_weight"], r["bytes_before"])

    def test_dry_run_reports_plan(self, mlx_clip: Path, tmp_path: Path) -> None:
        """A dry run reports layers and sizes, with no rel_error yet, and writes nothing."""
        r = quantize(mlx_clip, tmp_path / "q", options=QuantOptions(bits=4), dry_run=True)
        assert not (tmp_path / "q").exists()
        assert all(x["rel_error"] is None for x in r["layer_reports"] if x["bits"])

    def test_convert_with_quantize_is_the_same_code(self, hf_clip: Path, mlx_clip: Path, tmp_path: Path) -> None:
        """Convert --quantize and Quantize on the converted directory write the same tensors and config."""
        a = convert(hf_clip, tmp_path / "a", quantize=QuantOptions(bits=6, group_size=32))
        b = quantize(mlx_clip, tmp_path / "b", options=QuantOptions(bits=6, group_size=32))
        assert a["layer_reports"] == b["layer_reports"]
        assert config(tmp_path / "a")["quantization"] == config(tmp_path / "b")["quantization"]
        wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
        assert set(wa) == set(wb) and all(mx.array_equal(wa[k], wb[k]) for k in wa)


class TestMxModes:
    @pytest.mark.parametrize(("mode", "bits", "group"), [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)])
    def test_mode(self, mlx_clip: Path, tmp_path: Path, mode: str, bits: int, group: int) -> None:
        """MX modes (defaults picked from the mode) store uint8 scales and no biases, and load back."""
        out = tmp_path / "q"
        r = quantize(mlx_clip, out, options=QuantOptions(mode=mode))
        assert (bits, group, mode) == (r["quantization"]["bits"], r["quantization"]["group_size"], mode)
        check_mlx_lm_config(out, {"group_size": group, "bits": bits, "mode": mode})
        w = weights(out)
        for name in r["quantized_layers"]:
            assert mx.uint8 == w[f"{name}.scales"].dtype and f"{name}.biases" not in w
        errors = [x["rel_error"] for x in r["layer_reports"] if x["bits"]]
        assert errors and max(errors) < MX_MAX_REL_ERROR[mode]
        assert clip.load(out).quantization == config(out)["quantization"]

    @pytest.mark.parametrize(
        ("mode", "bits", "group", "reason"),
        [
            ("mxfp4", 8, 32, "BAD_QUANT_BITS"),
            ("mxfp4", 4, 64, "BAD_QUANT_GROUP_SIZE"),
            ("int4", 4, 64, "BAD_QUANT_MODE"),
        ],
    )
    def test_bad_settings(self, mode: str, bits: int, group: int, reason: str) -> None:
        """A mode only takes its own bits and group size."""
        with pytest.raises(InvalidArgument) as e:
            q.make_spec(bits, group, mode)
        assert reason == e.value.reason

    def test_mode_missing_on_backend_is_unimplemented(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A mode this MLX build cannot run fails UNIMPLEMENTED / UNSUPPORTED_QUANT_MODE, saying why."""
        monkeypatch.setattr(q, "mode_unsupported", lambda mode: "no CPU kernel")
        with pytest.raises(Unsupported) as e:
            q.make_spec(0, 0, "nvfp4")
        assert e.value.reason == "UNSUPPORTED_QUANT_MODE" and "no CPU kernel" in e.value.message

    def test_all_modes_run_on_this_build(self) -> None:
        """This CPU build of MLX quantizes every mode (the probe behind UNSUPPORTED_QUANT_MODE)."""
        assert [q.mode_unsupported(m) for m in q.MODES] == [None] * 4


class TestFallback:
    @pytest.mark.parametrize(
        ("params", "shape", "want", "why"),
        [
            (q.QParams(4, 64), (8, 96), q.QParams(4, 32), "input dim 96 not divisible by group size 64"),
            (q.QParams(4, 128), (8, 192), q.QParams(4, 64), "input dim 192 not divisible by group size 128"),
            (q.QParams(4, 64), (8, 48), None, "input dim 48 not divisible by group size 64"),
            (q.QParams(4, 32, "mxfp4"), (8, 48), None, "input dim 48 not divisible by group size 32"),
            (q.QParams(4, 16, "nvfp4"), (3, 16), None, "nvfp4 needs rows x cols divisible by 32"),
            (q.QParams(4, 64), (8, 128), q.QParams(4, 64), None),
        ],
    )
    def test_fit_group(
        self, params: q.QParams, shape: tuple[int, int], want: q.QParams | None, why: str | None
    ) -> None:
        """A smaller group size that divides the input dim, else float; never without a reason."""
        got, reason = q.fit_group(params, shape)
        assert want == got
        assert (why is None) == (reason is None)
        if why:
            assert reason is not None and reason.startswith(why)


class TestOverrides:
    @pytest.mark.parametrize(
        ("text", "params"),
        [
            ("lm_head=8", q.QParams(8, 64)),
            ("*.v_proj=6:32", q.QParams(6, 32)),
            ("vision_model.*=skip", None),
            ("*.fc1=mxfp8", q.QParams(8, 32, "mxfp8")),
        ],
    )
    def test_parse(self, text: str, params: q.QParams | None) -> None:
        """PATTERN=BITS[:GROUP], PATTERN=skip and PATTERN=MODE; the default group applies when omitted."""
        o = q.parse_override(text, q.QParams(4, 64))
        assert (text.split("=")[0], params) == (o.pattern, o.params)

    @pytest.mark.parametrize("text", ["lm_head", "=8", "lm_head=", "x=7", "x=4:48", "x=four", "x=4:"])
    def test_bad(self, text: str) -> None:
        """A malformed override is INVALID_ARGUMENT / BAD_OVERRIDE naming it."""
        with pytest.raises(InvalidArgument) as e:
            q.make_spec(4, 64, "affine", [text])
        assert ("BAD_OVERRIDE", text) == (e.value.reason, e.value.metadata["override"])

    def test_first_match_wins(self) -> None:
        """Overrides are tried in order; a layer takes the first that matches, else the default."""
        spec = q.make_spec(4, 64, "affine", ["*.v_proj=6:32", "model.layers.0.*=skip", "lm_head=8"])
        assert (q.QParams(6, 32), None) == q.choose(spec, "model.layers.0.self_attn.v_proj", {})
        assert q.choose(spec, "model.layers.0.mlp.up_proj", {}) == (None, "override 'model.layers.0.*=skip'")
        assert (q.QParams(8, 64), None) == q.choose(spec, "lm_head", {})
        assert (q.QParams(4, 64), None) == q.choose(spec, "model.layers.1.mlp.up_proj", {})

    def test_on_clip(self, mlx_clip: Path, tmp_path: Path) -> None:
        """Skipped layers are reported with the override; differing layers get their own config entry."""
        out = tmp_path / "q"
        overrides = ["vision_model.*=skip", "*.v_proj=8:32", "text_projection=6"]
        r = quantize(mlx_clip, out, options=QuantOptions(bits=4, group_size=64, overrides=overrides))
        assert overrides == r["quantization"]["overrides"]
        skipped = {s["name"]: s["reason"] for s in r["skipped_layers"]}
        assert skipped["vision_model.encoder.layers.0.mlp.fc1"] == "override 'vision_model.*=skip'"
        assert not any(n.startswith("vision_model.") for n in r["quantized_layers"])
        quant = config(out)["quantization"]
        assert quant["text_model.encoder.layers.1.self_attn.v_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
        # text_projection's input dim is 32: the override's group 64 falls back too
        assert quant["text_projection"] == {"group_size": 32, "bits": 6, "mode": "affine"}
        assert "vision_model.encoder.layers.0.mlp.fc1" not in quant  # float layers are absent, as in mlx-lm
        assert "vision_model.encoder.layers.0.mlp.fc1.scales" not in weights(out)
        check_mlx_lm_config(out, {"group_size": 64, "bits": 4, "mode": "affine"})


def llama_names(n: int) -> list[str]:
    names = ["model.embed_tokens", "lm_head", "model.norm"]
    for i in range(n):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{k}" for k in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj")]
    return names


class TestRecipes:
    def test_layer_selection_matches_mlx_lm(self) -> None:
        """16 layers: v_proj/down_proj at 6 bits in layers 0-1, 14-15 and every third between; lm_head at 6."""
        names = llama_names(16)
        stacks = q.layer_stacks(names)
        assert stacks == {"model": 16}
        high = {n for n in names if q.recipe_params("mixed_3_6", n, stacks, 64).bits == 6}
        layers = [0, 1, 4, 7, 10, 13, 14, 15]
        want = {f"model.layers.{i}.{k}" for i in layers for k in ("self_attn.v_proj", "mlp.down_proj")} | {"lm_head"}
        assert want == high
        assert {3} == {q.recipe_params("mixed_3_6", n, stacks, 64).bits for n in set(names) - high}

    def test_several_stacks(self) -> None:
        """Each `<stack>.layers.N` stack counts its own layers (CLIP has a text and a vision tower)."""
        names = ["text_model.encoder.layers.11.mlp.fc1", "vision_model.encoder.layers.3.mlp.fc1", "layers.1.x"]
        assert q.layer_stacks(names) == {"text_model.encoder": 12, "vision_model.encoder": 4, "": 2}

    @pytest.mark.parametrize(("recipe", "mode"), [("mixed_5_6", "affine"), ("mixed_2_6", "mxfp4")])
    def test_bad_recipe(self, recipe: str, mode: str) -> None:
        """Unknown recipes, and recipes with a non-affine mode, are INVALID_ARGUMENT / BAD_RECIPE."""
        with pytest.raises(InvalidArgument) as e:
            q.make_spec(0, 0, mode, recipe=recipe)
        assert e.value.reason == "BAD_RECIPE"

    @pytest.mark.parametrize(("recipe", "low"), [("mixed_2_6", 2), ("mixed_3_6", 3), ("mixed_4_6", 4)])
    def test_on_llama_shaped_checkpoint(self, tmp_path: Path, recipe: str, low: int) -> None:
        """On a Llama-shaped MLX directory the config has the low bits as default and 6-bit entries as chosen."""
        src = tmp_path / "llama"
        src.mkdir()
        g = torch.Generator().manual_seed(0)
        names = llama_names(8)
        tensors = {f"{n}.weight": torch.randn(64 if n != "lm_head" else 96, 64, generator=g) for n in names}
        tensors["model.norm.weight"] = torch.ones(64)
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "mlx"})
        (src / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 8}))
        r = quantize(src, tmp_path / "q", options=QuantOptions(recipe=recipe))
        quant = config(tmp_path / "q")["quantization"]
        assert {"group_size": 64, "bits": low, "mode": "affine"} == {
            k: quant[k] for k in ("group_size", "bits", "mode")
        }
        stacks = q.layer_stacks(names)
        want = {n for n in names if n != "model.norm" and q.recipe_params(recipe, n, stacks, 64).bits == 6}
        assert want == {k for k, v in quant.items() if isinstance(v, dict)}
        assert "lm_head" in want and "model.layers.0.self_attn.v_proj" in want
        assert recipe == r["quantization"]["recipe"]
        reports = {x["name"]: x["bits"] for x in r["layer_reports"]}
        assert reports["model.layers.7.mlp.down_proj"] == 6 and low == reports["model.layers.2.mlp.down_proj"]


class TestValidate:
    @pytest.mark.parametrize(
        ("kw", "band"),
        [
            ({"bits": 8, "group_size": 32}, "q8"),
            ({"bits": 6, "group_size": 64}, "q6"),
            ({"bits": 4, "group_size": 64}, "q4"),
            ({"mode": "mxfp4"}, "q4"),
            ({"mode": "nvfp4"}, "q4"),
            ({"mode": "mxfp8"}, "q6"),  # e4m3 values err like 6-bit affine
        ],
    )
    def test_within_band(self, hf_clip: Path, mlx_clip: Path, tmp_path: Path, kw: dict[str, Any], band: str) -> None:
        """The quantized tiny CLIP passes Validate against the transformers reference within its band."""
        out = tmp_path / "q"
        quantize(mlx_clip, out, options=QuantOptions(**kw))
        report = validate_model(hf_clip, out)
        assert band == report["band"]
        assert report["passed"], report["outputs"]


class TestDequantize:
    @pytest.mark.parametrize("kw", [{"bits": 4, "group_size": 128}, {"mode": "mxfp4"}])
    def test_round_trip(self, mlx_clip: Path, tmp_path: Path, kw: dict[str, Any]) -> None:
        """Dequantize gives float weights equal to the loader's dequantization, and no quantization keys."""
        qdir, fdir = tmp_path / "q", tmp_path / "f"
        quantize(mlx_clip, qdir, options=QuantOptions(**kw))
        r = dequantize(qdir, fdir)
        assert r["dtype"] == "float32" and r["quantization"] is None
        assert set(r["dequantized_layers"]) == {k.removesuffix(".scales") for k in weights(qdir) if ".scales" in k}
        cfg = config(fdir)
        assert "quantization" not in cfg and "quantization_config" not in cfg
        got = weights(fdir)
        assert set(got) == set(weights(mlx_clip))
        want = dequantize_weights(weights(qdir), config(qdir)["quantization"])
        assert all(mx.array_equal(want[k], got[k]) for k in got)
        inputs = clip.golden_inputs(fdir)
        a, b = clip.run_mlx(clip.load(qdir), inputs), clip.run_mlx(clip.load(fdir), inputs)
        np.testing.assert_array_equal(a["image_embeds"], b["image_embeds"])

    def test_dtype_choice(self, mlx_clip: Path, tmp_path: Path) -> None:
        """dtype float16 writes every float tensor as float16."""
        quantize(mlx_clip, tmp_path / "q", options=QuantOptions(bits=8))
        r = dequantize(tmp_path / "q", tmp_path / "f", dtype="float16")
        assert {"float16"} == {str(a.dtype).removeprefix("mlx.core.") for a in weights(tmp_path / "f").values()} - {
            "int64",
            "int32",
        }
        assert r["dtype"] == "float16"

    def test_preconditions(self, mlx_clip: Path, tmp_path: Path) -> None:
        """Dequantizing a float directory and quantizing a quantized one both fail with a reason."""
        with pytest.raises(FailedPrecondition) as e:
            dequantize(mlx_clip, tmp_path / "f")
        assert e.value.reason == "NOT_QUANTIZED"
        quantize(mlx_clip, tmp_path / "q")
        with pytest.raises(FailedPrecondition) as e:
            quantize(tmp_path / "q", tmp_path / "qq")
        assert e.value.reason == "ALREADY_QUANTIZED"


class TestThroughDaemon:
    def test_quantize_dequantize_convert(self, client: Any, hf_clip: Path, mlx_clip: Path, tmp_path: Path) -> None:
        """Quantize with overrides, dequantize, and Convert with q_bits: reports arrive in the result message."""
        r = client.quantize(mlx_clip, tmp_path / "q", bits=4, group_size=128, overrides=["*.fc2=8"])
        assert (r.quantization.bits, r.quantization.group_size, list(r.quantization.overrides)) == (4, 128, ["*.fc2=8"])
        reports = {x.name: x for x in r.layer_reports}
        assert reports["text_model.encoder.layers.0.mlp.fc2"].bits == 8
        assert 0 < reports["text_projection"].rel_error < MAX_REL_ERROR[4]
        assert r.bits_per_weight > 0 and r.bytes_before > 0
        d = client.quantize(tmp_path / "q", tmp_path / "f", dequantize=True)
        assert not d.HasField("quantization") and "quantization" not in config(tmp_path / "f")
        c = client.convert(hf_clip, tmp_path / "c", q_bits=8, q_group_size=32)
        assert (c.quantization.bits, c.quantization.group_size) == (8, 32) and c.layer_reports
        client.convert(hf_clip, tmp_path / "m", q_mode="mxfp4")
        assert {k: config(tmp_path / "m")["quantization"][k] for k in ("group_size", "bits", "mode")} == {
            "group_size": 32,
            "bits": 4,
            "mode": "mxfp4",
        }

    def test_errors(self, client: Any, mlx_clip: Path, tmp_path: Path) -> None:
        """Bad overrides are INVALID_ARGUMENT / BAD_OVERRIDE; re-quantizing is FAILED_PRECONDITION."""
        with pytest.raises(InvalidArgumentError) as e:
            client.quantize(mlx_clip, tmp_path / "q", overrides=["lm_head=7"])
        assert e.value.reason == "BAD_OVERRIDE"
        client.quantize(mlx_clip, tmp_path / "q")
        with pytest.raises(FailedPreconditionError) as f:
            client.quantize(tmp_path / "q", tmp_path / "qq")
        assert f.value.reason == "ALREADY_QUANTIZED"

    def test_mlxctl_json(self, daemon: Any, mlx_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """mlxctl quantize --json prints the layer reports, bits per weight and the overrides/recipe it used."""
        from mlxd_client.cli import main

        argv = ["--address", daemon.address, "--no-autostart", "--json", "quantize", str(mlx_clip)]
        code = main([*argv, str(tmp_path / "q"), "--q-recipe", "mixed_3_6", "--q-override", "vision_model.*=skip"])
        r = json.loads(capsys.readouterr().out)
        assert code == 0
        assert (
            r["quantization"]["recipe"],
            r["quantization"]["overrides"],
            r["quantization"]["bits"],
        ) == ("mixed_3_6", ["vision_model.*=skip"], 3)
        assert {"name", "bits", "group_size", "mode", "rel_error", "bytes_before", "bytes_after", "note"} == set(
            r["layer_reports"][0]
        )
        assert r["bits_per_weight"] > 0 and r["bytes_before"] > 0
        code = main([*argv[:-2], "quantize", str(tmp_path / "q"), str(tmp_path / "f"), "--dequantize"])
        assert code == 0 and json.loads(capsys.readouterr().out)["quantization"] is None


class TestComputePolicy:
    def test_cpu_dequantizes_at_load(self, mlx_clip: Path, tmp_path: Path) -> None:
        """On the CPU backend a quantized model is dequantized once at load and computes in float32."""
        from mlxd_daemon.archs import clip

        out = tmp_path / "q8"
        quantize(mlx_clip, out, options=QuantOptions(bits=8, group_size=32))
        bundle = clip.load(out)
        assert bundle.compute_dtype == "float32 (quantized weights dequantized at load)"
        assert clip.load(mlx_clip).compute_dtype == "float32"

    def test_kernel_policy_keeps_the_model_quantized(
        self, mlx_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With quantized kernels (GPUs, or forced) modules stay packed, smaller, and agree with the CPU path."""
        import mlx.nn as nn
        from mlxd_daemon.archs import clip
        from mlxd_daemon.fixtures import golden_images

        out = tmp_path / "q8"
        quantize(mlx_clip, out, options=QuantOptions(bits=8, group_size=32))
        texts, images = ["a red circle", "two cats"], golden_images(2, size=40)
        dequantized = clip.load(out)
        monkeypatch.setenv("MLXD_QUANTIZED_COMPUTE", "kernels")
        kernels = clip.load(out)
        assert kernels.compute_dtype == "float32 with quantized kernels"
        layer = kernels.model.text_model.encoder.layers[0].self_attn.q_proj
        assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 8
        assert kernels.nbytes < dequantized.nbytes
        a, b = dequantized.embed(texts, images), kernels.embed(texts, images)
        for name in ("text_embeds", "image_embeds"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-4)
