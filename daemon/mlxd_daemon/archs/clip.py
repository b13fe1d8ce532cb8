"""CLIP (HF ``model_type: clip``) in MLX: configs, HF-named modules, loading, embedding, validation hooks.

Module and parameter names are exactly Hugging Face's, so weights load by HF name; the one layout change
is the patch-embedding conv (see ``DISK_LAYOUT``). Inputs come from ``clip_processing`` (text) and
``image_processing`` (``ClipImageConfig``): together, CLIPProcessor.

Output keys of ``ClipBundle.forward_outputs``, ``run_mlx`` and ``run_reference``:
  ``text_embeds`` [n_texts, P] and ``image_embeds`` [n_images, P]: L2-normalised projections;
  ``logits_per_image`` [n_images, n_texts]: ``exp(logit_scale) * image_embeds @ text_embeds.T``;
  ``text_last_hidden_state`` [n_texts, L, Dt]: text encoder output after ``final_layer_norm``;
  ``vision_last_hidden_state`` [n_images, 1 + patches, Dv]: vision encoder output (before ``post_layernorm``,
  as HF's ``vision_model_output.last_hidden_state``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import mlx.core as mx
import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from mlxd_daemon.archs import _tensors
from mlxd_daemon.archs._loading import (
    LAYOUT_METADATA_KEY as LAYOUT_METADATA_KEY,  # re-exported: clip.LAYOUT_METADATA_KEY stays public
)
from mlxd_daemon.archs._loading import fill_model, read_weights, require_dir
from mlxd_daemon.archs._loading import read_config as read_arch_config
from mlxd_daemon.archs._tokenless import has_tokenizer, vocabulary_ids
from mlxd_daemon.archs.clip_model import ClipConfig as ClipConfig
from mlxd_daemon.archs.clip_model import CLIPEncoderLayer as CLIPEncoderLayer  # the model's names stay clip.<name>
from mlxd_daemon.archs.clip_model import CLIPModel as CLIPModel
from mlxd_daemon.archs.clip_model import TextConfig as TextConfig
from mlxd_daemon.archs.clip_model import VisionConfig as VisionConfig
from mlxd_daemon.archs.clip_model import l2_normalise
from mlxd_daemon.archs.clip_processing import load_tokenizer, tokenize
from mlxd_daemon.archs.clip_served import ClipServed
from mlxd_daemon.archs.contract import Stored
from mlxd_daemon.archs.image_processing import ClipImageConfig, preprocess_images

if TYPE_CHECKING:
    from mlxd_daemon.calibrate.models import Stream, Weights

PATCH_WEIGHT = "vision_model.embeddings.patch_embedding.weight"
# Kept in PyTorch layout on disk so mlx-examples' CLIPModel.from_pretrained (which transposes) reads it.
DISK_LAYOUT: dict[str, str] = {PATCH_WEIGHT: "pytorch_conv2d_OIHW"}
_TOP_LEVEL = ("text_model.", "vision_model.", "text_projection.", "visual_projection.", "logit_scale")
MATCHING_OUTPUT = "logits_per_image"  # Validate: each image's best text, as in zero-shot classification


@dataclass
class ClipBundle(Stored):
    """A loaded CLIP: model (float32 compute), tokenizer and image settings, plus storage facts."""

    model: CLIPModel
    config: ClipConfig
    tokenizer: Tokenizer | None  # None: the directory has no tokenizer files (embedding texts then fails)
    image_config: ClipImageConfig
    output_rows: ClassVar[dict[str, str]] = {"logits_per_image": "images x texts"}  # Infer's split (contract)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` as CLIPProcessor(padding=True) gives them. Only texts need the tokenizer:
        without one, TOKENIZER_NOT_FOUND (image-only requests and the warm-up, which runs on ids, work)."""
        if not texts:
            return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
        return tokenize(self.tokenizer or load_tokenizer(self.model_dir, 0), list(texts))

    def preprocess(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask``, ``pixel_values`` as CLIPProcessor(padding=True) gives them."""
        ids, mask = self.tokenize(texts)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": preprocess_images(list(images), self.image_config),
        }

    def forward_outputs(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray
    ) -> dict[str, np.ndarray]:
        """All outputs (see the module docstring for keys); either batch may be empty."""
        m, cfg = self.model, self.config
        out: dict[str, mx.array] = {}
        if len(input_ids):
            pooled, out["text_last_hidden_state"] = m.text_model(np.asarray(input_ids), np.asarray(attention_mask))
            out["text_embeds"] = l2_normalise(m.text_projection(pooled))
        else:
            out["text_embeds"] = mx.zeros((0, cfg.projection_dim))
            out["text_last_hidden_state"] = mx.zeros((0, 0, cfg.text.hidden_size))
        if len(pixel_values):
            pooled, out["vision_last_hidden_state"] = m.vision_model(np.asarray(pixel_values))
            out["image_embeds"] = l2_normalise(m.visual_projection(pooled))
        else:
            patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
            out["image_embeds"] = mx.zeros((0, cfg.projection_dim))
            out["vision_last_hidden_state"] = mx.zeros((0, patches + 1, cfg.vision.hidden_size))
        out["logits_per_image"] = mx.exp(m.logit_scale) * (out["image_embeds"] @ out["text_embeds"].T)
        mx.eval(out)
        return {k: np.array(v) for k, v in out.items()}

    def embed(self, texts: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        """``text_embeds``, ``image_embeds`` (L2-normalised) and ``logits_per_image`` [n_images, n_texts]:
        the served path (compiled towers over shape buckets, ``clip_served``)."""
        return self.served.embed(texts, images)

    def embed_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``embed``'s outputs from preprocessed arrays (``_tensors``): ``input_ids`` (+ ``attention_mask``) for
        texts, ``pixel_values`` or ``pixels`` for images, through the same served path."""
        t, v = self.config.text, self.config.vision
        _tensors.check_names(inputs, ("input_ids", "attention_mask", "pixel_values", "pixels"), "CLIP")
        texts = _tensors.tokens(inputs, vocab=t.vocab_size, positions=t.max_position_embeddings)
        pixels = _tensors.images(inputs, (v.image_size, v.image_size), v.num_channels)
        return self.served.forward({**texts, **pixels})

    @cached_property
    def served(self) -> ClipServed:
        return ClipServed(self)

    def warm_up(self) -> float:
        """Compile the common graphs now (called at load), so the first request does not pay for it."""
        return self.served.warm_up()


def map_weight(name: str) -> str | None:
    """HF tensor name -> name on disk (unchanged), or ``None`` for buffers and non-CLIP tensors."""
    if name.endswith("position_ids") or not name.startswith(_TOP_LEVEL):
        return None
    return name


def read_config(model_dir: Path) -> ClipConfig:
    """Parse ``model_dir/config.json``; raise ``InvalidArgument`` unless it is a CLIP config."""
    return read_arch_config(model_dir, "clip", ClipConfig.from_dict, "CLIP")


def load(model_dir: Path) -> ClipBundle:
    """Load a converted (or raw HF safetensors) CLIP directory for float32 inference on the CPU."""
    model_dir = require_dir(model_dir)
    cfg = read_config(model_dir)
    weights, layout, dtype = read_weights(model_dir, map_weight)
    # Without a layout record, behave like mlx-examples' loader: HF/PyTorch conv weights are OIHW, transpose.
    if PATCH_WEIGHT in weights and (layout is None or layout.get(PATCH_WEIGHT) == "pytorch_conv2d_OIHW"):
        # pytorch conv2d is [O, I, kH, kW], MLX is [O, kH, kW, I].
        weights[PATCH_WEIGHT] = weights[PATCH_WEIGHT].transpose(0, 2, 3, 1)
    model = CLIPModel(cfg)
    compute, nbytes = fill_model(model, weights, cfg.quantization, model_dir, "CLIP")
    return ClipBundle(
        model=model,
        config=cfg,
        tokenizer=load_tokenizer(model_dir, cfg.text.max_position_embeddings) if has_tokenizer(model_dir) else None,
        image_config=ClipImageConfig.load(model_dir, cfg.vision.image_size),
        model_dir=model_dir,
        dtype=dtype,
        nbytes=nbytes,
        quantization=cfg.quantization,
        compute_dtype=compute,
    )


# ---- validation hooks -------------------------------------------------------------------------------------


def golden_inputs(
    model_dir: Path, *, texts: list[str] | None = None, images: list[Image.Image] | None = None
) -> dict[str, Any]:
    """Deterministic texts/images (or the caller's), preprocessed with ``model_dir``'s processor settings."""
    from mlxd_daemon import golden

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    images = golden.golden_images(4, cfg.vision.image_size + 9) if images is None else list(images)
    note = ""
    if texts is None and not has_tokenizer(model_dir):
        ids, mask, note = vocabulary_ids(cfg.text.vocab_size, cfg.text.max_position_embeddings)
        texts = []
    else:
        texts = list(golden.GOLDEN_TEXTS) if texts is None else list(texts)
        ids, mask = tokenize(load_tokenizer(model_dir, cfg.text.max_position_embeddings), texts)
    pixels = preprocess_images(images, ClipImageConfig.load(model_dir, cfg.vision.image_size))
    return {
        "inputs_note": note,
        "texts": texts,
        "images": images,
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
    }


def run_mlx(bundle: ClipBundle, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The MLX outputs for ``golden_inputs``' preprocessed arrays."""
    return bundle.forward_outputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])


def run_reference(src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers' CLIPModel (float32, no_grad) on the same preprocessed arrays; keys as ``run_mlx``."""
    import torch
    import transformers

    model = transformers.CLIPModel.from_pretrained(str(src_dir), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.asarray(inputs["input_ids"], np.int64))
    mask = torch.from_numpy(np.asarray(inputs["attention_mask"], np.int64))
    pixels = torch.from_numpy(np.asarray(inputs["pixel_values"], np.float32))
    with torch.no_grad():
        if len(ids) and len(pixels):
            o = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            out = {
                "text_embeds": o.text_embeds,
                "image_embeds": o.image_embeds,
                "logits_per_image": o.logits_per_image,
                "text_last_hidden_state": o.text_model_output.last_hidden_state,
                "vision_last_hidden_state": o.vision_model_output.last_hidden_state,
            }
            return {k: v.float().numpy() for k, v in out.items()}
        # One side empty: CLIPModel.forward needs both, so run the towers and finish as HF does.
        p = model.config.projection_dim
        t_hidden = torch.zeros((0, 0, model.config.text_config.hidden_size))
        t_emb = torch.zeros((0, p))
        if len(ids):
            to = model.text_model(input_ids=ids, attention_mask=mask)
            t_hidden, t_emb = to.last_hidden_state, model.text_projection(to.pooler_output)
        vc = model.config.vision_config
        v_hidden = torch.zeros((0, (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size))
        v_emb = torch.zeros((0, p))
        if len(pixels):
            vo = model.vision_model(pixel_values=pixels)
            v_hidden, v_emb = vo.last_hidden_state, model.visual_projection(vo.pooler_output)
        t_emb = t_emb / t_emb.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        v_emb = v_emb / v_emb.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        logits = model.logit_scale.exp() * v_emb @ t_emb.T
        out = {
            "text_embeds": t_emb,
            "image_embeds": v_emb,
            "logits_per_image": logits,
            "text_last_hidden_state": t_hidden,
            "vision_last_hidden_state": v_hidden,
        }
        return {k: v.float().numpy() for k, v in out.items()}


def calibration_streams(config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int) -> list[Stream]:
    """AWQ/GPTQ: both towers' layers (``clip_calibrate``)."""
    from mlxd_daemon.archs.clip_calibrate import calibration_streams

    return calibration_streams(config, weights, data, seed)
