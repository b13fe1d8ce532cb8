"""The served path (compiled graphs over shape buckets) gives what the eager, validated modules give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlxd_client import Client

TEXTS = ["a photo of a cat", "two dogs playing in the snow near a red house", "x"]


class TestBuckets:
    def test_batch_and_length_buckets(self) -> None:
        """Batches round up to powers of two (then multiples of 64); lengths to multiples of 16, capped."""
        from mlxd_daemon.archs._served import batch_bucket, length_bucket, pad_rows

        assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 64, 128, 192]
        assert [length_bucket(n, 77) for n in (1, 16, 17, 70, 77, 80)] == [16, 16, 32, 77, 77, 80]
        padded = pad_rows(np.arange(6).reshape(3, 2), 4)
        assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1]]


class TestClipServed:
    @pytest.fixture(scope="class")
    def bundle(self, tiny_clip: Path) -> object:
        from mlxd_daemon import blas

        blas.preload()
        from mlxd_daemon.archs import clip

        return clip.load(tiny_clip)

    @pytest.mark.parametrize("n_texts,n_images", [(1, 1), (3, 3), (2, 0), (0, 3)])
    def test_equal_to_the_eager_modules(self, bundle: object, n_texts: int, n_images: int) -> None:
        """Served embeddings and similarities equal the eager forward (the one validation checks) to 1e-5."""
        from mlxd_daemon.fixtures import golden_images

        texts, images = TEXTS[:n_texts], golden_images(n_images)
        served = bundle.embed(texts, images)  # type: ignore[attr-defined]
        eager = bundle.forward_outputs(**bundle.preprocess(texts, images))  # type: ignore[attr-defined]
        for name in ("text_embeds", "image_embeds", "logits_per_image"):
            assert served[name].shape == eager[name].shape
            np.testing.assert_allclose(served[name], eager[name], atol=1e-5, rtol=1e-5)

    def test_without_a_compiler_the_cpu_stays_eager(self, bundle: object, monkeypatch: pytest.MonkeyPatch) -> None:
        """MLX's CPU compile needs g++: without one the served path runs eager and gives the same embeddings."""
        from mlxd_daemon.archs import _served
        from mlxd_daemon.archs.clip_served import ClipServed

        monkeypatch.setattr(_served.shutil, "which", lambda name: None)
        eager = ClipServed(bundle)  # type: ignore[arg-type]
        assert not _served.can_compile()
        served = bundle.embed(TEXTS, [])  # type: ignore[attr-defined]
        np.testing.assert_allclose(eager.embed(TEXTS, [])["text_embeds"], served["text_embeds"], atol=1e-5)

    def test_new_sizes_reuse_a_few_graphs(self, bundle: object) -> None:
        """Batches of 1 to 8 images trace at most the four batch buckets 1, 2, 4, 8."""
        from mlxd_daemon.fixtures import golden_images

        images = golden_images(8)
        for n in range(1, 9):
            bundle.embed([], images[:n])  # type: ignore[attr-defined]
        assert {shapes[0][0] for shapes in bundle.served.vision_fn.shapes} <= {1, 2, 4, 8}  # type: ignore[attr-defined]


def test_load_reports_the_warm_up(client: Client, tiny_clip: Path, tmp_path: Path) -> None:
    """Loading compiles the common graphs, and ListModels says how long it took."""
    client.convert(tiny_clip, tmp_path / "clip")
    info = client.load_model(tmp_path / "clip").model
    assert info.warmup_seconds > 0
    client.unload_model(tmp_path / "clip")
