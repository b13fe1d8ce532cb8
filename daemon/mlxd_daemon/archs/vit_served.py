"""ViT's served path (what Infer runs): the encoder and classifier ``mx.compile``d over batch buckets
(``_served``), pixels cast on the device; only the embeddings (and logits) leave MLX. Validation uses the eager
modules in ``vit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from mlxd_daemon.archs._served import Forward, to_nhwc, warm_up

if TYPE_CHECKING:
    from mlxd_daemon.archs.vit import ViTBundle


class VitServed:
    def __init__(self, bundle: ViTBundle) -> None:
        from mlxd_daemon.archs.vit import _l2_normalise  # vit imports this module: import at use, not at load

        self.bundle = bundle
        m, classifier = bundle.model, bundle.is_classifier
        dtype = m.embeddings.patch_embeddings.projection.weight.dtype

        def forward(pixels_nchw: mx.array) -> tuple[mx.array, ...]:
            cls = m.encode(to_nhwc(pixels_nchw, dtype))[:, 0]
            return (_l2_normalise(cls), m.classifier(cls)) if classifier else (_l2_normalise(cls),)

        widths = {"image_embeds": m.cfg.hidden_size} | ({"logits": len(m.cfg.labels)} if classifier else {})
        self.fn = Forward(forward, widths)

    def forward(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """``image_embeds`` (and ``logits`` for classifiers) from preprocessed NCHW pixels."""
        self.bundle.model.check(pixel_values)
        return self.fn(pixel_values)

    def warm_up(self) -> float:
        """Trace and compile the batch-1 graph; returns the seconds taken."""
        cfg = self.bundle.config
        return warm_up(lambda: self.forward(np.zeros((1, cfg.num_channels, *cfg.image_size), np.float32)))
