"""CLIP's served path (what Infer runs): the towers ``mx.compile``d over shape buckets (``_served``), inputs in the
compute dtype, and only the embeddings and similarities leave MLX. Validation uses the eager modules in ``clip``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxd_daemon.archs._served import Compiled, evaluate, pad_length, to_nhwc, warm_up
from mlxd_daemon.archs.clip_model import l2_normalise

if TYPE_CHECKING:
    from mlxd_daemon.archs.clip import ClipBundle


class ClipServed:
    def __init__(self, bundle: ClipBundle) -> None:
        self.bundle = bundle
        m = bundle.model
        dtype = m.vision_model.embeddings.patch_embedding.weight.dtype

        def text(ids: mx.array, keep: mx.array, eos: mx.array) -> tuple[mx.array]:
            return (l2_normalise(m.text_projection(m.text_model.encode(ids, keep, eos)[0])),)

        def vision(pixels_nchw: mx.array) -> tuple[mx.array]:
            return (l2_normalise(m.visual_projection(m.vision_model.encode(to_nhwc(pixels_nchw, dtype))[0])),)

        self.text_fn, self.vision_fn = Compiled(text), Compiled(vision)

    def embed(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        return self.forward(self.bundle.preprocess(texts, images))

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embeddings and similarities from preprocessed inputs (``ClipBundle.preprocess``); either may be empty."""
        m, cfg = self.bundle.model, self.bundle.config
        text = image = mx.zeros((0, cfg.projection_dim))
        ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
        if len(ids):
            m.text_model.check(ids)
            # Extra key positions are masked: nothing changes in a causal tower that is read at each row's EOS.
            ids, mask = pad_length(cfg.text.max_position_embeddings, (ids, cfg.text.eos_token_id), (mask, 0))
            (text,) = self.text_fn(*m.text_model.prepare(ids, mask))
        if len(pixels):
            m.vision_model.check(pixels)
            (image,) = self.vision_fn(pixels)
        logits = mx.exp(m.logit_scale) * (image @ text.T)
        return evaluate({"text_embeds": text, "image_embeds": image, "logits_per_image": logits}, len(ids), len(pixels))

    def warm_up(self) -> float:
        """Trace and compile the batch-1 graphs (a shortest and a longest text, one image); returns the seconds.
        Token ids, not texts: a model without tokenizer files loads too."""
        cfg = self.bundle.config
        size = cfg.vision.image_size
        pixels = np.zeros((1, cfg.vision.num_channels, size, size), np.float32)

        def run() -> None:
            for length in (1, cfg.text.max_position_embeddings):
                ids = np.full((1, length), cfg.text.eos_token_id)
                self.forward({"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels})

        return warm_up(run)
