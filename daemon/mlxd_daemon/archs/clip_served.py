"""CLIP's served path (what Infer runs): the towers ``mx.compile``d over shape buckets (``_served``), inputs in the
compute dtype, and only the embeddings and similarities leave MLX. Validation uses the eager modules in ``clip``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image

from mlxd_daemon.archs._served import Compiled, batch_bucket, length_bucket, pad_rows, warm_up
from mlxd_daemon.archs.clip_model import l2_normalise

if TYPE_CHECKING:
    from mlxd_daemon.archs.clip import ClipBundle


class ClipServed:
    def __init__(self, bundle: ClipBundle) -> None:
        self.bundle = bundle
        m = bundle.model

        def text(ids: mx.array, keep: mx.array, eos: mx.array) -> mx.array:
            return l2_normalise(m.text_projection(m.text_model.encode(ids, keep, eos)[0]))

        def vision(pixels_nchw: mx.array) -> mx.array:
            # Cast on the device to the compute dtype (fp16 on GPUs): the host sends float32 as preprocessed.
            x = pixels_nchw.astype(m.vision_model.embeddings.patch_embedding.weight.dtype).transpose(0, 2, 3, 1)
            return l2_normalise(m.visual_projection(m.vision_model.encode(x)[0]))

        self.text_fn, self.vision_fn = Compiled(text), Compiled(vision)

    def embed(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        return self.forward(self.bundle.preprocess(texts, images))

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embeddings and similarities from preprocessed inputs (``ClipBundle.preprocess``); either may be empty."""
        m, cfg = self.bundle.model, self.bundle.config
        text = mx.zeros((0, cfg.projection_dim))
        if len(inputs["input_ids"]):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            n, length = ids.shape
            if length > cfg.text.max_position_embeddings:
                m.text_model(ids, mask)  # raises TEXT_TOO_LONG with the limit
            width = length_bucket(length, cfg.text.max_position_embeddings)
            # Extra key positions are masked: nothing changes in a causal tower that is read at each row's EOS.
            ids = np.pad(ids, ((0, 0), (0, width - length)), constant_values=cfg.text.eos_token_id)
            mask = np.pad(mask, ((0, 0), (0, width - length)))
            rows = batch_bucket(n)
            prepared = m.text_model.prepare(pad_rows(ids, rows), pad_rows(mask, rows))
            text = self.text_fn(*(mx.array(a) for a in prepared))[:n]
        image = mx.zeros((0, cfg.projection_dim))
        if len(inputs["pixel_values"]):
            pixels = inputs["pixel_values"]
            m.vision_model.check(pixels)
            image = self.vision_fn(mx.array(pad_rows(pixels, batch_bucket(len(pixels)))))[: len(pixels)]
        logits = mx.exp(m.logit_scale) * (image @ text.T)
        mx.eval(text, image, logits)
        return {"text_embeds": np.array(text, dtype=np.float32), "image_embeds": np.array(image, dtype=np.float32),
                "logits_per_image": np.array(logits, dtype=np.float32)}  # fmt: skip

    def warm_up(self) -> float:
        """Trace and compile the batch-1 graphs (a short and a longest text, one image); returns the seconds taken."""
        size = self.bundle.config.vision.image_size
        image = Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8))
        longest = " ".join(["a"] * self.bundle.config.text.max_position_embeddings)  # truncated to the limit
        return warm_up(lambda: [mx.array(self.embed([t], [image])["logits_per_image"]) for t in ("a", longest)])
