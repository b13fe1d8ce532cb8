"""BERT's served path (what Infer runs): encoder, pooling and classifier ``mx.compile``d over shape buckets
(``_served``); only the sentence embeddings (and logits) leave MLX. Validation uses the eager modules in ``bert``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from mlxd_daemon.archs._served import Forward, pad_length, warm_lengths, warm_up
from mlxd_daemon.archs.bert_processing import max_length, pool

if TYPE_CHECKING:
    from mlxd_daemon.archs.bert import BertBundle


class BertServed:
    def __init__(self, bundle: BertBundle) -> None:
        self.bundle = bundle
        m, cfg, pooling, classifier = bundle.model, bundle.config, bundle.pooling, bundle.is_classifier

        def forward(ids: mx.array, mask: mx.array, token_types: mx.array) -> tuple[mx.array, ...]:
            hidden = m.encode(ids, mask, token_types)
            embeds = pool(hidden, mask, pooling)  # padded positions are outside the mask: not pooled
            return (embeds, m.classifier(m.pooler(hidden))) if classifier else (embeds,)

        widths = {"text_embeds": cfg.hidden_size * len(pooling.modes)}
        self.fn = Forward(forward, widths | ({"logits": len(cfg.labels)} if classifier else {}))

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``text_embeds`` (and ``logits`` for classifiers) from ``bert_processing.tokenize``'s arrays."""
        cfg = self.bundle.config
        self.bundle.model.check(inputs["input_ids"])
        # Padded tokens are keys no real token attends to (mask 0), so they change no real position's state.
        return self.fn(*pad_length(cfg.max_position_embeddings, (inputs["input_ids"], 0),
                                   (inputs["attention_mask"], 0), (inputs["token_type_ids"], 0)))  # fmt: skip

    def warm_up(self) -> float:
        """Trace and compile the batch-1 graphs for texts of ``warm_lengths``; returns the seconds taken.
        Token ids, not texts: a model without tokenizer files loads too."""
        b = self.bundle
        longest = max_length(b.model_dir, b.config.max_position_embeddings, b.pooling)

        def run() -> None:
            for length in warm_lengths(longest):
                ids = np.zeros((1, length), np.int64)
                self.forward({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids})

        return warm_up(run)
