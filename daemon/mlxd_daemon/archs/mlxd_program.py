"""Exported programs (``model_type: mlxd_program``, written by ``mlxd_daemon.export``): load, run, validate.

A program has named array inputs and outputs instead of texts and images: ``ProgramBundle.run`` takes
``{input name: np.ndarray}`` of the captured shapes and returns ``{output name: np.ndarray}``. Validation
replays the saved example inputs and fresh random inputs of the same spec through the MLX program and through
the captured PyTorch program; outputs of the random set are named ``<output>@random``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxd_daemon.archs._loading import read_json
from mlxd_daemon.archs.contract import Stored
from mlxd_daemon.errors import InvalidArgument, NotFound
from mlxd_daemon.export.generate import Seq2SeqBundle
from mlxd_daemon.export.program import (
    EXAMPLES_FILE,
    MX_DTYPES,
    PROGRAM_FILE,
    SOURCE_PT2,
    Program,
    check_shape,
    load_graphs,
    read_program,
)

# Names are PyTorch state_dict names already; nothing is renamed by ``convert`` (programs are written by export).
DISK_LAYOUT: dict[str, str] = {}
RANDOM_SUFFIX = "@random"
ANY_REFERENCE = True  # the reference is the .pt2, the HF directory it was exported from, or the program itself


def map_weight(name: str) -> str | None:
    """Identity: a program's tensors keep their ``state_dict`` names."""
    return name


@dataclass
class ProgramBundle(Stored):
    """A loaded program plus storage facts (the arch interface's bundle)."""

    program: Program

    @property
    def input_spec(self) -> list[dict[str, Any]]:
        return self.program.inputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named inputs (static axes as captured, symbolic ones within their dims; dtypes are cast to the spec's)
        -> named outputs."""
        unknown = sorted(set(inputs) - {s["name"] for s in self.program.inputs})
        if unknown:
            msg = f"unknown input(s) {', '.join(unknown)}; the program takes {_describe(self.program.inputs)}"
            raise InvalidArgument(msg, reason="UNKNOWN_INPUT", inputs=",".join(unknown))
        arrays: list[mx.array] = []
        bound: dict[str, int] = {}
        for spec in self.program.inputs:
            if spec["name"] not in inputs:
                msg = f"missing input {spec['name']!r}; the program takes {_describe(self.program.inputs)}"
                raise InvalidArgument(msg, reason="MISSING_INPUT", input=spec["name"])
            x = np.asarray(inputs[spec["name"]])
            check_shape(spec, x.shape, self.program.spec.get("dims", {}), bound)
            arrays.append(mx.array(x).astype(MX_DTYPES[spec["dtype"]]))
        outs = self.program(arrays)
        mx.eval(outs)
        return {o["name"]: np.array(v) for o, v in zip(self.program.outputs, outs, strict=True)}

    def embed(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        """Programs take named arrays, not texts or images."""
        msg = f"{self.model_dir} is an exported program: it takes named arrays ({_describe(self.program.inputs)})"
        raise InvalidArgument(msg, reason="USE_RUN", model=str(self.model_dir))


def _describe(specs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in specs)


def load(model_dir: Path) -> ProgramBundle | Seq2SeqBundle:
    """Load a program directory for float32 inference (an encoder-decoder as a ``Seq2SeqBundle``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        msg = f"model directory {model_dir} does not exist"
        raise NotFound(msg, reason="MODEL_NOT_FOUND", path=str(model_dir))
    graphs, dtype, nbytes = load_graphs(model_dir)
    quantization = read_json(model_dir / "config.json", "program").get("quantization")  # validation's band
    if "" in graphs:
        return ProgramBundle(graphs[""], model_dir=model_dir, dtype=dtype, nbytes=nbytes, quantization=quantization)
    spec = read_program(model_dir)
    return Seq2SeqBundle(graphs["encoder"], graphs["decoder"], spec, model_dir=model_dir, dtype=dtype, nbytes=nbytes,
                         quantization=quantization)  # fmt: skip


# ---- validation hooks -------------------------------------------------------------------------------------


def golden_inputs(
    model_dir: Path, *, texts: list[str] | None = None, images: list[Any] | None = None
) -> dict[str, Any]:
    """The saved example inputs and one fresh random set of the same spec (seeded, so reruns agree)."""
    from safetensors.numpy import load_file

    if texts or images:
        msg = "an exported program is validated on its example inputs and random ones, not on texts or images"
        raise InvalidArgument(msg, reason="USE_RUN")
    model_dir = Path(model_dir)
    spec = read_program(model_dir)
    example = load_file(str(model_dir / EXAMPLES_FILE))
    return {"program_dir": str(model_dir), "sets": {"": example, RANDOM_SUFFIX: fresh_inputs(spec, example)}}


def fresh_inputs(spec: dict[str, Any], example: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the program's spec; a symbolic axis takes another size than the example's (validation
    then covers two shapes): integers uniform in their range, floats N(0, 1), masks all ones."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    for name, info in spec.get("dims", {}).items():
        captured = _captured_size(spec, example, name)
        hi = info.get("max") or captured + 5
        sizes[name] = captured + 3 if captured + 3 <= hi else max(info.get("min") or 1, captured - 1)
    fresh: dict[str, np.ndarray] = {}
    for s in spec["inputs"]:
        x = example[s["name"]]
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in s["shape"])
        if np.issubdtype(x.dtype, np.floating):
            fresh[s["name"]] = rng.standard_normal(shape).astype(x.dtype)
        elif x.dtype == np.bool_ or "range" not in s:  # masks and flags: the captured value where it fits
            fresh[s["name"]] = x.copy() if shape == x.shape else np.full(shape, x.flat[0] if x.size else 1, x.dtype)
        else:
            lo, hi = s["range"]
            fresh[s["name"]] = rng.integers(lo, hi, size=shape).astype(x.dtype)
            if s["name"] == "decoder_input_ids":
                fresh[s["name"]][:, 0] = x[0, 0]  # the decoder start token, as generation feeds it
    return fresh


def _captured_size(spec: dict[str, Any], example: dict[str, np.ndarray], dim: str) -> int:
    for s in spec["inputs"]:
        if dim in s["shape"]:
            return int(example[s["name"]].shape[s["shape"].index(dim)])
    return 1


def run_mlx(bundle: ProgramBundle | Seq2SeqBundle, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The MLX program on every input set; output names carry the set's suffix."""
    out: dict[str, np.ndarray] = {}
    for suffix, arrays in inputs["sets"].items():
        out.update({f"{k}{suffix}": v for k, v in bundle.run(arrays).items()})
    return out


def run_reference(src: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The captured PyTorch program on the same inputs. ``src`` is the ``.pt2`` the program came from, the HF
    directory it was exported from, or the program directory itself (its recorded source is used)."""
    import torch

    from mlxd_daemon.export.capture import call_exported, load_hf, load_pt2

    program_dir = Path(inputs["program_dir"])
    spec = read_program(program_dir)
    seq2seq = spec.get("kind") == "seq2seq"
    names = ["logits", "encoder_last_hidden_state"] if seq2seq else [o["name"] for o in spec["outputs"]]
    src = Path(src)
    if (src / PROGRAM_FILE).is_file():
        recorded = spec["source"]
        src = program_dir / recorded["pt2"] if "pt2" in recorded else Path(recorded["path"])
    if src.is_dir():
        model, constants = load_hf(src), spec["source"].get("constants", {})

        def call(arrays: dict[str, Any]) -> list[Any]:
            out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, **constants)
            return [out.logits, out.encoder_last_hidden_state] if seq2seq else _flat(out)

    elif src.suffix == ".pt2" or src.name == SOURCE_PT2:
        ep = load_pt2(src)
        call = lambda arrays: call_exported(ep, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})  # noqa: E731
    else:
        msg = f"{src} is neither a .pt2 file nor a model directory: pass what the program was exported from"
        raise NotFound(msg, reason="SOURCE_NOT_FOUND", path=str(src))
    out: dict[str, np.ndarray] = {}
    for suffix, arrays in inputs["sets"].items():
        with torch.no_grad():
            flat = call(arrays)
        if len(flat) != len(names):
            msg = f"the reference returned {len(flat)} outputs, the program {len(names)}: is {src} its source?"
            raise InvalidArgument(msg, reason="MODEL_TYPE_MISMATCH", path=str(src))
        out.update({f"{n}{suffix}": t.detach().float().numpy() for n, t in zip(names, flat, strict=True)})
    return out


def _flat(output: Any) -> list[Any]:
    import torch
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
