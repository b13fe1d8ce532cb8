"""The served path (compiled graphs over shape buckets) gives what the eager, validated modules give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlxd_client import Client


@pytest.fixture(scope="module", autouse=True)
def optimized_blas() -> None:
    """The BLAS the models worker uses; it must load before anything imports mlx.core."""
    from mlxd_daemon import blas

    blas.preload()


TEXTS = ["a photo of a cat", "two dogs playing in the snow near a red house", "x", "a b", "the end of the text"]


class TestBuckets:
    def test_batch_and_length_buckets(self) -> None:
        """Batches round up to powers of two (then multiples of 64); lengths on the CPU to multiples of 4, capped."""
        from mlxd_daemon.archs._served import batch_bucket, length_bucket, pad_length, pad_rows

        assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 64, 128, 192]
        assert [length_bucket(n, 77) for n in (1, 4, 5, 17, 75, 77, 80)] == [4, 4, 8, 20, 76, 77, 80]
        padded = pad_rows(np.arange(6).reshape(3, 2), 4)
        assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1]]
        ids, mask = pad_length(77, (np.full((2, 3), 7), 9), (np.ones((2, 3), np.int64), 0))
        assert (ids.tolist(), mask.tolist()) == ([[7, 7, 7, 9]] * 2, [[1, 1, 1, 0]] * 2)

    def test_warm_up_lengths(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The warm-up traces the shortest and longest text on the CPU, and every length bucket on a GPU, so a
        first request of any length finds its batch-1 graph compiled there."""
        from mlxd_daemon.archs import _served

        assert _served.warm_lengths(77) == [1, 77]
        monkeypatch.setattr(_served, "_on_cpu", lambda: False)
        assert _served.warm_lengths(77) == [16, 32, 48, 64, 77]
        assert {_served.length_bucket(n, 77) for n in range(1, 78)} == set(_served.warm_lengths(77))


class TestClipServed:
    @pytest.fixture(scope="class")
    def bundle(self, tiny_clip: Path) -> object:
        from mlxd_daemon.archs import clip

        return clip.load(tiny_clip)

    @pytest.mark.parametrize("n_texts,n_images", [(1, 1), (3, 3), (2, 0), (0, 3), (5, 5)])
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

    def test_images_unchanged_by_the_table(self, bundle: object, monkeypatch: pytest.MonkeyPatch) -> None:
        """Image embeddings are bit-identical whether pixels are looked up on the host, in the graph, or computed
        by HF's float64 arithmetic."""
        from mlxd_daemon.fixtures import golden_images

        served_images_unchanged(bundle.served, golden_images(5), monkeypatch)  # type: ignore[attr-defined]

    def test_a_model_without_tokenizer_files_warms_up(self, tiny_clip: Path, tmp_path: Path) -> None:
        """The warm-up runs on token ids: a CLIP without tokenizer files loads and embeds images."""
        import shutil

        from mlxd_daemon.archs import clip
        from mlxd_daemon.archs._tokenless import TOKENIZER_FILES
        from mlxd_daemon.fixtures import golden_images

        bare = tmp_path / "bare"
        shutil.copytree(tiny_clip, bare)
        for name in TOKENIZER_FILES:
            (bare / name).unlink(missing_ok=True)
        bundle = clip.load(bare)
        assert bundle.tokenizer is None and bundle.warm_up() > 0
        assert bundle.embed([], golden_images(2))["image_embeds"].shape[0] == 2

    def test_new_sizes_reuse_a_few_graphs(self, bundle: object) -> None:
        """Batches of 1 to 8 images trace at most the four batch buckets 1, 2, 4, 8."""
        from mlxd_daemon.fixtures import golden_images

        images = golden_images(8)
        for n in range(1, 9):
            bundle.embed([], images[:n])  # type: ignore[attr-defined]
        assert {shapes[0][0] for shapes in bundle.served.vision_fn.shapes} <= {1, 2, 4, 8}  # type: ignore[attr-defined]


class TestPixelTable:
    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_lookup_in_the_graph_is_the_float64_path(self, dtype: str) -> None:
        """uint8 crops looked up in MLX (as on a GPU) give the compute-dtype cast of HF's float64 path, bit for bit."""
        import mlx.core as mx
        from mlxd_daemon.archs._served import PixelTable
        from mlxd_daemon.archs.image_processing import ClipImageConfig, image_batch, rescale_normalize
        from mlxd_daemon.fixtures import golden_images

        cfg = ClipImageConfig(shortest_edge=40, crop_height=32, crop_width=32)
        crops = image_batch(golden_images(4, size=40), cfg)
        expected = mx.array(np.stack([rescale_normalize(c, cfg) for c in crops]).transpose(0, 2, 3, 1))
        table = PixelTable(cfg, getattr(mx, dtype))
        got = table(mx.array(crops))
        assert got.dtype == getattr(mx, dtype)
        assert mx.array_equal(expected.astype(got.dtype), got).item()
        assert mx.array_equal(got, table(mx.array(table.host(crops)))).item()  # the CPU's numpy lookup


def served_images_unchanged(served: object, images: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    """The served forward of ``images`` gives the same bits with the lookup on the host (the CPU's way), in the
    graph (a GPU's way) and with pixels from HF's float64 path (what it took before the table)."""
    from mlxd_daemon.archs import _served
    from mlxd_daemon.archs.image_processing import rescale_normalize

    def run() -> np.ndarray:
        out = served.embed([], images) if hasattr(served, "text_fn") else served.embed(images)  # type: ignore[attr-defined]
        return np.asarray(out["image_embeds"])

    host = run()
    crops = served.pixels.batch(images)  # type: ignore[attr-defined]
    with monkeypatch.context() as m:
        m.setattr(_served.PixelTable, "host", lambda self, crops: crops)
        in_graph = run()
        cfg = served.pixels.cfg  # type: ignore[attr-defined]
        float64 = np.stack([rescale_normalize(c, cfg) for c in crops]).transpose(0, 2, 3, 1)
        m.setattr(_served.PixelTable, "batch", lambda self, images: float64)
        from_float64 = run()
    assert host.tobytes() == in_graph.tobytes() == from_float64.tobytes()


def test_load_reports_the_warm_up(client: Client, tiny_clip: Path, tmp_path: Path) -> None:
    """Loading compiles the common graphs, and ListModels says how long it took."""
    client.convert(tiny_clip, tmp_path / "clip")
    info = client.load_model(tmp_path / "clip").model
    assert info.warmup_seconds > 0
    client.unload_model(tmp_path / "clip")


class TestBertServed:
    @pytest.fixture(scope="class")
    def bundle(self, tmp_path_factory: pytest.TempPathFactory) -> object:
        """A tiny BERT sequence classifier with max pooling: padded positions would raise a max if pooled."""
        from mlxd_daemon.archs import bert
        from mlxd_daemon.fixtures import make_bert

        return bert.load(make_bert(tmp_path_factory.mktemp("bert") / "cls", classifier=True, pooling="max"))

    @pytest.mark.parametrize("n", [1, 3, 5])
    def test_equal_to_each_text_alone(self, bundle: object, n: int) -> None:
        """Each text's served embedding and logits (its batch padded to a row bucket, its length to a length
        bucket) equal the eager forward of that text alone, with no padding at all, to float32 tolerance."""
        from mlxd_daemon.archs.bert_processing import tokenize

        served = bundle.embed(TEXTS[:n], [])  # type: ignore[attr-defined]
        for i, text in enumerate(TEXTS[:n]):
            alone = bundle.forward_outputs(**tokenize(bundle.tokenizer, [text]))  # type: ignore[attr-defined]
            np.testing.assert_allclose(served["text_embeds"][i], alone["text_embeds"][0], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(served["logits"][i], alone["logits"][0], atol=1e-5, rtol=1e-5)

    def test_padding_is_masked(self, bundle: object) -> None:
        """The padded tokens would change a text's embedding if attended to and pooled: the mask keeps them out."""
        from mlxd_daemon.archs._served import evaluate, pad_length
        from mlxd_daemon.archs.bert_processing import tokenize

        inputs = tokenize(bundle.tokenizer, ["x"])  # type: ignore[attr-defined]
        ids, mask, types = pad_length(64, *((inputs[k], 0) for k in ("input_ids", "attention_mask", "token_type_ids")))
        assert ids.shape[1] > inputs["input_ids"].shape[1]
        compiled = bundle.served.fn.compiled  # type: ignore[attr-defined]
        unmasked = evaluate({"text_embeds": compiled(ids, np.ones_like(mask), types)[0]})
        masked = bundle.served.forward(inputs)  # type: ignore[attr-defined]
        alone = bundle.forward_outputs(**inputs)  # type: ignore[attr-defined]
        np.testing.assert_allclose(masked["text_embeds"], alone["text_embeds"], atol=1e-5, rtol=1e-5)
        assert np.abs(unmasked["text_embeds"] - alone["text_embeds"]).max() > 1e-3

    def test_empty_and_warm_up(self, bundle: object) -> None:
        """No texts give empty arrays of the right widths; the warm-up traces the batch-1 graphs."""
        out = bundle.embed([], [])  # type: ignore[attr-defined]
        assert (out["text_embeds"].shape, out["logits"].shape) == ((0, 32), (0, 3))
        assert bundle.warm_up() > 0  # type: ignore[attr-defined]
        assert {shapes[0][0] for shapes in bundle.served.fn.compiled.shapes} >= {1}  # type: ignore[attr-defined]


class TestVitServed:
    @pytest.fixture(scope="class")
    def bundle(self, tmp_path_factory: pytest.TempPathFactory) -> object:
        from mlxd_daemon.archs import vit
        from mlxd_daemon.fixtures import make_vit

        return vit.load(make_vit(tmp_path_factory.mktemp("vit") / "cls"))

    @pytest.mark.parametrize("n", [1, 3, 5])
    def test_equal_to_the_eager_modules(self, bundle: object, n: int) -> None:
        """Served embeddings and logits of n images (padded to row buckets, maybe split over CPU streams) equal
        the eager forward of the same batch."""
        from mlxd_daemon.archs.image_processing import preprocess_images
        from mlxd_daemon.fixtures import golden_images

        images = golden_images(n, 40)
        served = bundle.embed([], images)  # type: ignore[attr-defined]
        eager = bundle.forward_outputs(preprocess_images(images, bundle.image_config))  # type: ignore[attr-defined]
        for name in ("image_embeds", "logits"):
            assert served[name].shape == eager[name].shape
            np.testing.assert_allclose(served[name], eager[name], atol=1e-5, rtol=1e-5)
        assert served["labels"] == bundle.config.labels  # type: ignore[attr-defined]

    def test_images_unchanged_by_the_table(self, bundle: object, monkeypatch: pytest.MonkeyPatch) -> None:
        """Embeddings are bit-identical whether pixels are looked up on the host, in the graph, or computed by HF's
        float64 arithmetic."""
        from mlxd_daemon.fixtures import golden_images

        served_images_unchanged(bundle.served, golden_images(3, 40), monkeypatch)  # type: ignore[attr-defined]

    def test_warm_up_traces_batch_one(self, bundle: object) -> None:
        """The load-time warm-up traces the batch-1 graph and says how long it took."""
        assert bundle.warm_up() > 0  # type: ignore[attr-defined]
        assert (1, 32, 32, 3) in {shapes[0] for shapes in bundle.served.fn.compiled.shapes}  # uint8 NHWC crops  # type: ignore[attr-defined]
