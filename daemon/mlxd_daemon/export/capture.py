"""Capture a PyTorch model as a core-ATen ``ExportedProgram`` and list its ops, before anything is written.

Sources: an ``nn.Module`` with example inputs; a ``.pt2`` saved by ``torch.export.save``; a ``module:factory``
entry point (an importable callable returning an ``nn.Module``) with an input spec
``[{"shape": [1, 3, 32, 32], "dtype": "float32", "name"?: "x", "range"?: [lo, hi]}]``; or a local Hugging Face
directory (built with transformers from its config and weights; example inputs derived from the config).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils import _pytree as pytree

from mlxd_daemon.errors import InvalidArgument, NotFound, Unsupported
from mlxd_daemon.export.inputs import TORCH_DTYPES, ExampleInputs, derive_inputs, random_inputs
from mlxd_daemon.export.ops import supported


@dataclass
class Captured:
    """A decomposed program plus what is needed to rebuild and feed the original."""

    exported: ExportedProgram  # as captured (the validation reference runs its ``.module()``)
    decomposed: ExportedProgram  # core ATen
    example: dict[str, torch.Tensor]  # user inputs by graph input name, in graph order
    ranges: dict[str, list[int]]  # integer inputs: [lo, hi) for fresh random inputs
    source: dict[str, Any]  # how to rebuild the reference: {"kind": "pt2" | "factory" | "module" | "hf", ...}
    ops: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def missing(self) -> list[str]:
        """Ops without an MLX mapping, sorted."""
        return sorted(op for op in self.ops if not supported(op))


def op_name(node: torch.fx.Node) -> str:
    """The table key of a graph node: ``getitem`` or the ATen overload name (``aten.addmm.default``)."""
    if node.target is operator.getitem:
        return "getitem"
    if node.op != "call_function":
        return f"{node.op}:{node.target}"
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    # Python arithmetic on symbolic sizes (dynamic shapes): operator.mul, torch.sym_max, math.ceil, ...
    module = getattr(node.target, "__module__", None) or "builtins"
    return f"{module.removeprefix('_')}.{getattr(node.target, '__name__', node.target)}"


def list_ops(ep: ExportedProgram) -> collections.Counter[str]:
    """How often each op occurs in the graph (``get_attr`` nodes, as in control-flow ops, count as ops too)."""
    return collections.Counter(op_name(n) for n in ep.graph.nodes if n.op in ("call_function", "get_attr"))


def capture(
    source: Path | str | torch.nn.Module,
    *,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
    input_spec: list[dict[str, Any]] | None = None,
) -> Captured:
    """Export ``source`` (see the module docstring), decompose to core ATen, count ops; nothing is written.

    ``Unsupported`` UNSUPPORTED_OPS (metadata ``ops``: the missing op names) when any op has no MLX mapping.
    """
    if isinstance(source, torch.nn.Module):
        args, kwargs = _split_inputs(example_inputs)
        cls = type(source)
        record: dict[str, Any] = {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}"}
        exported = _export(source.eval(), args, kwargs)
    elif _is_pt2(source):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            msg = f"{path} does not exist: save the program with torch.export.save(ep, path)"
            raise NotFound(msg, reason="SOURCE_NOT_FOUND", path=path)
        exported, record = load_pt2(path), {"kind": "pt2", "path": str(path)}
    elif Path(str(source)).expanduser().is_dir():
        exported, decomposed, record = _capture_hf(Path(str(source)).expanduser().resolve(), input_spec)
        return _decompose(exported, record, None, decomposed)
    elif isinstance(source, str) and ":" in source:
        module = load_factory(source)()
        if not isinstance(module, torch.nn.Module):
            msg = f"{source} returned {type(module).__name__}, not a torch.nn.Module"
            raise InvalidArgument(msg, reason="BAD_ENTRY_POINT", entry_point=source)
        args = tuple(random_inputs(_check_spec(input_spec, source)))
        record = {"kind": "factory", "entry_point": source, "input_spec": input_spec}
        exported = _export(module.eval(), args, {})
    else:
        msg = f"{source} is neither a .pt2 file, a model directory nor a module:factory entry point"
        raise NotFound(msg, reason="SOURCE_NOT_FOUND", path=str(source))
    return _decompose(exported, record, input_spec)


def _decompose(
    exported: ExportedProgram,
    record: dict[str, Any],
    input_spec: list[dict[str, Any]] | None,
    decomposed: ExportedProgram | None = None,
) -> Captured:
    decomposed = decomposed or exported.run_decompositions()
    example = example_tensors(exported)
    known: dict[str, list[int]] = record.pop("ranges", {})
    ranges = {}
    for i, (name, t) in enumerate(example.items()):
        if t.is_floating_point() or t.dtype == torch.bool:
            continue
        spec_range = input_spec[i].get("range") if input_spec and i < len(input_spec) else None
        observed = [int(t.min()), int(t.max()) + 1] if t.numel() else [0, 1]
        ranges[name] = [int(v) for v in (known.get(name) or spec_range or observed)]
    captured = Captured(exported, decomposed, example, ranges, record, list_ops(decomposed))
    if captured.missing:
        missing = captured.missing
        msg = (
            f"{len(missing)} op(s) have no MLX mapping yet: {', '.join(missing)}; nothing was written "
            "(add them to mlxd_daemon/export/ops.py)"
        )
        raise Unsupported(msg, reason="UNSUPPORTED_OPS", ops=",".join(missing), count=len(missing))
    return captured


def _export(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(module, args, kwargs)
    except Exception as e:  # torch.export raises many types (UserError, Unsupported, TypeError, ...)
        msg = f"torch.export could not capture {type(module).__name__}: {type(e).__name__}: {str(e)[:500]}"
        raise Unsupported(msg, reason="EXPORT_FAILED", module=type(module).__name__) from e


def _is_pt2(source: Path | str) -> bool:
    return str(source).endswith(".pt2")


def _split_inputs(example: tuple[Any, ...] | dict[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example is None:
        msg = "exporting an nn.Module needs example_inputs (a tuple of positional inputs or a dict of keywords)"
        raise InvalidArgument(msg, reason="NO_EXAMPLE_INPUTS")
    return ((), dict(example)) if isinstance(example, dict) else (tuple(example), {})


def load_factory(entry_point: str) -> Any:
    """``package.module:callable`` (dotted attributes allowed after the colon) -> the callable."""
    module_name, _, attr = entry_point.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        msg = f"entry point {entry_point!r} could not be imported ({e}): use package.module:factory"
        raise InvalidArgument(msg, reason="BAD_ENTRY_POINT", entry_point=entry_point) from None
    if not callable(obj):
        msg = f"entry point {entry_point!r} is not callable"
        raise InvalidArgument(msg, reason="BAD_ENTRY_POINT", entry_point=entry_point)
    return obj


def _check_spec(spec: list[dict[str, Any]] | None, source: str) -> list[dict[str, Any]]:
    if not spec:
        msg = f"{source}: a module:factory source needs an input spec like [{{'shape': [1, 3, 32, 32]}}]"
        raise InvalidArgument(msg, reason="NO_INPUT_SPEC")
    for s in spec:
        if not isinstance(s.get("shape"), list) or s.get("dtype", "float32") not in TORCH_DTYPES:
            msg = f"bad input spec entry {s!r}: want {{'shape': [ints], 'dtype': one of {', '.join(TORCH_DTYPES)}}}"
            raise InvalidArgument(msg, reason="BAD_INPUT_SPEC")
    return spec


def user_inputs(ep: ExportedProgram) -> list[Any]:
    """The graph's user-input specs, in calling order."""
    return [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def example_tensors(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """The program's saved example inputs by graph input name (zeros of the traced shapes if none were saved)."""
    specs = user_inputs(ep)
    saved = getattr(ep, "example_inputs", None)
    leaves = pytree.tree_leaves(saved) if saved is not None else []
    fake = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    out = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec.arg, TensorArgument):
            continue
        value = leaves[i] if i < len(leaves) and isinstance(leaves[i], torch.Tensor) else None
        if value is None:
            meta = fake[spec.arg.name]
            value = torch.zeros(tuple(int(d) for d in meta.shape), dtype=meta.dtype)
        out[spec.arg.name] = value.detach().clone()
    return out


def call_exported(ep: ExportedProgram, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """Run the captured program's ``.module()`` (the original graph, saved weights) on named inputs; flat outputs."""
    leaves: list[Any] = []
    for spec in user_inputs(ep):
        if isinstance(spec.arg, TensorArgument):
            leaves.append(torch.as_tensor(inputs[spec.arg.name]))
        else:
            leaves.append(getattr(spec.arg, "value", None))
    args, kwargs = pytree.tree_unflatten(leaves, ep.call_spec.in_spec)
    with torch.no_grad():
        out = ep.module()(*args, **kwargs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_names(ep: ExportedProgram) -> list[str]:
    """Names of the flat outputs: the output's dict keys / attribute names (``logits``, ``last_hidden_state``),
    ``output`` for a single tensor, ``output_<i>`` for positions."""
    spec = ep.call_spec.out_spec
    try:
        tree = pytree.tree_unflatten([torch.zeros(()) for _ in range(spec.num_leaves)], spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # an output container that cannot be rebuilt from placeholders: fall back to positions
        return [f"output_{i}" for i in range(spec.num_leaves)]
    names = []
    for i, path in enumerate(paths):
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        name = ".".join(parts) if parts and not all(p.isdigit() for p in parts) else f"output_{i}"
        names.append(name if len(paths) > 1 or parts else "output")
    return names


# ---- Hugging Face directories ----------------------------------------------------------------------------


def hf_model_class(model_dir: Path) -> Any:
    """The transformers class named in ``architectures`` (else ``AutoModel``)."""
    import transformers

    config = json.loads((model_dir / "config.json").read_text())
    for name in config.get("architectures") or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def load_hf(model_dir: Path) -> torch.nn.Module:
    """A local HF directory as a float32 eval-mode module (never downloads, never runs remote code)."""
    cls = hf_model_class(model_dir)
    try:
        return cls.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # what transformers raises for a bad checkpoint
        msg = f"transformers could not load {model_dir} as {cls.__name__}: {e}"
        raise InvalidArgument(msg, reason="BAD_CHECKPOINT", path=str(model_dir)) from e


def _capture_hf(
    model_dir: Path, input_spec: list[dict[str, Any]] | None
) -> tuple[ExportedProgram, ExportedProgram, dict[str, Any]]:
    if not (model_dir / "config.json").is_file():
        msg = f"{model_dir} has no config.json: is it a Hugging Face model directory?"
        raise InvalidArgument(msg, reason="NO_CONFIG", path=model_dir)
    model = load_hf(model_dir)
    if input_spec:
        _check_spec(input_spec, str(model_dir))
    example = derive_inputs(model, model_dir, input_spec)
    record: dict[str, Any] = {"kind": "hf", "path": str(model_dir), "class": type(model).__name__,
                              "ranges": example.ranges, "constants": example.constants}  # fmt: skip
    return (*export_dynamic(model, example, record), record)


def export_dynamic(
    model: torch.nn.Module, example: ExampleInputs, record: dict[str, Any]
) -> tuple[ExportedProgram, ExportedProgram]:
    """(exported, decomposed) with the example's variable axes symbolic (``Dim.AUTO``: torch keeps static what
    the model fixes); a model that cannot be captured or decomposed dynamically is captured at the example's
    shapes (the reason in ``record["static_reason"]``)."""
    kwargs = {**example.tensors, **example.constants}
    shapes: dict[str, Any] = {name: None for name in kwargs}
    for name, axes in example.dynamic.items():
        shapes[name] = {axis: Dim.AUTO(min=1, max=example.max_lengths.get(dim)) for axis, dim in axes.items()}
    record["dim_names"] = {name: {str(a): d for a, d in axes.items()} for name, axes in example.dynamic.items()}
    record["max_lengths"] = example.max_lengths
    if any(v is not None for v in shapes.values()):
        try:
            with torch.no_grad():
                exported = torch.export.export(model, (), kwargs, dynamic_shapes=shapes)
            return exported, exported.run_decompositions()
        except Exception as e:  # any capture failure: fall back to the static shapes below
            record["static_reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    exported = _export(model, (), kwargs)
    try:
        return exported, exported.run_decompositions()
    except Exception as e:  # torch's decompositions raise many types (ValueError on a view, RuntimeError, ...)
        msg = f"torch could not decompose {type(model).__name__} to core ATen: {type(e).__name__}: {str(e)[:300]}"
        raise Unsupported(msg, reason="EXPORT_FAILED", module=type(model).__name__) from e


# Output classes a saved program's pytree specs may name, whose modules must be imported before loading it.
# Only these packages are imported: a .pt2 must not be able to make the daemon import arbitrary code.
_SPEC_PACKAGES = ("transformers.",)


def load_pt2(path: Path) -> Any:
    """``torch.export.load`` with the modules that the program's output types live in imported first (e.g.
    ``transformers...modeling_clip`` for a CLIPModel's output dataclass); BAD_PT2 when it cannot be loaded."""
    import importlib
    import re
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            text = b" ".join(archive.read(n) for n in archive.namelist() if n.endswith(".json"))
        for module in {m.decode() for m in re.findall(rb"(transformers(?:\.[a-z_0-9]+)+)\.[A-Z]", text)}:
            if module.startswith(_SPEC_PACKAGES):
                with contextlib.suppress(ImportError):
                    importlib.import_module(module)
        return torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as e:
        msg = f"{path.name} could not be loaded with torch.export.load: {e}"
        raise InvalidArgument(msg, reason="BAD_PT2", path=str(path)) from e
