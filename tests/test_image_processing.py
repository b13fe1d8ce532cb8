"""The image pipeline's table lookup and its shortcuts give exactly (bit for bit) what HF's arithmetic gives."""

from __future__ import annotations

import io

import numpy as np
import pytest
from mlxd_daemon.archs.image_processing import (
    ClipImageConfig,
    ImageConfig,
    VitImageConfig,
    image_batch,
    look_up,
    normalize_table,
    preprocess_images,
    rescale_normalize,
)
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.fixtures import golden_images
from PIL import Image

CONFIGS = {
    "clip": ClipImageConfig(),
    "vit": VitImageConfig(),
    "odd": ClipImageConfig(rescale_factor=1 / 127.5, image_mean=(0.1, 0.7, 0.33), image_std=(0.9, 0.05, 0.6)),
    "raw": VitImageConfig(do_rescale=False, do_normalize=False),
}
EVERY_VALUE = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 4, 3))  # each value, each channel


def hf_arithmetic(crop: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """HF's rescale (float64, then rounded to float32) and normalize (float32), written out: float32 HWC."""
    out = crop.astype(np.float32)
    if cfg.do_rescale:
        out = (crop.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        out = (out - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return out


class TestNormalizeTable:
    @pytest.mark.parametrize("name", list(CONFIGS))
    def test_every_value_and_channel_is_bit_identical(self, name: str) -> None:
        """Looking up all 256 values in all 3 channels gives HF's float64 path's bits (and rescale_normalize's)."""
        cfg = CONFIGS[name]
        expected = hf_arithmetic(EVERY_VALUE, cfg)
        got = look_up(np.ascontiguousarray(EVERY_VALUE), normalize_table(cfg))
        assert expected.view(np.uint32).tolist() == got.view(np.uint32).tolist()
        assert (
            rescale_normalize(EVERY_VALUE, cfg).view(np.uint32).tolist()
            == got.transpose(2, 0, 1).view(np.uint32).tolist()
        )

    def test_table_is_shared_and_read_only(self) -> None:
        """One table per config, which no caller can change under the others."""
        assert normalize_table(ClipImageConfig()) is normalize_table(ClipImageConfig())
        assert not normalize_table(ClipImageConfig()).flags.writeable


class TestImageBatch:
    @pytest.mark.parametrize("cfg", [ClipImageConfig(shortest_edge=48, crop_height=40, crop_width=40),
                                     VitImageConfig(height=36, width=30)])  # fmt: skip
    def test_preprocess_images_is_hf_arithmetic_on_the_crops(self, cfg: ImageConfig) -> None:
        """RGB, RGBA, greyscale, small (padded) and large images: pixel values are the float64 path on the crops."""
        images = golden_images(8, size=50)
        crops = image_batch(images, cfg)
        assert (crops.dtype, crops.shape) == (np.uint8, (8, *cfg.output_size, 3))
        expected = np.stack([hf_arithmetic(c, cfg) for c in crops]).transpose(0, 3, 1, 2)
        assert expected.view(np.uint32).tolist() == preprocess_images(images, cfg).view(np.uint32).tolist()

    def test_same_size_resize_is_skipped_and_changes_nothing(self) -> None:
        """An image already at the output size is not resampled: its crop is its own pixels."""
        image = golden_images(1, size=40)[0]
        assert image.size == (40, 40)
        for cfg in (
            ClipImageConfig(shortest_edge=40, crop_height=40, crop_width=40),
            VitImageConfig(height=40, width=40),
        ):
            np.testing.assert_array_equal(np.asarray(image), image_batch([image], cfg)[0])

    def test_greyscale_without_conversion_repeats_its_channel(self) -> None:
        """With do_convert_rgb off, a greyscale image fills all three channels (as the 3-channel mean broadcast
        it before); an RGBA one is a BAD_IMAGE naming it, not a numpy error."""
        cfg = VitImageConfig(height=20, width=20, do_convert_rgb=False)
        grey = Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20), "L")
        crop = image_batch([grey], cfg)[0]
        assert all(np.array_equal(crop[..., c], np.asarray(grey)) for c in range(3))
        rgba = Image.new("RGBA", (20, 20))
        with pytest.raises(InvalidArgument) as e:
            image_batch([grey, rgba], cfg)
        assert (e.value.reason, e.value.metadata["index"]) == ("BAD_IMAGE", "1")


class TestDecode:
    def test_parallel_decode_keeps_order_and_names_the_first_bad_image(self) -> None:
        """Images come back in request order, as RGB; the first undecodable one is the one reported."""
        from mlxd_daemon.handlers import decode_images

        images = golden_images(6, size=20)
        blobs = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            blobs.append(buf.getvalue())
        decoded = decode_images(blobs)
        assert [im.mode for im in decoded] == ["RGB"] * 6
        assert [im.size for im in decoded] == [im.size for im in images]
        np.testing.assert_array_equal(np.asarray(decoded[0]), np.asarray(images[0]))
        with pytest.raises(InvalidArgument) as e:
            decode_images([blobs[0], b"not an image", blobs[1], b"nor this"])
        assert (e.value.reason, e.value.metadata["index"]) == ("BAD_IMAGE", "1")

    def test_transparency_is_composited_onto_white_as_hf_does(self) -> None:
        """An RGBA PNG decodes to what transformers' ``convert_to_rgb`` makes of it (not its RGB with alpha dropped)."""
        from mlxd_daemon.handlers import decode_images
        from transformers.image_transforms import convert_to_rgb

        rgba = np.zeros((8, 8, 4), np.uint8)
        rgba[..., 0] = 200
        rgba[..., 3] = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # every alpha level from clear to opaque
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
        (decoded,) = decode_images([buf.getvalue()])
        want = convert_to_rgb(Image.open(io.BytesIO(buf.getvalue())), return_numpy=True)
        assert decoded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(decoded), want)
        assert not np.array_equal(np.asarray(decoded), rgba[..., :3])
