"""CLIP end to end through a real daemon: convert -> validate -> infer, over gRPC on a unix socket."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client import Client
from mlxd_client.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnsupportedError
from safetensors import safe_open

TEXTS = ["a photo of a cat", "a diagram of a red circle", "blue square on a gradient"]


def hf_reference(src: Path, texts: list[str], images: list[Path]) -> dict[str, np.ndarray]:
    """transformers' CLIPModel and CLIPProcessor on the same inputs: the ground truth."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(src, torch_dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(src)
    pil = [Image.open(p) for p in images]  # the processor makes them RGB (transparency onto white)
    inputs = processor(text=texts, images=pil, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return {
        "text_embeds": out.text_embeds.numpy(),
        "image_embeds": out.image_embeds.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
    }


def convert(client: Client, src: Path, dst: Path, **options: object) -> tuple[list[pb.Progress], pb.ConvertResult]:
    events = list(client.convert_events(src, dst, **options))  # type: ignore[arg-type]
    progress = [e for e in events if isinstance(e, pb.Progress)]
    results = [e for e in events if isinstance(e, pb.ConvertResult)]
    assert len(results) == 1
    return progress, results[0]


class TestClipFloat32:
    def test_convert_streams_progress_and_writes_mlx_layout(
        self, client: Client, tiny_clip: Path, tmp_path: Path
    ) -> None:
        """Convert streams begin/report/end events and writes config, weights and tokenizer files."""
        dst = tmp_path / "mlx"
        progress, result = convert(client, tiny_clip, dst)
        kinds = [p.kind for p in progress]
        assert pb.Progress.KIND_BEGIN in kinds and pb.Progress.KIND_END in kinds
        reports = [p for p in progress if p.kind == pb.Progress.KIND_REPORT]
        assert reports and reports[-1].items_done == reports[-1].items_total == result.num_tensors
        assert result.job_id and all(p.job_id == result.job_id for p in progress)
        assert result.model_type == "clip"
        assert result.dtype == pb.DTYPE_FLOAT32
        for name in (
            "config.json",
            "model.safetensors",
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
            "preprocessor_config.json",
        ):
            assert (dst / name).is_file(), name
        for name in (
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "preprocessor_config.json",
        ):
            if (tiny_clip / name).exists():
                assert (dst / name).read_bytes() == (tiny_clip / name).read_bytes(), name
        with safe_open(dst / "model.safetensors", framework="numpy") as f:
            meta = f.metadata()
            # PyTorch conv layout on disk (mlx-examples transposes at load), and the layout is recorded.
            assert f.get_slice("vision_model.embeddings.patch_embedding.weight").get_shape()[1] == 3
            assert "position_ids" not in " ".join(f.keys())
        assert meta["format"] == "mlx"
        assert json.loads(meta["mlxd.layout"]) == {
            "vision_model.embeddings.patch_embedding.weight": "pytorch_conv2d_OIHW"
        }

    def test_validate_passes(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """A correct float32 conversion validates against transformers with embeddings within 1e-4."""
        dst = tmp_path / "mlx"
        convert(client, tiny_clip, dst)
        report = client.validate(dst, tiny_clip)
        assert report.passed
        names = {o.name for o in report.outputs}
        assert {"text_embeds", "image_embeds", "logits_per_image"} <= names
        for o in report.outputs:
            assert o.passed, o
            if o.name.endswith("embeds"):
                assert o.max_abs <= 1e-4 and o.cosine > 0.99999
        assert report.matching_agreement == 1.0
        assert json.loads((dst / "validation.json").read_text())["passed"] is True

    def test_infer_matches_transformers(
        self, client: Client, tiny_clip: Path, tmp_path: Path, golden_pngs: list[Path]
    ) -> None:
        """Infer returns text/image embeddings and the similarity matrix that transformers computes."""
        dst = tmp_path / "mlx"
        convert(client, tiny_clip, dst)
        result = client.infer(dst, texts=TEXTS, images=golden_pngs)
        expected = hf_reference(tiny_clip, TEXTS, golden_pngs)
        assert result.text_embeds.shape == expected["text_embeds"].shape
        np.testing.assert_allclose(result.text_embeds, expected["text_embeds"], atol=1e-4)
        np.testing.assert_allclose(result.image_embeds, expected["image_embeds"], atol=1e-4)
        np.testing.assert_allclose(result.logits_per_image, expected["logits_per_image"], atol=1e-3)
        models = {m.id: m for m in client.list_models().models}
        assert str(dst) in models and models[str(dst)].resident_bytes > 0
        assert models[str(dst)].infer_count >= 1


class TestClipOtherSources:
    @pytest.mark.parametrize(
        ("dtype", "weights_format"),
        [("bfloat16", "safetensors"), ("float32", "bin"), ("float16", "safetensors")],
    )
    def test_convert_validate_infer(
        self, client: Client, tmp_path: Path, golden_pngs: list[Path], dtype: str, weights_format: str
    ) -> None:
        """bf16, fp16 and .bin checkpoints convert (keeping their dtype), validate and infer."""
        from mlxd_daemon.fixtures import make_clip

        src = make_clip(tmp_path / "hf", size="tiny", dtype=dtype, weights_format=weights_format, seed=1)
        dst = tmp_path / "mlx"
        _, result = convert(client, src, dst)
        assert (
            result.dtype
            == {"float32": pb.DTYPE_FLOAT32, "bfloat16": pb.DTYPE_BFLOAT16, "float16": pb.DTYPE_FLOAT16}[dtype]
        )
        report = client.validate(dst, src)
        assert report.passed, [o for o in report.outputs if not o.passed]
        out = client.infer(dst, texts=TEXTS[:2], images=golden_pngs[:1])
        assert out.logits_per_image.shape == (1, 2)
        np.testing.assert_allclose(np.linalg.norm(out.text_embeds, axis=-1), 1.0, atol=1e-3)

    def test_bf16_weights_are_bit_exact(self, client: Client, tmp_path: Path) -> None:
        """A bf16 source keeps every weight bit when converted with dtype auto."""
        import torch
        from mlxd_daemon.fixtures import make_clip
        from safetensors.torch import load_file

        src = make_clip(tmp_path / "hf", size="tiny", dtype="bfloat16", seed=2)
        dst = tmp_path / "mlx"
        convert(client, src, dst)
        before, after = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
        for name, tensor in after.items():
            assert tensor.dtype == torch.bfloat16, name
            assert torch.equal(tensor.view(torch.int16), before[name].view(torch.int16)), name


class TestErrors:
    def test_missing_source_is_not_found(self, client: Client, tmp_path: Path, daemon: object) -> None:
        """A source that does not exist fails with NOT_FOUND and the daemon keeps serving."""
        with pytest.raises(NotFoundError) as err:
            client.convert(tmp_path / "nope", tmp_path / "out")
        assert err.value.reason == "SOURCE_NOT_FOUND"
        assert not (tmp_path / "out").exists()
        assert client.initialize().protocol_version == 1

    def test_existing_output_is_failed_precondition(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """An existing destination is refused without --overwrite and left untouched."""
        dst = tmp_path / "mlx"
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
        with pytest.raises(FailedPreconditionError) as err:
            client.convert(tiny_clip, dst)
        assert err.value.reason == "OUTPUT_EXISTS"
        assert "--overwrite" in err.value.message
        assert (dst / "keep.txt").read_text() == "mine"
        convert(client, tiny_clip, dst, overwrite=True)
        assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()

    def test_unknown_model_type_is_unimplemented(self, client: Client, tmp_path: Path) -> None:
        """An unsupported model_type fails with UNIMPLEMENTED before any weight is read."""
        src = tmp_path / "weird"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
        with pytest.raises(UnsupportedError) as err:
            client.convert(src, tmp_path / "out")
        assert err.value.reason == "UNSUPPORTED_ARCHITECTURE"
        assert "no_such_arch" in err.value.message and "closest supported" in err.value.message
        assert not (tmp_path / "out").exists()

    def test_bad_image_is_invalid_argument(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """Bytes that are not an image fail Infer with INVALID_ARGUMENT naming the image."""
        dst = tmp_path / "mlx"
        convert(client, tiny_clip, dst)
        with pytest.raises(InvalidArgumentError) as err:
            client.infer(dst, texts=["x"], images=[b"not an image"])
        assert err.value.reason == "BAD_IMAGE"

    def test_health_still_serving_after_errors(self, daemon: object, client: Client, tmp_path: Path) -> None:
        """After failed requests the standard health check still reports SERVING."""
        from mlxd_client.discovery import is_serving

        with pytest.raises(NotFoundError):
            client.infer(tmp_path / "missing", texts=["x"])
        assert is_serving(client.address)
