"""Infer with preprocessed tensors (issue 20), through a real daemon: CLIP, ViT and BERT given the arrays Hugging
Face's processors output answer what the same texts/images give (one served path) and what transformers' models give;
a bad tensor is INVALID_ARGUMENT with a reason the client can act on, and the daemon serves on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DaemonProcess
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError
from mlxd_daemon.fixtures import golden_images, make_bert, make_vit
from PIL import Image

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
TEXTS = ["a photo of a cat", "a diagram of a red circle", "blue square on a gradient"]
CLIP_OUTPUTS = ("text_embeds", "image_embeds", "logits_per_image")


def converted(daemon: DaemonProcess, src: Path, dst: Path) -> Path:
    with daemon.client() as c:
        c.convert(src, dst)
    return dst


def crops(processor: Any, images: list[Any]) -> np.ndarray:
    """uint8 NHWC crops from the image processor with its rescale and normalize turned off (the ``pixels`` form)."""
    raw = processor(images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    return np.ascontiguousarray(np.asarray(raw).round().astype(np.uint8).transpose(0, 2, 3, 1))


def refused(client: Client, model: Path, **request: Any) -> str:
    """The reason of the INVALID_ARGUMENT that ``request`` gets."""
    with pytest.raises(InvalidArgumentError) as e:
        client.infer(model, **request)
    return str(e.value.reason)


@pytest.fixture(scope="module")
def clip_mlx(daemon: DaemonProcess, tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted(daemon, tiny_clip, tmp_path_factory.mktemp("tensors") / "clip")


@pytest.fixture(scope="module")
def clip_processor(tiny_clip: Path) -> Any:
    return transformers.CLIPProcessor.from_pretrained(tiny_clip)


class TestClip:
    def test_tensors_answer_as_texts_and_images(
        self, client: Client, clip_mlx: Path, tiny_clip: Path, clip_processor: Any, golden_pngs: list[Path]
    ) -> None:
        """CLIPProcessor's input_ids, attention_mask and pixel_values give what the texts and PNGs give (the same
        compiled graphs) and what transformers' CLIPModel gives on them (embeddings 1e-4, logits 1e-3); fp16 pixels
        are accepted."""
        enc = clip_processor(text=TEXTS, images=[Image.open(p) for p in golden_pngs], padding=True, return_tensors="pt")
        tensors = client.infer(clip_mlx, inputs={k: v.numpy() for k, v in enc.items()})
        same = client.infer(clip_mlx, texts=TEXTS, images=golden_pngs)
        with torch.no_grad():
            hf = transformers.CLIPModel.from_pretrained(tiny_clip, dtype=torch.float32).eval()(**enc)
        for name, atol in zip(CLIP_OUTPUTS, (1e-4, 1e-4, 1e-3), strict=True):
            assert getattr(tensors, name).shape == getattr(same, name).shape
            np.testing.assert_allclose(getattr(tensors, name), getattr(same, name), atol=1e-6)
            np.testing.assert_allclose(getattr(tensors, name), getattr(hf, name).numpy(), atol=atol)
        assert tensors.batch_requests == 1
        half = client.infer(clip_mlx, inputs={"pixel_values": enc["pixel_values"].half().numpy()})
        np.testing.assert_allclose(half.image_embeds, same.image_embeds, atol=1e-2)

    def test_uint8_pixels_answer_as_images(
        self, client: Client, clip_mlx: Path, clip_processor: Any, golden_pngs: list[Path]
    ) -> None:
        """uint8 crops (``pixels``, normalized by the daemon) give the images' embeddings; images only leave the
        texts empty, as with images alone."""
        pixels = crops(clip_processor.image_processor, [Image.open(p) for p in golden_pngs])
        out = client.infer(clip_mlx, inputs={"pixels": pixels})
        same = client.infer(clip_mlx, images=golden_pngs)
        for name in CLIP_OUTPUTS:
            assert getattr(out, name).shape == getattr(same, name).shape
        np.testing.assert_allclose(out.image_embeds, same.image_embeds, atol=1e-6)

    def test_large_payloads_answer_as_small_ones(
        self, client: Client, clip_mlx: Path, clip_processor: Any, golden_pngs: list[Path]
    ) -> None:
        """pixel_values above ``spool.MIN_BYTES`` (8 images, 86 KB: they cross to the models worker in a /dev/shm
        file where there is one) answer as each image sent alone (in the message); no spool file is left behind."""
        from mlxd_daemon import spool

        images = [Image.open(p) for p in golden_pngs]
        values = clip_processor.image_processor((images * 3)[:8], return_tensors="np")["pixel_values"]
        assert values.nbytes >= spool.MIN_BYTES
        out = client.infer(clip_mlx, inputs={"pixel_values": values})
        alone = [client.infer(clip_mlx, inputs={"pixel_values": values[i : i + 1]}).image_embeds for i in range(8)]
        np.testing.assert_allclose(out.image_embeds, np.concatenate(alone), atol=1e-6)
        if spool.DIR.is_dir():
            assert not list(spool.DIR.glob(f"{spool.PREFIX}*"))

    def test_int32_ids_without_a_mask(self, client: Client, clip_mlx: Path, clip_processor: Any) -> None:
        """int32 token ids of one text with no attention_mask (all ones) give the text's embedding."""
        ids = clip_processor.tokenizer(TEXTS[:1], return_tensors="np")["input_ids"].astype(np.int32)
        out = client.infer(clip_mlx, inputs={"input_ids": ids})
        np.testing.assert_allclose(out.text_embeds, client.infer(clip_mlx, texts=TEXTS[:1]).text_embeds, atol=1e-6)
        assert out.image_embeds.shape == (0, out.text_embeds.shape[1]) and out.logits_per_image.shape == (0, 1)

    def test_bad_tensors_are_invalid_argument(self, client: Client, clip_mlx: Path, clip_processor: Any) -> None:
        """Each wrong name, dtype, shape or value, and tensors mixed with texts, is INVALID_ARGUMENT with its reason;
        a good request still answers after them."""
        cfg = json.loads((clip_mlx / "config.json").read_text())
        positions, vocab = cfg["text_config"]["max_position_embeddings"], cfg["text_config"]["vocab_size"]
        size = cfg["vision_config"]["image_size"]
        enc = clip_processor.tokenizer(TEXTS, padding=True, return_tensors="np")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pixels = np.zeros((1, size, size, 3), np.uint8)
        cases = {
            "UNKNOWN_INPUT": {"input_ids": ids, "token_type_ids": np.zeros_like(ids)},
            "BAD_INPUT_DTYPE": {"input_ids": ids.astype(np.float32)},
            "BAD_INPUT_SHAPE": {"input_ids": ids, "attention_mask": mask[:2]},
            "TEXT_TOO_LONG": {"input_ids": np.zeros((1, positions + 1), np.int64)},
            "BAD_INPUT_VALUE": {"input_ids": np.full((1, 3), vocab, np.int64)},
            "MISSING_INPUT": {"attention_mask": mask},
            "BAD_IMAGE_SIZE": {"pixel_values": np.zeros((1, 3, size + 1, size + 1), np.float32)},
            "MIXED_INPUTS": {"pixels": pixels, "pixel_values": np.zeros((1, 3, size, size), np.float32)},
        }
        for reason, inputs in cases.items():
            assert refused(client, clip_mlx, inputs=inputs) == reason, inputs.keys()
        assert refused(client, clip_mlx, inputs={"input_ids": ids, "attention_mask": mask * 2}) == "BAD_INPUT_VALUE"
        assert refused(client, clip_mlx, inputs={"input_ids": ids, "attention_mask": mask * 0}) == "BAD_INPUT_VALUE"
        assert refused(client, clip_mlx, inputs={"input_ids": ids[0]}) == "BAD_INPUT_SHAPE"
        assert refused(client, clip_mlx, inputs={"pixels": pixels.astype(np.float32)}) == "BAD_INPUT_DTYPE"
        assert refused(client, clip_mlx, inputs={"pixels": pixels}, texts=["a cat"]) == "MIXED_INPUTS"
        assert client.infer(clip_mlx, inputs={"pixels": pixels}).image_embeds.shape[0] == 1


class TestVit:
    def test_pixel_values_and_pixels_answer_as_images(
        self, client: Client, daemon: DaemonProcess, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        """ViTImageProcessor's pixel_values, and uint8 crops, give the images' logits, embeddings and labels, and
        transformers' logits (1e-4); token ids are UNKNOWN_INPUT."""
        src = make_vit(tmp_path_factory.mktemp("tensors") / "vit-src")
        mlx = converted(daemon, src, tmp_path_factory.mktemp("tensors") / "vit")
        images = golden_images(3, 40)
        pngs = []
        for i, image in enumerate(images):
            pngs.append(mlx.parent / f"{i}.png")
            image.save(pngs[-1])
        processor = transformers.ViTImageProcessor.from_pretrained(src)
        values = processor(images, return_tensors="pt")["pixel_values"]
        same = client.infer(mlx, images=pngs)
        with torch.no_grad():
            hf = transformers.ViTForImageClassification.from_pretrained(src).eval()(pixel_values=values).logits
        for out in (client.infer(mlx, inputs={"pixel_values": values.numpy()}),
                    client.infer(mlx, inputs={"pixels": crops(processor, images)})):  # fmt: skip
            np.testing.assert_allclose(out.logits, same.logits, atol=1e-6)
            np.testing.assert_allclose(out.image_embeds, same.image_embeds, atol=1e-6)
            np.testing.assert_allclose(out.logits, hf.numpy(), atol=1e-4)
            assert out.labels == same.labels and len(out.labels) == out.logits.shape[1]
        assert refused(client, mlx, inputs={"input_ids": np.zeros((1, 4), np.int64)}) == "UNKNOWN_INPUT"


class TestBert:
    def test_token_arrays_answer_as_texts(
        self, client: Client, daemon: DaemonProcess, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        """A classifier given AutoTokenizer's input_ids, attention_mask and token_type_ids answers the texts'
        embeddings, logits and labels, and transformers' logits (1e-4); bad segments and pixels are refused."""
        src = make_bert(tmp_path_factory.mktemp("tensors") / "bert-src", seed=1, classifier=True)
        mlx = converted(daemon, src, tmp_path_factory.mktemp("tensors") / "bert")
        texts = ["this movie was great", "terrible and boring", "fine"]
        enc = transformers.AutoTokenizer.from_pretrained(src)(texts, padding=True, return_tensors="pt")
        out = client.infer(mlx, inputs={k: v.numpy() for k, v in enc.items()})
        same = client.infer(mlx, texts=texts)
        with torch.no_grad():
            hf = transformers.BertForSequenceClassification.from_pretrained(src).eval()(**enc).logits
        np.testing.assert_allclose(out.text_embeds, same.text_embeds, atol=1e-6)
        np.testing.assert_allclose(out.logits, same.logits, atol=1e-6)
        np.testing.assert_allclose(out.logits, hf.numpy(), atol=1e-4)
        assert out.labels == same.labels == ["negative", "neutral", "positive"]
        ids = enc["input_ids"].numpy()
        assert refused(client, mlx, inputs={"input_ids": ids, "token_type_ids": ids * 0 + 2}) == "BAD_INPUT_VALUE"
        assert refused(client, mlx, inputs={"pixel_values": np.zeros((1, 3, 4, 4), np.float32)}) == "UNKNOWN_INPUT"
