"""Named intermediate activations for per-layer validation, captured on both sides under the same names.

MLX side: architecture code calls ``tap(name, x)`` where a layer's output is produced (names are the Hugging
Face module paths, e.g. ``text_model.encoder.layers.3``); it is free when no capture is active.
PyTorch side: ``torch_taps(names)`` hooks the modules of those names on every model loaded with
``from_pretrained`` inside the block, so the architectures' ``run_reference`` need no change; a reference built
another way (a plain ``torch.nn.Module``) is hooked by passing it to ``hook_reference``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

_active: dict[str, Any] | None = None
_reference: tuple[set[str], dict[str, np.ndarray]] | None = None  # torch_taps' names and where outputs go


def tap(name: str, x: Any) -> Any:
    """Record ``x`` as the output of layer ``name`` while an ``mlx_taps`` block is active; return ``x``."""
    if _active is not None:
        _active[name] = x
    return x


@contextmanager
def mlx_taps() -> Iterator[dict[str, Any]]:
    """Collect every ``tap`` made inside the block, in forward order (dict insertion order)."""
    global _active
    captured: dict[str, Any] = {}
    _active = captured
    try:
        yield captured
    finally:
        _active = None


def _first_tensor(output: Any) -> Any:
    return output[0] if isinstance(output, tuple | list) else getattr(output, "last_hidden_state", output)


def hook_modules(model: Any, names: set[str], captured: dict[str, np.ndarray], prefix: str = "") -> list[Any]:
    """Record into ``captured[prefix + name]`` the output of each module of ``model`` named ``name`` (or
    ``<path>.<name>``) for ``name`` in ``names``; returns the hook handles (``.remove()`` them when done)."""
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            captured[prefix + name] = _first_tensor(output).detach().float().numpy()

        return hook

    for module_name, module in model.named_modules():
        for name in names:
            if module_name == name or module_name.endswith("." + name):
                handles.append(module.register_forward_hook(hook_for(name)))
    return handles


def hook_reference(model: Any) -> Any:
    """Hook ``model``'s modules named as the active ``torch_taps`` block asks (nothing outside one); returns it."""
    if _reference is not None:
        hook_modules(model, *_reference)
    return model


@contextmanager
def torch_taps(names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Hook modules named ``names`` (or ``<prefix>.<name>``, e.g. ``bert.encoder.layer.0``) of models loaded
    with ``transformers.PreTrainedModel.from_pretrained`` (or passed to ``hook_reference``) inside the block;
    outputs land in the dict."""
    global _reference
    import transformers

    captured: dict[str, np.ndarray] = {}
    original = transformers.PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        loaded = original(cls, *args, **kwargs)
        hook_reference(loaded[0] if isinstance(loaded, tuple) else loaded)  # output_loading_info=True: (model, info)
        return loaded

    transformers.PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[assignment]
    _reference = (set(names), captured)
    try:
        yield captured
    finally:
        _reference = None
        transformers.PreTrainedModel.from_pretrained = classmethod(original)  # type: ignore[assignment]
