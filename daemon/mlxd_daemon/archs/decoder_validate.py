"""Validating an mlx-lm decoder against transformers: golden token rows, logits, per-layer taps, agreement.

Per-layer localisation wraps the model's own modules (each decoder layer, and each MoE router) in a subclass
whose ``__call__`` taps the output under the Hugging Face module path of the same layer (``model.layers.3``,
``transformer.h.3``, ``gpt_neox.layers.3``, ``model.layers.3.mlp.gate``), found on a meta-device transformers
model built from config.json; ``taps.torch_taps`` hooks the same names on the reference. Nothing is forked.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxd_daemon.archs._lm_convert import expert_count
from mlxd_daemon.archs._loading import read_json
from mlxd_daemon.archs._tokenless import vocabulary_ids
from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.golden import GOLDEN_PROMPTS
from mlxd_daemon.taps import tap

GREEDY_TOKENS = 8  # greedy continuation compared per golden row (no stop tokens: pure argmax on both sides)
GREEDY_ROWS = 2
_ROUTER_NAMES = ("gate", "router")
_NOT_HF_CONFIG = ("quantization", "quantization_config")


def hf_module_paths(config: dict[str, Any]) -> tuple[str, dict[int, str]]:
    """(path of the decoder-layer list, {layer index: router path}) in the transformers model of ``config``,
    built on the meta device (no memory, no weights). ("", {}) when transformers does not know the type."""
    import torch
    import transformers

    cfg = {k: v for k, v in config.items() if k not in _NOT_HF_CONFIG}
    try:
        hf_config = transformers.AutoConfig.for_model(**copy.deepcopy(cfg))  # it rewrites rope dicts in place
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError):
        return "", {}
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return "", {}
    name, layers = max(lists, key=lambda item: len(item[1]))
    experts, routers = expert_count(config), {}
    for i, layer in enumerate(layers if experts else ()):
        for sub, m in layer.named_modules():
            w = getattr(m, "weight", None)
            if sub.rsplit(".", 1)[-1] in _ROUTER_NAMES and w is not None and w.ndim == 2 and w.shape[0] == experts:
                routers[i] = f"{name}.{i}.{sub}"
                break
    return name, routers


def golden_inputs(
    model_dir: Path, *, texts: list[str] | None = None, images: list[Any] | None = None
) -> dict[str, Any]:
    """Golden (or the caller's) prompts tokenized, right-padded into ``input_ids`` [n, L] + ``lengths``; without
    a tokenizer, ids drawn from the vocabulary (``inputs_note`` says so). Also the HF paths the taps are named by."""
    if images:
        msg = "text decoders take no images: pass texts only"
        raise InvalidArgument(msg, reason="IMAGES_NOT_SUPPORTED")
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    rows, note = _tokenize(model_dir, config, texts)
    width = max((len(r) for r in rows), default=0)
    ids = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    layer_list, routers = hf_module_paths(config)
    return {"texts": list(texts or (GOLDEN_PROMPTS if not note else [])), "input_ids": ids,
            "lengths": np.array([len(r) for r in rows], np.int64), "inputs_note": note, "layer_list": layer_list,
            "routers": routers, "top_k": int(config.get("num_experts_per_tok") or 0)}  # fmt: skip


def _tokenize(model_dir: Path, config: dict[str, Any], texts: list[str] | None) -> tuple[list[list[int]], str]:
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return [tok.encode(t).ids for t in (texts or GOLDEN_PROMPTS)], ""
    if (model_dir / "tokenizer.model").is_file() or (model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
        return [list(hf_tok(t).input_ids) for t in (texts or GOLDEN_PROMPTS)], ""
    if texts:
        msg = f"{model_dir} has no tokenizer, so texts cannot be encoded: pass token ids (inputs_npz input_ids)"
        raise InvalidArgument(msg, reason="NO_TOKENIZER", path=str(model_dir))
    ids, mask, note = vocabulary_ids(
        int(config.get("vocab_size") or 0), int(config.get("max_position_embeddings") or 4096)
    )
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)], note


@contextmanager
def tapped(modules: list[tuple[nn.Module, str, bool]]) -> Iterator[None]:
    """Make each module's ``__call__`` tap its output as ``name`` by swapping in a subclass; the original classes
    are restored on exit. Routers (``flatten``) tap their logits flattened to [tokens, experts]."""
    originals = []
    for module, name, flatten in modules:
        cls = type(module)

        def call(self: Any, *args: Any, _cls: type = cls, _name: str = name, _flat: bool = flatten, **kw: Any) -> Any:
            out = _cls.__call__(self, *args, **kw)
            x = out[0] if isinstance(out, tuple) else out
            if _flat and (x.shape[-1] != self.weight.shape[0] or not mx.issubdtype(x.dtype, mx.floating)):
                x = args[0] @ self.weight.T  # a gate returning (indices, scores) (DeepSeek): its logits, as HF's
            tap(_name, x.reshape(-1, x.shape[-1]) if _flat else x)
            return out

        module.__class__ = type(f"Tapped{cls.__name__}", (cls,), {"__call__": call})
        originals.append((module, cls))
    try:
        yield
    finally:
        for module, cls in originals:
            module.__class__ = cls


def _tap_targets(model: nn.Module, inputs: dict[str, Any], experts: int | None) -> list[tuple[nn.Module, str, bool]]:
    layers = list(getattr(model, "layers", []))
    prefix = inputs.get("layer_list") or "layers"
    targets: list[tuple[nn.Module, str, bool]] = []
    for i, layer in enumerate(layers):
        router = inputs.get("routers", {}).get(i)
        if router and experts:
            for sub, m in layer.named_modules():
                w = getattr(m, "weight", None)
                if sub.rsplit(".", 1)[-1] in _ROUTER_NAMES and w is not None and w.shape[0] == experts:
                    targets.append((m, router, True))
                    break
        targets.append((layer, f"{prefix}.{i}", False))
    return targets


def run_mlx(bundle: Any, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """``logits`` of the golden rows (taps on every layer and router), and ``_greedy`` continuations."""
    from mlx_lm.generate import generate_step

    experts = expert_count(bundle.config)
    with tapped(_tap_targets(bundle.model, inputs, experts)):
        out = bundle.forward_outputs(inputs["input_ids"], inputs["lengths"])
    greedy = []
    for row, n in list(zip(inputs["input_ids"], inputs["lengths"], strict=True))[:GREEDY_ROWS]:
        steps = generate_step(mx.array(row[:n].astype(np.int32)), bundle.model, max_tokens=GREEDY_TOKENS)
        greedy.append([int(t) for t, _ in steps])
    return {**out, "_greedy": np.array(greedy, np.int64)}


def run_reference(src_dir: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers' *ForCausalLM (float32, no_grad) on the same rows: ``logits`` (padding zeroed) and
    ``_greedy``, an argmax continuation with no logits processors (so stop tokens do not end it)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.asarray(inputs["input_ids"], np.int64))
    # Right padding under a causal mask cannot change the valid positions, so no attention mask is needed.
    with torch.no_grad():
        greedy = []
        # transformers 5.x renames the cache argument (past_key_values → cache): pass whichever forward takes.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for row, n in list(zip(ids, inputs["lengths"], strict=True))[:GREEDY_ROWS]:
            step = model(input_ids=row[: int(n)][None], use_cache=True)
            tokens: list[int] = []
            for _ in range(GREEDY_TOKENS):
                tokens.append(int(step.logits[0, -1].argmax()))
                state = getattr(step, "past_key_values", None) or getattr(step, "cache", None)
                step = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_arg: state})
            greedy.append(tokens)
        # Last, so the per-layer hooks (last call wins) hold this forward's activations, not the decoding's.
        logits = model(input_ids=ids).logits.float()
    valid = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(np.asarray(inputs["lengths"]))[:, None]
    return {"logits": (logits * valid[..., None]).numpy(), "_greedy": np.array(greedy, np.int64)}


def topk_agreement(ref: np.ndarray, cand: np.ndarray, k: int = 1, valid: np.ndarray | None = None) -> float:
    """Mean |top-k(ref) ∩ top-k(cand)| / k over rows of the last axis (``valid`` selects positions)."""
    v = ref.shape[-1]
    ref, cand = np.asarray(ref).reshape(-1, v), np.asarray(cand).reshape(-1, v)
    if valid is not None:
        keep = np.asarray(valid, bool).reshape(-1)
        ref, cand = ref[keep], cand[keep]
    if not len(ref):
        return 1.0
    k = min(k, v)
    top_r = np.argpartition(-ref, k - 1, axis=-1)[:, :k]
    top_c = np.argpartition(-cand, k - 1, axis=-1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) for a, b in zip(top_r.tolist(), top_c.tolist(), strict=True)])) / k


def agreement(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    inputs: dict[str, Any],
    ref_layers: dict[str, np.ndarray],
    mlx_layers: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Reported next to the tolerance checks: top-1 / top-5 next-token agreement (valid positions), greedy
    continuation agreement (matching-prefix fraction, exact fraction) and, for MoE, routing agreement (tokens
    whose top-k experts are the same set, per router, and their mean)."""
    lengths = np.asarray(inputs["lengths"])
    valid = np.arange(inputs["input_ids"].shape[1])[None, :] < lengths[:, None]
    out: dict[str, Any] = {
        "top1_agreement": topk_agreement(reference["logits"], candidate["logits"], 1, valid),
        "top5_agreement": topk_agreement(reference["logits"], candidate["logits"], 5, valid),
    }
    prefixes, exact = [], []
    for a, b in zip(reference["_greedy"].tolist(), candidate["_greedy"].tolist(), strict=False):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefixes.append(same / max(len(a), len(b), 1))
        exact.append(a == b)
    out["greedy_agreement"] = float(np.mean(prefixes)) if prefixes else 1.0
    out["greedy_exact"] = float(np.mean(exact)) if exact else 1.0
    k = int(inputs.get("top_k") or 0)
    routing = {}
    for name in inputs.get("routers", {}).values():
        if k and name in ref_layers and name in mlx_layers and ref_layers[name].shape == mlx_layers[name].shape:
            r = np.argsort(-ref_layers[name], axis=-1)[:, :k]
            c = np.argsort(-mlx_layers[name], axis=-1)[:, :k]
            routing[name] = float(np.mean([set(x) == set(y) for x, y in zip(r.tolist(), c.tolist(), strict=True)]))
    if routing:
        out["routing_agreement"] = float(np.mean(list(routing.values())))
        out["routing_per_router"] = routing
    return out
