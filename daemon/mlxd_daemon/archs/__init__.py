"""Architecture registry, derived from what is installed: mlxd's own arch modules and mlx-lm's model types.

``resolve(model_type)`` decides, from config.json alone and before any weight is read, which path converts,
validates and serves a model, and says so (``Route.path``, recorded in Convert's result):
  - ``mlxd:<model_type>``: an arch module satisfying ``contract.ArchModule``; the module *is* the registration.
    Either a file in this package (``clip``, ``bert``, ``vit``, ``mlxd_program``), or any importable module named
    in ``$MLXD_ARCH_MODULES`` (comma-separated dotted paths; the last component is the model_type, as a file name
    here is; it takes precedence over a file of the same name). The daemon's workers inherit the variable.
  - ``mlx_lm``: a causal LM that the installed mlx-lm has (``mlx_lm/models/<type>.py``, after its
    ``MODEL_REMAPPING``); served by ``archs.decoder`` through mlx-lm's own model classes. Upgrading mlx-lm adds
    architectures with no change here.
  - ``export``: known only to transformers: the torch.export path (``export/``), an explicit decision.
Anything else is ``Unsupported`` UNSUPPORTED_ARCHITECTURE naming the closest supported types.

This module imports neither mlx nor torch (the front end lists architectures from it): mlx-lm's model files
and its remapping table are read from the installed package's source, not imported.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from mlxd_daemon.errors import FailedPrecondition, Unsupported

if TYPE_CHECKING:  # computed on access by __getattr__ below
    SUPPORTED: tuple[str, ...]
    MODEL_REMAPPING: dict[str, str]

# The mlx-lm-backed module serves many model_types; it is not one of its own.
_NOT_ARCHS = ("decoder",)
MLX_LM = "mlx_lm"
EXPORT = "export"
MODULES_ENV = "MLXD_ARCH_MODULES"


@dataclass(frozen=True)
class Route:
    """How a model_type is handled: ``path`` is ``mlxd:<model_type>``, ``mlx_lm`` or ``export``; ``module`` is the
    dotted path of the module serving it (for mlx_lm: ``mlxd_daemon.archs.decoder``) and ``mlx_lm_type``
    mlx-lm's module name after its remapping."""

    model_type: str
    path: str
    module: str = ""
    mlx_lm_type: str = ""


def registered_modules() -> dict[str, str]:
    """model_type → module path of the modules named in ``$MLXD_ARCH_MODULES`` (read, not imported)."""
    paths = (p.strip() for p in os.environ.get(MODULES_ENV, "").split(","))
    return {p.rpartition(".")[2]: p for p in paths if p}


def mlxd_types() -> tuple[str, ...]:
    """mlxd's architecture modules (one per HF model_type): this package's and the registered ones."""
    return tuple(sorted(set(_package_types()) | set(registered_modules())))


@functools.cache
def _package_types() -> tuple[str, ...]:
    here = Path(__file__).parent
    found = []
    for info in pkgutil.iter_modules([str(here)]):
        if info.name.startswith("_") or info.name in _NOT_ARCHS:
            continue
        # An arch module defines the contract's entry points (helpers such as *_processing do not).
        text = (here / f"{info.name}.py").read_text(encoding="utf-8")
        if "\ndef load(" in text and "\ndef golden_inputs(" in text:
            found.append(info.name)
    return tuple(sorted(found))


def _mlx_lm_dir() -> Path | None:
    spec = importlib.util.find_spec(MLX_LM)  # finds the package without importing it (it imports mlx)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def mlx_lm_types() -> tuple[str, ...]:
    """mlx-lm's model modules (those defining ``Model`` and ``ModelArgs``), by file, without importing mlx-lm."""
    root = _mlx_lm_dir()
    if root is None:
        return ()
    found = []
    for info in pkgutil.iter_modules([str(root / "models")]):
        text = (root / "models" / f"{info.name}.py").read_text(encoding="utf-8", errors="replace")
        if "class Model(" in text and "class ModelArgs" in text:
            found.append(info.name)
    return tuple(sorted(found))


@functools.cache
def mlx_lm_remapping() -> dict[str, str]:
    """mlx-lm's ``MODEL_REMAPPING`` (aliases such as mistral → llama), read from its source as a literal."""
    root = _mlx_lm_dir()
    if root is None:
        return {}
    tree = ast.parse((root / "utils.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MODEL_REMAPPING" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    return {}


def architectures() -> list[str]:
    """Every model_type accepted (mlxd's modules, mlx-lm's types and their aliases), sorted."""
    lm = set(mlx_lm_types())
    aliases = {k for k, v in mlx_lm_remapping().items() if v in lm}
    return sorted(set(mlxd_types()) | lm | aliases)


def resolve(model_type: str, *, allow_export: bool = True) -> Route:
    """The route for ``model_type`` (see the module doc); ``Unsupported`` UNSUPPORTED_ARCHITECTURE otherwise."""
    registered = registered_modules()
    if model_type in registered:
        return Route(model_type, f"mlxd:{model_type}", registered[model_type])
    if model_type in _package_types():
        return Route(model_type, f"mlxd:{model_type}", f"{__name__}.{model_type}")
    lm_type = mlx_lm_remapping().get(model_type, model_type)
    if lm_type in mlx_lm_types():
        return Route(model_type, MLX_LM, f"{__name__}.decoder", lm_type)
    if allow_export and _known_to_transformers(model_type):
        return Route(model_type, EXPORT)
    close = difflib.get_close_matches(model_type, architectures(), n=5, cutoff=0.5)
    hint = f"closest supported: {', '.join(close)}" if close else f"{len(architectures())} are supported"
    msg = f"model_type {model_type!r} is not supported by mlxd or the installed mlx-lm ({hint}; see mlxctl archs)"
    raise Unsupported(msg, reason="UNSUPPORTED_ARCHITECTURE", model_type=model_type, closest=",".join(close))


def _known_to_transformers(model_type: str) -> bool:
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return False
    return model_type in CONFIG_MAPPING


def __getattr__(name: str) -> object:
    # Derived views under the names older callers import (no hand-kept tuple behind them).
    if name == "SUPPORTED":
        return tuple(architectures())
    if name == "MODEL_REMAPPING":
        return mlx_lm_remapping()
    raise AttributeError(name)


def get_arch(model_type: str) -> ModuleType:
    """The mlxd module serving ``model_type`` (``decoder`` for mlx-lm's types); Unsupported otherwise."""
    route = resolve(model_type, allow_export=False)
    try:
        return importlib.import_module(route.module)
    except ModuleNotFoundError as e:
        # Only a registered module can be missing; a dependency it lacks is named as such, not as the module.
        if model_type not in registered_modules():
            raise
        itself = e.name is not None and (route.module + ".").startswith(e.name + ".")
        missing = "" if itself else f" (it needs {e.name}, not installed)"
        msg = f"{MODULES_ENV} names {route.module} for model_type {model_type!r}, which cannot be imported{missing}"
        raise FailedPrecondition(msg, reason="ARCH_MODULE_NOT_IMPORTABLE", module=route.module) from e
