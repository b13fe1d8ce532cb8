"""Stable Diffusion image generation through a real daemon (GenerateImage, ``mlxctl txt2img``), against diffusers
on the same initial latents, prompt, guidance and steps."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client, cli
from PIL import Image

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlxd_daemon.fixtures.sd import make_sd

    return make_sd(tmp_path_factory.mktemp("hf") / "tiny-sd", scheduler="dpmsolver_multistep", seed=2)


@pytest.fixture(scope="module")
def sd_mlx(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory, daemon: Any) -> Path:
    dst = tmp_path_factory.mktemp("mlx") / "tiny-sd"
    with daemon.client() as c:
        c.convert(tiny_sd, dst, dtype="float32")
    return dst


@pytest.fixture(scope="module")
def reference(tiny_sd: Path) -> Any:
    """diffusers' StableDiffusionPipeline on the source pipeline (float32, CPU)."""
    from mlxd_daemon.pipelines.validate import load_reference

    return load_reference(tiny_sd)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from mlxd_daemon.pipelines.validate import psnr as measure

    return measure(a, b)


def txt2img(daemon: Any, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``mlxctl --json txt2img ...`` in-process against the test daemon; its one JSON object."""
    code = cli.main(["--address", daemon.address, "--no-autostart", "--json", "txt2img", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


class TestTxt2ImgParity:
    @pytest.mark.parametrize("scheduler", ["euler", "euler_ancestral", "ddim", "pndm", "dpmsolver_multistep"])
    def test_mlxctl_with_latents_gives_diffusers_image(
        self, daemon: Any, capsys: pytest.CaptureFixture[str], sd_mlx: Path, reference: Any, tmp_path: Path,
        scheduler: str,
    ) -> None:  # fmt: skip
        """Same latents, prompt, guidance 7.5 and 4 steps: the PNG equals diffusers' image (PSNR >= 40 dB)."""
        from mlxd_daemon.pipelines.validate import reference_images

        latents = np.random.default_rng(5).standard_normal((1, 4, 16, 16)).astype(np.float32)
        np.save(tmp_path / "init.npy", latents)
        r = txt2img(daemon, capsys, str(sd_mlx), PROMPT, "--latents", str(tmp_path / "init.npy"), "--steps", "4",
                    "--guidance", "7.5", "--scheduler", scheduler, "--out", str(tmp_path / "out.png"))  # fmt: skip
        got = np.asarray(Image.open(tmp_path / "out.png"))
        want = reference_images(reference, latents, scheduler=scheduler)[0]
        assert got.shape == want.shape == (32, 32, 3)
        assert psnr(want, got) >= 40.0
        assert r["steps"] == 4 and r["files"] == [str(tmp_path / "out.png")]

    def test_seed_alone_reproduces_diffusers_generator(self, client: Client, sd_mlx: Path, reference: Any) -> None:
        """Without latents, --seed draws the initial latents as diffusers' torch.Generator does (2 images)."""
        import torch

        images, result = client.generate_image(sd_mlx, PROMPT, steps=3, seed=7, num_images=2, negative_prompt="dog")
        want = reference(PROMPT, negative_prompt="dog", num_inference_steps=3, num_images_per_prompt=2,
                         generator=torch.Generator().manual_seed(7), output_type="np").images  # fmt: skip
        want = (want * 255).round().astype(np.uint8)
        got = [np.asarray(Image.open(io.BytesIO(png))) for png in images]
        assert result.num_images == 2 and result.scheduler == "DPMSolverMultistepScheduler"
        assert min(psnr(w, g) for w, g in zip(want, got, strict=True)) >= 40.0


class TestImg2Img:
    def test_init_image_and_strength_match_diffusers_img2img(
        self, client: Client, sd_mlx: Path, reference: Any
    ) -> None:
        """An init image with strength 0.5 over 4 steps equals StableDiffusionImg2ImgPipeline's result."""
        import diffusers
        import torch
        from mlxd_daemon.golden import golden_images

        init = golden_images(1, size=32)[0].convert("RGB").resize((32, 32))
        buffer = io.BytesIO()
        init.save(buffer, format="PNG")
        images, result = client.generate_image(sd_mlx, PROMPT, steps=4, seed=1, image=buffer.getvalue(), strength=0.5)
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(PROMPT, image=init, strength=0.5, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
        got = np.asarray(Image.open(io.BytesIO(images[0])))
        assert result.steps == 2  # 4 steps x strength 0.5
        assert psnr((want * 255).round().astype(np.uint8), got) >= 40.0


class TestStreamAndLimits:
    def test_streams_one_step_event_per_step_then_images(self, client: Client, sd_mlx: Path) -> None:
        """ImageStep 1..N in order, then one GeneratedImage per image, then the result."""
        events = list(client.generate_image_events(sd_mlx, PROMPT, steps=3, num_images=2))
        steps = [e.step for e in events if isinstance(e, pb.ImageStep)]
        assert steps == [1, 2, 3]
        images = [e for e in events if isinstance(e, pb.GeneratedImage)]
        assert [i.index for i in images] == [0, 1] and all(i.png.startswith(b"\x89PNG") for i in images)
        assert isinstance(events[-1], pb.GenerateImageResult) and events[-1].seconds_per_step > 0

    def test_closing_the_stream_cancels_and_the_daemon_keeps_serving(self, client: Client, sd_mlx: Path) -> None:
        """A client that stops reading after the first step cancels the run; the next request still works."""
        events = client.generate_image_events(sd_mlx, PROMPT, steps=200)
        first = next(iter(events))
        assert isinstance(first, pb.ImageStep) and first.total == 200
        events.close()  # type: ignore[attr-defined]
        images, result = client.generate_image(sd_mlx, PROMPT, steps=2)
        assert len(images) == 1 and result.steps == 2

    def test_long_prompt_is_truncated_and_said(self, client: Client, sd_mlx: Path) -> None:
        """A prompt over the tokenizer's 77 tokens is cut as diffusers cuts it, and the result says what went."""
        prompt = " ".join(["a photo of a cat"] * 30) + " zebra"
        _, result = client.generate_image(sd_mlx, prompt, steps=1)
        assert result.truncated and result.truncated_text.strip().endswith("zebra")

    def test_pipeline_is_resident_with_its_size_counted(self, client: Client, sd_mlx: Path) -> None:
        """After generating, ListModels shows the pipeline as stable_diffusion with its bytes counted."""
        models = {m.id: m for m in client.list_models().models}
        info = models[str(sd_mlx.resolve())]
        assert info.model_type == "stable_diffusion" and info.resident_bytes > 8_000_000


class TestFloat16:
    def test_float16_computed_in_float16_gives_finite_images(
        self, tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """fp16 weights with fp16 compute (as on a GPU): no NaN, not black, close to the float32 image."""
        from mlxd_daemon.pipelines import sd
        from mlxd_daemon.pipelines.convert import convert_pipeline

        convert_pipeline(tiny_sd, tmp_path / "fp16", dtype="float16")
        latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
        request = sd.Request(PROMPT, steps=4, latents=latents)
        monkeypatch.setenv("MLXD_QUANTIZED_COMPUTE", "kernels")  # keep the stored float16 for compute on the CPU
        half = sd.load(tmp_path / "fp16")
        assert half.compute_dtype == "float16" and half.component_dtypes["vae"] == "float32"
        got = half.generate_image(request)["images"]
        monkeypatch.setenv("MLXD_QUANTIZED_COMPUTE", "dequantize")
        full = sd.load(tmp_path / "fp16").generate_image(request)["images"]
        assert np.isfinite(got).all() and got.max() > 0
        assert psnr(full, got) >= 25.0
