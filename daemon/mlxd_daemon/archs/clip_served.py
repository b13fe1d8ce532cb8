"""CLIP's served path (what Infer runs): the towers ``mx.compile``d over shape buckets (``_served``), images as
uint8 crops normalized by table lookup (``_served.PixelTable``), and only the embeddings and similarities leave
MLX. Validation uses the eager modules in ``clip``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxd_daemon.archs._served import Compiled, PixelTable, evaluate, pad_length, warm_lengths, warm_up
from mlxd_daemon.archs.clip_model import l2_normalise

if TYPE_CHECKING:
    from mlxd_daemon.archs.clip import ClipBundle


_NONE = np.zeros((0, 0))  # an input left out


class ClipServed:
    def __init__(self, bundle: ClipBundle) -> None:
        self.bundle = bundle
        m = bundle.model
        pixels = self.pixels = PixelTable(bundle.image_config, m.vision_model.embeddings.patch_embedding.weight.dtype)

        def text(ids: mx.array, keep: mx.array, eos: mx.array) -> tuple[mx.array]:
            return (l2_normalise(m.text_projection(m.text_model.pooled(ids, keep, eos))),)

        def vision(nhwc: mx.array) -> tuple[mx.array]:
            return (l2_normalise(m.visual_projection(m.vision_model.pooled(nhwc))),)

        self.text_fn = Compiled(text)
        self.vision_fn = Compiled(lambda crops: vision(pixels(crops)))
        self.values_fn = Compiled(lambda pixel_values: vision(pixels.values(pixel_values)))

    def embed(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        return self.forward(self.inputs(texts, images))

    def inputs(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        """What ``forward`` takes: ``input_ids`` and ``attention_mask`` as ``ClipBundle.preprocess`` gives them,
        ``pixels`` the uint8 [n, H, W, 3] crops (``PixelTable.batch``)."""
        ids, mask = self.bundle.tokenize(texts)
        return {"input_ids": ids, "attention_mask": mask, "pixels": self.pixels.batch(list(images))}

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embeddings and similarities from ``inputs``' arrays: ``input_ids`` + ``attention_mask`` for texts, and
        ``pixels`` (uint8 crops) or ``pixel_values`` (normalized NCHW floats) for images; any may be absent or empty."""
        m, cfg = self.bundle.model, self.bundle.config
        text = image = mx.zeros((0, cfg.projection_dim))
        ids, pixels, values = (inputs.get(k, _NONE) for k in ("input_ids", "pixels", "pixel_values"))
        if len(ids):
            m.text_model.check(ids)
            # Extra key positions are masked: nothing changes in a causal tower that is read at each row's EOS.
            ids, mask = pad_length(
                cfg.text.max_position_embeddings, (ids, cfg.text.eos_token_id), (inputs["attention_mask"], 0)
            )
            (text,) = self.text_fn(*m.text_model.prepare(ids, mask))
        if len(pixels):
            m.vision_model.check(pixels.transpose(0, 3, 1, 2))  # it checks NCHW shapes: a view
            (image,) = self.vision_fn(self.pixels.host(pixels))
        elif len(values):
            m.vision_model.check(values)
            (image,) = self.values_fn(values)
        logits = mx.exp(m.logit_scale) * (image @ text.T)
        return evaluate({"text_embeds": text, "image_embeds": image, "logits_per_image": logits})

    def warm_up(self) -> float:
        """Trace and compile the batch-1 graphs (texts of ``warm_lengths``, one image as crops and as float32
        ``pixel_values``); returns the seconds.
        Token ids, not texts: a model without tokenizer files loads too."""
        cfg = self.bundle.config
        size = cfg.vision.image_size
        pixels = np.zeros((1, size, size, cfg.vision.num_channels), np.uint8)

        def run() -> None:
            for length in warm_lengths(cfg.text.max_position_embeddings):
                ids = np.full((1, length), cfg.text.eos_token_id)
                self.forward({"input_ids": ids, "attention_mask": np.ones_like(ids), "pixels": pixels})
            # Infer with tensors: float32 pixel_values, as HF's image processors give them
            self.forward({"pixel_values": np.zeros((1, cfg.vision.num_channels, size, size), np.float32)})

        return warm_up(run)
