"""The contract an architecture module satisfies (structural: a module is checked with ``isinstance``).

mlxd's own modules (``clip``, ``bert``, ``vit``, ``mlxd_program``), ``decoder`` (every mlx-lm model type) and any
module named in ``$MLXD_ARCH_MODULES`` provide these names; the registry (``archs.resolve``) finds a module by its
file or that variable, and Convert, Validate, Infer and calibration use nothing else of it.

Required: ``ArchModule`` (weight mapping, ``load`` → a ``Bundle``, the validation hooks). Optional, each with its
default in ``DEFAULTS`` below (callers read them with ``optional``, never with their own fallback):
  ``MATCHING_OUTPUT``      the output whose rows' argmax Validate compares (``matching_agreement``), when 2-D
  ``LAYER_REL_TOL_FLOOR``  a floor under the per-layer tolerance, for differences the runtime cannot avoid
  ``ANY_REFERENCE``        True: the reference need not be a checkpoint of the same model_type (exported programs)
  ``agreement``            ``(reference, candidate, inputs, ref_layers, mlx_layers) -> dict`` extra agreement
                           numbers (decoders: top-1/top-5/greedy); its ``top1_agreement`` is the matching agreement
  ``calibration_streams``  ``(config, weights, data, seed) -> list[calibrate.models.Stream]``: the float model
                           block by block for AWQ/GPTQ (``Calibrates``); without it, UNSUPPORTED_CALIBRATION.
A bundle may also have ``output_rows`` (how Infer splits a batched output per request, over ``OUTPUT_ROWS``),
``warm_up()``, ``close()``, ``run()`` (an exported program's named arrays), ``embed_tensors()`` (``embed``'s outputs
from preprocessed named arrays, ``_tensors``), ``generate()``/``encode()``/``apply_chat_template()`` (text
generation) and ``quantization`` (the config's record, for Validate's tolerance band).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from mlxd_daemon.calibrate.models import Stream, Weights

# Infer answers one batched forward per request with that request's rows of each output: the rows follow its
# "texts", its "images", whichever of the two it sent ("inputs"), its block of images x texts ("images x texts"),
# or the output is the same for every request ("shared"). Outputs not named here follow the texts.
OUTPUT_ROWS: dict[str, str] = {
    "text_embeds": "texts",
    "image_embeds": "images",
    "logits": "inputs",  # classifiers: one row per input
    "labels": "shared",  # classifiers: id2label in logit order
}

# Validation inputs are named as Hugging Face processors name them; the rows of these count as the texts and
# images a validation ran on (else the ``texts`` / ``images`` samples do).
TEXT_ROWS, IMAGE_ROWS = "input_ids", "pixel_values"

DEFAULTS: dict[str, Any] = {
    "MATCHING_OUTPUT": "logits",  # a classifier's [rows, classes]
    "LAYER_REL_TOL_FLOOR": 0.0,
    "ANY_REFERENCE": False,
    "agreement": None,
    "calibration_streams": None,
}


def optional(arch: Any, name: str) -> Any:
    """The arch module's optional member ``name``, or its default from ``DEFAULTS``."""
    return getattr(arch, name, DEFAULTS[name])


def output_rows(bundle: Any, name: str) -> str:
    """How Infer splits ``name`` per request: the bundle's ``output_rows``, else ``OUTPUT_ROWS``, else "texts"."""
    return {**OUTPUT_ROWS, **getattr(bundle, "output_rows", {})}.get(name, "texts")


def sample_counts(inputs: dict[str, Any]) -> tuple[int, int]:
    """(texts, images) in a validation's inputs (see ``TEXT_ROWS``)."""
    texts = len(inputs[TEXT_ROWS]) if TEXT_ROWS in inputs else len(inputs.get("texts", []))
    images = len(inputs[IMAGE_ROWS]) if IMAGE_ROWS in inputs else len(inputs.get("images", []))
    return texts, images


@dataclass(kw_only=True)
class Stored:
    """What every loaded model records about its storage: a base for bundles (fields are keyword-only, so a
    bundle's own fields come first)."""

    model_dir: Path
    dtype: str  # storage dtype of the float tensors on disk ("float32", "float16", "bfloat16")
    nbytes: int  # resident bytes of its parameters (the residency budget counts these)
    quantization: dict[str, Any] | None = None  # the config's quantization record (Validate's band)
    compute_dtype: str = "float32"  # what compute runs in on this backend (archs/_quant.py; ListModels shows it)


@runtime_checkable
class Bundle(Protocol):
    """A loaded model as the models worker keeps it resident."""

    nbytes: int  # resident bytes of its parameters (the residency budget counts these)
    dtype: str  # stored float dtype
    compute_dtype: str  # what compute runs in on this backend (ListModels shows it)

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, np.ndarray]:
        """Infer: named outputs for the texts and images (or a domain error saying what to use instead)."""
        ...


@runtime_checkable
class ArchModule(Protocol):
    """What Convert (weight mapping), the models worker (``load``) and Validate (the hooks) use."""

    DISK_LAYOUT: dict[str, str]  # tensors stored in a non-MLX layout, recorded in the manifest

    def map_weight(self, name: str) -> str | None:
        """Source tensor name → name on disk; None drops it."""
        ...

    def load(self, model_dir: Path) -> Any:
        """A ``Bundle`` for the converted directory."""
        ...

    def golden_inputs(self, model_dir: Path, *, texts: Any = None, images: Any = None) -> dict[str, Any]:
        """Validation inputs (the caller's texts/images, else built-in ones)."""
        ...

    def run_reference(self, src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The PyTorch reference's named outputs on ``inputs`` (taps hook the same module paths: automatically for
        transformers' ``from_pretrained``, else through ``taps.hook_reference``)."""
        ...

    def run_mlx(self, bundle: Any, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The MLX model's named outputs on ``inputs`` (``tap`` calls name its layers)."""
        ...


@runtime_checkable
class Calibrates(Protocol):
    """An arch module with calibrated quantization (AWQ/GPTQ)."""

    def calibration_streams(
        self, config: dict[str, Any], weights: Weights, data: str | Path | None, seed: int
    ) -> list[Stream]:
        """Its towers as calibration streams, each with its calibration set (``data``: the user's path, or None
        for the built-in set drawn with ``seed``)."""
        ...
