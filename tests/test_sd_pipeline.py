"""Stable Diffusion through a real daemon: a tiny random diffusers pipeline → convert → validate, and the refusals
that must come before any weight is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError, UnsupportedError


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD pipeline (diffusers' test shapes) saved with save_pretrained, Euler scheduler."""
    from mlxd_daemon.fixtures.sd import make_sd

    return make_sd(tmp_path_factory.mktemp("hf") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def sd_mlx(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory, daemon: object) -> Path:
    """``tiny_sd`` converted to float32 through the daemon."""
    dst = tmp_path_factory.mktemp("mlx") / "tiny-sd"
    with daemon.client() as c:  # type: ignore[attr-defined]
        c.convert(tiny_sd, dst, dtype="float32")
    return dst


def _broken(src: Path, root: Path, edit: str) -> Path:
    """A copy of ``src`` with one defect: a missing component, an unknown scheduler, or an unmappable UNet."""
    bad = root / edit
    shutil.copytree(src, bad)
    if edit == "no_vae":
        shutil.rmtree(bad / "vae")
    elif edit == "lcm_scheduler":
        for path, key in ((bad / "model_index.json", "scheduler"), (bad / "scheduler/scheduler_config.json", None)):
            data = json.loads(path.read_text())
            if key:
                data[key] = ["diffusers", "LCMScheduler"]
            else:
                data["_class_name"] = "LCMScheduler"
            path.write_text(json.dumps(data))
    elif edit == "class_embedding_unet":
        cfg = json.loads((bad / "unet/config.json").read_text())
        cfg["class_embed_type"] = "timestep"
        (bad / "unet/config.json").write_text(json.dumps(cfg))
    return bad


class TestConvert:
    def test_writes_the_pipeline_layout_with_channels_last_recorded(self, sd_mlx: Path) -> None:
        """Every component gets config, weights and manifest; conv layouts are recorded; tokenizer copied."""
        for name in ("unet", "vae", "text_encoder"):
            for file in ("config.json", "model.safetensors", "mlxd_manifest.json"):
                assert (sd_mlx / name / file).is_file(), f"{name}/{file}"
        for file in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                     "mlxd_manifest.json"):  # fmt: skip
            assert (sd_mlx / file).is_file(), file
        layouts = json.loads((sd_mlx / "unet/mlxd_manifest.json").read_text())["layouts"]
        assert layouts["conv_in.weight"] == "pytorch_conv2d_OIHW"
        assert "time_embedding.linear_1.weight" not in layouts
        root = json.loads((sd_mlx / "mlxd_manifest.json").read_text())
        assert root["model_type"] == "stable_diffusion" and set(root["components"]) == {"unet", "vae", "text_encoder"}

    def test_bin_components_convert_like_safetensors(self, client: Client, tmp_path: Path) -> None:
        """A pipeline saved as diffusion_pytorch_model.bin converts; result reports the pickle source format."""
        from mlxd_daemon.fixtures.sd import make_sd

        src = make_sd(tmp_path / "bin-sd", weights_format="bin", seed=1)
        result = client.convert(src, tmp_path / "out", dtype="float16")
        assert result.model_type == "stable_diffusion" and result.dtype == pb.DTYPE_FLOAT16
        manifest = json.loads((tmp_path / "out/mlxd_manifest.json").read_text())
        assert manifest["source"]["weight_format"] == "bin"
        # fp16: the VAE is kept in float32 (its activations overflow float16), the UNet is float16.
        assert manifest["components"]["vae"]["dtype"] == "float32"
        assert manifest["components"]["unet"]["dtype"] == "float16"

    def test_quantizes_unet_8_bit_and_text_encoder_4_bit(self, client: Client, tiny_sd: Path, tmp_path: Path) -> None:
        """--q-bits 8 with a text_encoder.* override: UNet linears q8, text encoder q4, VAE float, convs float."""
        result = client.convert(tiny_sd, tmp_path / "q", q_bits=8, q_group_size=32, q_overrides=["text_encoder.*=4"])
        bits = {r.name: r.bits for r in result.layer_reports}
        assert bits["unet.time_embedding.linear_2"] == 8
        assert bits["text_encoder.text_model.encoder.layers.0.mlp.fc1"] == 4
        assert not any(name.startswith("vae.") and b for name, b in bits.items())
        unet_cfg = json.loads((tmp_path / "q/unet/config.json").read_text())
        assert unet_cfg["quantization"]["bits"] == 8
        assert "conv_in" not in unet_cfg["quantization"]


class TestRefusals:
    @pytest.mark.parametrize(
        ("edit", "error", "reason"),
        [
            ("no_vae", InvalidArgumentError, "PIPELINE_COMPONENT_MISSING"),
            ("lcm_scheduler", UnsupportedError, "UNSUPPORTED_SCHEDULER"),
            ("class_embedding_unet", UnsupportedError, "UNSUPPORTED_UNET_CONFIG"),
        ],
    )
    def test_refused_before_any_weight_is_written(
        self, client: Client, tiny_sd: Path, tmp_path: Path, edit: str, error: type, reason: str
    ) -> None:
        """A missing component, an unknown scheduler class or an unmappable UNet: specific reason, no output."""
        bad = _broken(tiny_sd, tmp_path, edit)
        dst = tmp_path / "out"
        with pytest.raises(error) as info:
            client.convert(bad, dst)
        assert info.value.reason == reason
        assert not dst.exists()
        assert not [p for p in tmp_path.iterdir() if "mlxd-tmp" in p.name]


class TestValidate:
    def test_every_component_layer_and_the_image_match_diffusers(
        self, client: Client, tiny_sd: Path, sd_mlx: Path
    ) -> None:
        """Text encoder, UNet, VAE decode/encode, every tapped layer and a 4-step image are within float32 bands."""
        report = client.validate(sd_mlx, tiny_sd)
        assert report.passed, report
        assert report.model_type == "stable_diffusion" and report.band == "float32"
        names = {o.name for o in report.outputs}
        assert {
            "text_encoder.last_hidden_state",
            "unet.noise_pred",
            "vae.decoded",
            "vae.latent_mean",
            "pipeline.image",
        } <= names
        layers = {layer.name for layer in report.layers}
        assert {"unet.mid_block", "unet.up_blocks.1", "vae.decoder.mid_block.attentions.0",
                "text_encoder.text_model.encoder.layers.2"} <= layers  # fmt: skip
        assert all(layer.note == "" for layer in report.layers)
        e2e = json.loads((sd_mlx / "validation.json").read_text())["end_to_end"]
        assert e2e["passed"] and (e2e["psnr_db"] is None or e2e["psnr_db"] >= 40.0)


class TestSD2Shape:
    def test_linear_projections_per_block_heads_and_v_prediction_match_diffusers(self, tmp_path: Path) -> None:
        """An SD-2.x-shaped pipeline (linear proj_in/out, heads per block, GELU, v-prediction) equals diffusers."""
        import numpy as np
        from mlxd_daemon.fixtures.sd import make_sd
        from mlxd_daemon.pipelines import sd
        from mlxd_daemon.pipelines.convert import convert_pipeline
        from mlxd_daemon.pipelines.validate import load_reference, psnr, reference_images

        src = make_sd(tmp_path / "sd2", size="tiny_sd2", scheduler="ddim", schedule={"prediction_type": "v_prediction"})
        convert_pipeline(src, tmp_path / "mlx")
        latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
        got = sd.load(tmp_path / "mlx").generate_image(sd.Request("a photo of a dog", steps=4, latents=latents))
        want = reference_images(load_reference(src), latents, prompt="a photo of a dog")
        assert psnr(want, got["images"]) >= 40.0
