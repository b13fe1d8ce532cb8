"""Converting a causal LM for mlx-lm: a config.json its ``ModelArgs`` reads right, and the checkpoint as the
model's own ``sanitize`` names it, read one output tensor at a time.

``LmCheckpoint`` stands in for ``checkpoint.Checkpoint`` in the planner and the writer: its ``tensors`` are the
*sanitized* names, dtypes and shapes (MoE experts already stacked into ``switch_mlp.*`` [E, out, in], tied heads
dropped, rotary buffers gone) and ``get(name)`` evaluates that one tensor. The trick that keeps memory bounded:
safetensors sources are opened with ``mx.load``, which is lazy (each array reads its bytes only when evaluated),
and ``sanitize`` runs on those lazy arrays, so the whole plan costs no tensor data and evaluating one output
reads only its sources (a stacked expert tensor reads that layer's experts, nothing else). An output that
``sanitize`` passes through untouched (the very array ``mx.load`` returned) keeps its source file and offset in
``tensors``, so the writer reads it by position in row blocks and never evaluates it through MLX.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, cast

import mlx.core as mx
import torch

from mlxd_daemon.checkpoint import Checkpoint, TensorInfo
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.torch_mlx import to_mlx, to_torch

_TORCH = {mx.float32: torch.float32, mx.float16: torch.float16, mx.bfloat16: torch.bfloat16,
          mx.int64: torch.int64, mx.int32: torch.int32, mx.int16: torch.int16, mx.int8: torch.int8,
          mx.uint8: torch.uint8, mx.uint32: torch.uint32, mx.bool_: torch.bool}  # fmt: skip
# Config keys naming the number of routed experts, across architectures.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_EXPERT_RE = re.compile(r"^(.*?layers\.\d+)\..*?experts\.(\d+)\.")


# (key a ModelArgs reads, the transformers-5 key holding the same value): copied when the config lacks the first.
ALIASES: tuple[tuple[str, str], ...] = (
    ("n_ctx", "n_positions"),  # gpt2
    ("rotary_emb_base", "rope_theta"),  # gpt_neox
    ("rotary_pct", "partial_rotary_factor"),  # gpt_neox
    ("num_experts", "num_local_experts"),  # qwen3_moe and others, renamed in transformers 5
    ("num_local_experts", "num_experts"),
    ("layer_norm_eps", "layer_norm_epsilon"),
)
# Source-name prefixes a model's sanitize does not expect (transformers 5 writes the full module path).
STRIP_PREFIX: dict[str, str] = {"gpt2": "transformer."}


def fix_config(config: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], list[str]]:
    """config.json for mlx-lm: the source's fields all kept, plus the top-level keys ``ModelArgs`` (whose field
    names are ``fields``) reads that transformers 5 moved into ``rope_parameters`` or renamed.
    Returns the config and one note per added key."""
    out, notes = dict(config), []

    def add(key: str, value: Any, why: str) -> None:
        if key not in out and value is not None:
            out[key] = value
            notes.append(f"{key}={value!r} ({why})")

    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # per-layer-type dicts (gemma3) are left as they are
        add("rope_theta", rope["rope_theta"], "from rope_parameters")
        add("partial_rotary_factor", rope.get("partial_rotary_factor"), "from rope_parameters")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" and out.get("rope_scaling") is None:
            out["rope_scaling"] = {**rope, "type": rope_type, "rope_type": rope_type}
            notes.append(f"rope_scaling from rope_parameters ({rope_type})")
    for key, source in ALIASES:
        if key in fields:
            add(key, out.get(source), f"from {source}")
    return out, notes


def model_fields(config: dict[str, Any]) -> set[str]:
    """The field names of the mlx-lm ``ModelArgs`` that reads ``config``."""
    import dataclasses

    from mlx_lm.utils import _get_classes

    return {f.name for f in dataclasses.fields(_get_classes(config)[1])}


def expert_count(config: dict[str, Any]) -> int | None:
    """Routed experts per MoE layer, from the config (None for a dense model)."""
    for source in (config, config.get("text_config") or {}):
        for key in EXPERT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return int(source[key])
    return None


def check_experts(names: list[str], config: dict[str, Any]) -> None:
    """Every MoE layer has exactly the configured experts (per-expert keys); else InvalidArgument naming it."""
    want = expert_count(config)
    if want is None:
        return
    seen: dict[str, set[int]] = {}
    for name in names:
        m = _EXPERT_RE.match(name)
        if m:
            seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    for layer, experts in sorted(seen.items()):
        if experts != set(range(want)):
            msg = (f"{layer} has {len(experts)} experts (ids {min(experts)}..{max(experts)}) but config.json "
                   f"says {want}: the checkpoint and its config do not belong together")  # fmt: skip
            raise InvalidArgument(msg, reason="EXPERT_COUNT_MISMATCH", layer=layer, experts=len(experts), config=want)


def split_fused_experts(weights: dict[str, mx.array], lm_type: str) -> dict[str, mx.array]:
    """transformers 5 in-memory MoE layout (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
    [E, H, I]) → the per-expert keys mlx-lm's sanitize stacks. Lazy slices: nothing is read here."""
    names = ("w1", "w3", "w2") if lm_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for key in [k for k in weights if k.endswith("experts.gate_up_proj")]:
        prefix = key.removesuffix("gate_up_proj")
        if lm_type == "mixtral":
            prefix = prefix.replace(".mlp.experts.", ".block_sparse_moe.experts.")
        fused, down = weights.pop(key), weights.pop(key.removesuffix("gate_up_proj") + "down_proj")
        half = fused.shape[1] // 2
        for e in range(fused.shape[0]):
            weights[f"{prefix}{e}.{names[0]}.weight"] = fused[e, :half]
            weights[f"{prefix}{e}.{names[1]}.weight"] = fused[e, half:]
            weights[f"{prefix}{e}.{names[2]}.weight"] = down[e]
    return weights


class LmCheckpoint:
    """A source checkpoint seen through an mlx-lm model's ``sanitize`` (see the module doc).

    Also the planner's arch for it: names are already final (``map_weight`` is the identity) and
    ``keep_float_reason`` / ``quant_params`` follow what mlx-lm quantizes (modules with ``to_quantized``,
    the model's ``quant_predicate``)."""

    DISK_LAYOUT: ClassVar[dict[str, str]] = {}

    def __init__(self, base: Checkpoint, config: dict[str, Any]) -> None:
        from mlx_lm.utils import _get_classes

        self.base, self.config = base, config
        self.path, self.weight_files, self.index_file = base.path, base.weight_files, base.index_file
        self.weight_format = base.weight_format
        check_experts(list(base.tensors), config)
        model_class, args_class = _get_classes(config)
        try:
            self.model = model_class(args_class.from_dict(config))  # parameters are lazy: no memory
        except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
            msg = f"mlx-lm's {config['model_type']} model cannot be built from {base.path}/config.json: {e!r}"
            raise InvalidArgument(msg, reason="BAD_CONFIG", model_type=config["model_type"]) from None
        self.lm_type = model_class.__module__.rsplit(".", 1)[-1]
        self.modules = dict(self.model.named_modules())
        self._direct: dict[str, str] = {}
        self._lazy = self._sanitized()
        self.tensors = {n: self._info(n, a) for n, a in self._lazy.items()}
        self.dropped = sorted(n for n in base.tensors if n.endswith(("rotary_emb.inv_freq", ".attn.bias",
                                                                      ".attn.masked_bias")))  # fmt: skip
        self._check_structure()

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def _source(self) -> dict[str, mx.array]:
        if self.base.weight_format == "safetensors":
            weights: dict[str, mx.array] = {}
            for file in self.weight_files:
                # mx.load's stub is one union for every format; a .safetensors file always loads as a dict.
                weights.update(cast("dict[str, mx.array]", mx.load(str(self.path / file))))  # lazy: read on evaluation
            return weights
        # .bin: no lazy reader on the MLX side; each tensor comes through the memory-mapped unpickler, so the
        # whole model is read here (safetensors sources stay lazy).
        return {n: to_mlx(self.base.get(n)) for n in self.base.tensors}

    def _sanitized(self) -> dict[str, mx.array]:
        source = self._source()
        # Which loaded array is which source tensor (all held alive here, so no id is reused): an output that
        # sanitize passes through untouched is then read straight from its file, in blocks, without MLX.
        origin = {id(a): (n, a) for n, a in source.items()}
        weights = split_fused_experts(dict(source), self.lm_type)
        strip = STRIP_PREFIX.get(self.lm_type)
        if strip:
            weights = {k.removeprefix(strip): v for k, v in weights.items()}
        try:
            out = dict(self.model.sanitize(weights)) if hasattr(self.model, "sanitize") else weights
        except (KeyError, ValueError, IndexError) as e:
            msg = f"mlx-lm's {self.lm_type} sanitize cannot map the tensors of {self.path}: {e!r}"
            raise InvalidArgument(msg, reason="WEIGHTS_MISMATCH", model_type=self.model_type) from None
        self._direct = {n: origin[id(a)][0] for n, a in out.items() if origin.get(id(a), (None, None))[1] is a}
        return out

    def _info(self, name: str, array: mx.array) -> TensorInfo:
        """An untouched source tensor keeps its file and offset (read by position); others are evaluated."""
        base = self.base.tensors.get(self._direct.get(name, ""))
        if base is not None and base.offset is not None:
            return TensorInfo(name, base.dtype, base.shape, base.file, base.offset)
        return TensorInfo(name, _TORCH[array.dtype], tuple(array.shape), "")

    def _check_structure(self) -> None:
        from mlx.utils import tree_flatten

        params = cast("list[tuple[str, mx.array]]", tree_flatten(self.model.parameters()))  # list without destination=
        expected = {k: tuple(v.shape) for k, v in params}
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        wrong = sorted(k for k in set(expected) & set(self.tensors) if self.tensors[k].shape != expected[k])
        if missing or extra or wrong:
            found = (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            parts = [f"{label}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for label, v in found if v]
            if wrong:
                parts.append(f"{wrong[0]} is {self.tensors[wrong[0]].shape}, the model wants {expected[wrong[0]]}")
            msg = f"the tensors of {self.path} do not fit mlx-lm's {self.lm_type} model: {'; '.join(parts)}"
            raise InvalidArgument(msg, reason="WEIGHTS_MISMATCH", missing=len(missing), unexpected=len(extra),
                                  wrong_shape=len(wrong))  # fmt: skip

    # -- reading (the Checkpoint interface the writer and calibration use) ---------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Evaluate one output tensor; it leaves the lazy view once read, so its memory goes with the caller's copy."""
        if name not in self._lazy:  # a second pass (calibration, then writing): a fresh lazy view, once
            self._lazy = self._sanitized()
        array = self._lazy.pop(name)
        mx.eval(array)
        out = to_torch(array)
        del array
        return out

    def release(self) -> None:
        self.base.release()
        mx.clear_cache()

    # -- planning (the arch interface of shards.make_plan) ---------------------------------------------------
    def map_weight(self, name: str) -> str:
        return name

    def keep_float_reason(self, name: str, shape: tuple[int, ...], layout: str | None) -> str | None:
        """Why mlx-lm would not quantize ``name``, else None."""
        if not name.endswith(".weight"):
            return "not a layer weight"
        path = name.removesuffix(".weight")
        module = self.modules.get(path)
        if module is None or not hasattr(module, "to_quantized"):
            kind = type(module).__name__ if module is not None else "a bare parameter"
            return f"mlx-lm does not quantize {kind}"
        predicate = getattr(self.model, "quant_predicate", None)
        if predicate is not None and predicate(path, module) is False:
            return f"mlx-lm's {self.lm_type} quant_predicate keeps it in float"
        return None

    def quant_params(self, path: str) -> dict[str, Any] | None:
        """The model's own per-layer choice (e.g. 8-bit MoE routers), when its quant_predicate makes one."""
        predicate = getattr(self.model, "quant_predicate", None)
        module = self.modules.get(path)
        if predicate is None or module is None:
            return None
        choice = predicate(path, module)
        return choice if isinstance(choice, dict) else None


def read_lm_config(model_dir: Path) -> dict[str, Any]:
    """config.json as mlx-lm reads it (generation_config.json's eos ids merged in)."""
    from mlx_lm.utils import load_config

    return load_config(Path(model_dir))
