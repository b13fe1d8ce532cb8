"""ViT's served path (what Infer runs): the encoder and classifier ``mx.compile``d over batch buckets
(``_served``), images as uint8 crops normalized by table lookup (``_served.PixelTable``); only the embeddings (and
logits) leave MLX. Validation uses the eager modules in ``vit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxd_daemon.archs._served import Forward, PixelTable, warm_up

if TYPE_CHECKING:
    from mlxd_daemon.archs.vit import ViTBundle


class VitServed:
    def __init__(self, bundle: ViTBundle) -> None:
        from mlxd_daemon.archs.vit import _l2_normalise  # vit imports this module: import at use, not at load

        self.bundle = bundle
        m, classifier = bundle.model, bundle.is_classifier
        pixels = self.pixels = PixelTable(bundle.image_config, m.embeddings.patch_embeddings.projection.weight.dtype)

        def outputs(nhwc: mx.array) -> tuple[mx.array, ...]:
            cls = m.encode_cls(nhwc)
            return (_l2_normalise(cls), m.classifier(cls)) if classifier else (_l2_normalise(cls),)

        widths = {"image_embeds": m.cfg.hidden_size} | ({"logits": len(m.cfg.labels)} if classifier else {})
        self.fn = Forward(lambda crops: outputs(pixels(crops)), widths)
        self.values_fn = Forward(lambda pixel_values: outputs(pixels.values(pixel_values)), widths)

    def embed(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        return self.forward(self.pixels.batch(images))

    def forward(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """``image_embeds`` (and ``logits`` for classifiers) from uint8 [n, H, W, 3] crops (``PixelTable.batch``)."""
        self.bundle.model.check(crops.transpose(0, 3, 1, 2))  # it checks NCHW shapes: a view
        return self.fn(self.pixels.host(crops))

    def forward_values(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """The same from normalized NCHW float ``pixel_values`` (what HF's image processor outputs)."""
        self.bundle.model.check(pixel_values)
        return self.values_fn(pixel_values)

    def warm_up(self) -> float:
        """Trace and compile the batch-1 graphs (one image as crops and as float32 ``pixel_values``, as HF's image
        processors give them); returns the seconds taken."""
        cfg = self.bundle.config

        def run() -> None:
            self.forward(np.zeros((1, *cfg.image_size, cfg.num_channels), np.uint8))
            self.forward_values(np.zeros((1, cfg.num_channels, *cfg.image_size), np.float32))

        return warm_up(run)
