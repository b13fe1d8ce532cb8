"""Dynamic batching: concurrent Infer requests share one forward pass, each gets exactly its own answer."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import DaemonProcess
from mlxd_client import Client
from mlxd_client.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def windowed(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DaemonProcess, Path]:
    """A daemon holding each lone request 300 ms, so requests sent together land in one batch."""
    with tempfile.TemporaryDirectory(prefix="mlxd-batch-") as root:
        d = DaemonProcess(Path(root), "--batch-window-ms", "300")
        dst = tmp_path_factory.mktemp("batch") / "mlx"
        with d.client() as c:
            c.convert(tiny_clip, dst)
            c.load_model(dst)
        yield d, dst
        d.stop()


def test_batched_results_equal_solo_results(windowed: tuple[DaemonProcess, Path], golden_pngs: list[Path]) -> None:
    """Three concurrent requests (one with a bad image) → two correct answers from one batch, one BAD_IMAGE."""
    daemon, model = windowed
    requests = [
        {"texts": ["a red circle"], "images": [golden_pngs[0]]},
        {"texts": ["a blue square", "two cats"], "images": golden_pngs[1:3]},
        {"texts": ["x"], "images": [b"not an image"]},
    ]
    results: list[object] = [None] * 3

    def call(i: int) -> None:
        with Client(daemon.address, autostart=False) as c:
            try:
                results[i] = c.infer(model, **requests[i])  # type: ignore[arg-type]
            except InvalidArgumentError as e:
                results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results[2], InvalidArgumentError) and results[2].reason == "BAD_IMAGE"
    with daemon.client() as c:
        for i in (0, 1):
            got, solo = results[i], c.infer(model, **requests[i])  # type: ignore[arg-type]
            assert got.batch_requests == 2  # type: ignore[attr-defined]
            assert got.logits_per_image.shape == solo.logits_per_image.shape  # type: ignore[attr-defined]
            for name in ("text_embeds", "image_embeds", "logits_per_image"):
                np.testing.assert_allclose(getattr(got, name), getattr(solo, name), atol=1e-5)
