"""Quantization policy, on names and shapes only: which layers, at which bits / group size / mode, and why.

Order of decision for a candidate layer (module path = weight name without ``.weight``):
structural keep-float rules (``shards.KEEP_FLOAT_RULES``) → the first matching ``--q-override`` → the recipe →
the default; then a group size that does not divide the input dim falls back to a smaller one, else float.
The config.json entry follows mlx-lm (``mlx_lm/utils.py`` ``quantize_model``): the default parameters, plus
``"<module.path>": {"group_size", "bits", "mode"}`` for each layer that differs; layers kept in float are
absent (loaders detect quantized modules by ``<path>.scales``).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mlxd_daemon.errors import InvalidArgument, Unsupported

# mode -> (allowed bits, allowed group sizes, default (bits, group_size)); defaults as mlx-lm's defaults_for_mode.
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), (4, 64)),
    "mxfp4": ((4,), (32,), (4, 32)),
    "mxfp8": ((8,), (32,), (8, 32)),
    "nvfp4": ((4,), (16,), (4, 16)),
}
# recipe -> (low bits, high bits), as mlx-lm's mixed_quant_predicate_builder.
RECIPES: dict[str, tuple[int, int]] = {
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_6": (3, 6),
    "mixed_4_6": (4, 6),
}
_HIGH_BIT_LAYERS = ("v_proj", "v_a_proj", "v_b_proj", "down_proj")
_LAYER_RE = re.compile(r"^(?:(.*?)\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class QParams:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict[str, Any]:
        """The mlx-lm config.json entry (key order as mlx-lm writes it)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass(frozen=True)
class Override:
    """``pattern`` is a glob on the module path; ``params`` None means keep the layer in float."""

    pattern: str
    params: QParams | None
    text: str


@dataclass(frozen=True)
class QuantSpec:
    default: QParams
    overrides: tuple[Override, ...] = ()
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for results and the manifest: the default parameters, overrides and recipe."""
        return {**self.default.as_config(), "overrides": [o.text for o in self.overrides], "recipe": self.recipe}


@dataclass(frozen=True)
class QuantOptions:
    """Quantization as a request asks for it, carried unchanged from the servicer to the writer.

    ``bits``/``group_size`` 0 mean the mode's default; ``overrides`` are ``PATTERN=BITS[:GROUP]|skip`` texts;
    ``method`` rtn, awq or gptq (calibrated on ``calibration_data``, else the architecture's built-in set drawn
    with ``calibration_seed``). ``spec()`` validates and resolves it (``make_spec``)."""

    bits: int = 0
    group_size: int = 0
    mode: str = "affine"
    overrides: tuple[str, ...] = ()
    recipe: str = ""
    method: str = "rtn"
    calibration_data: str | None = None
    calibration_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))  # lists from callers, hashable here

    def spec(self) -> QuantSpec:
        """The validated plan (InvalidArgument/Unsupported for bad flags, before any weight is read)."""
        return make_spec(self.bits, self.group_size, self.mode, self.overrides, self.recipe)


@functools.cache
def mode_unsupported(mode: str) -> str | None:
    """Why ``mx.quantize`` cannot run ``mode`` on this MLX build, or None when it can (probed once)."""
    import mlx.core as mx

    bits, group = MODES[mode][2]
    try:
        mx.eval(*mx.quantize(mx.ones((8, 4 * group)), group_size=group, bits=bits, mode=mode))
    except Exception as e:  # MLX raises ValueError/RuntimeError depending on the backend
        return str(e)
    return None


def check_params(bits: int, group_size: int, mode: str) -> QParams:
    """Validate one (bits, group_size, mode); 0 picks the mode's default. Errors name the allowed values."""
    if mode not in MODES:
        msg = f"unknown quantization mode {mode!r}: choose one of {', '.join(MODES)}"
        raise InvalidArgument(msg, reason="BAD_QUANT_MODE", mode=mode)
    allowed_bits, allowed_groups, (default_bits, default_group) = MODES[mode]
    bits, group_size = bits or default_bits, group_size or default_group
    if bits not in allowed_bits:
        msg = f"bad q_bits {bits} for mode {mode}: choose one of {', '.join(map(str, allowed_bits))}"
        raise InvalidArgument(msg, reason="BAD_QUANT_BITS", bits=bits, mode=mode)
    if group_size not in allowed_groups:
        msg = f"bad q_group_size {group_size} for mode {mode}: choose one of {', '.join(map(str, allowed_groups))}"
        raise InvalidArgument(msg, reason="BAD_QUANT_GROUP_SIZE", group_size=group_size, mode=mode)
    why = mode_unsupported(mode)
    if why is not None:
        msg = f"quantization mode {mode} is not supported by this MLX build's backend: {why}; use affine"
        raise Unsupported(msg, reason="UNSUPPORTED_QUANT_MODE", mode=mode)
    return QParams(bits, group_size, mode)


def parse_override(text: str, default: QParams) -> Override:
    """``PATTERN=BITS[:GROUP]``, ``PATTERN=skip`` or ``PATTERN=MODE`` (mxfp4, mxfp8, nvfp4); else BAD_OVERRIDE."""
    pattern, sep, value = text.partition("=")
    pattern, value = pattern.strip(), value.strip().lower()
    try:
        if not sep or not pattern or not value:
            raise ValueError("expected PATTERN=BITS[:GROUP] or PATTERN=skip")
        if value == "skip":
            return Override(pattern, None, text)
        if value in MODES:
            return Override(pattern, check_params(0, 0, value), text)
        bits_s, colon, group_s = value.partition(":")
        if colon and not group_s:
            raise ValueError("a ':' must be followed by a group size")
        # Without a group, keep the default's when it is affine (an MX default's group is mode-specific).
        group = int(group_s) if group_s else default.group_size if default.mode == "affine" else 0
        return Override(pattern, check_params(int(bits_s), group, "affine"), text)
    except (ValueError, InvalidArgument) as e:
        why = e.message if isinstance(e, InvalidArgument) else str(e)
        msg = f"bad quantization override {text!r}: {why} (e.g. 'lm_head=8', '*.v_proj=6:32', 'vision_model.*=skip')"
        raise InvalidArgument(msg, reason="BAD_OVERRIDE", override=text) from None


def make_spec(
    bits: int = 0, group_size: int = 0, mode: str = "affine", overrides: Iterable[str] = (), recipe: str | None = None
) -> QuantSpec:
    """Validate every quantization flag up front, before any weight is read."""
    if recipe:
        if recipe not in RECIPES:
            msg = f"unknown quantization recipe {recipe!r}: choose one of {', '.join(RECIPES)}"
            raise InvalidArgument(msg, reason="BAD_RECIPE", recipe=recipe)
        if mode != "affine":
            msg = f"recipe {recipe} mixes affine bit widths and cannot use mode {mode}: drop --q-mode"
            raise InvalidArgument(msg, reason="BAD_RECIPE", recipe=recipe, mode=mode)
        bits = RECIPES[recipe][0]  # the recipe's low bits are the default; its high bits are per-layer entries
    default = check_params(bits, group_size, mode)
    return QuantSpec(default, tuple(parse_override(o, default) for o in overrides), recipe or None)


def layer_stacks(names: Iterable[str]) -> dict[str, int]:
    """Number of layers per stack, from names like ``<stack>.layers.N.…`` (several stacks, e.g. CLIP's two)."""
    stacks: dict[str, int] = {}
    for name in names:
        m = _LAYER_RE.match(name)
        if m:
            stack = m.group(1) or ""
            stacks[stack] = max(stacks.get(stack, 0), int(m.group(2)) + 1)
    return stacks


def use_more_bits(index: int, num_layers: int) -> bool:
    """mlx-lm / llama.cpp Q4_K_M: the first and last eighth of the layers, and every third layer between."""
    eighth = num_layers // 8
    return index < eighth or index >= 7 * num_layers // 8 or (index - eighth) % 3 == 2


def recipe_params(recipe: str, path: str, stacks: dict[str, int], group_size: int) -> QParams:
    """The recipe's choice for module ``path``: high bits for v_proj/down_proj in chosen layers and lm_head."""
    low, high = RECIPES[recipe]
    m = _LAYER_RE.match(path + ".")
    more = use_more_bits(int(m.group(2)), stacks.get(m.group(1) or "", int(m.group(2)) + 1)) if m else False
    leaf = path.rsplit(".", 1)[-1]
    if (leaf in _HIGH_BIT_LAYERS and more) or leaf == "lm_head":
        return QParams(high, group_size)
    return QParams(low, group_size)


def choose(
    spec: QuantSpec, path: str, stacks: dict[str, int], arch_params: Any = None
) -> tuple[QParams | None, str | None]:
    """(params, None), or (None, reason) when an override keeps the layer in float. First override match wins;
    then the architecture's own choice for the layer (``arch_params(path)``: mlx-lm's quant_predicate)."""
    for o in spec.overrides:
        if fnmatch.fnmatchcase(path, o.pattern):
            return o.params, None if o.params else f"override {o.text!r}"
    own = arch_params(path) if arch_params is not None else None
    if own:
        return check_params(int(own.get("bits", 0)), int(own.get("group_size", 0)), own.get("mode", "affine")), None
    if spec.recipe:
        return recipe_params(spec.recipe, path, stacks, spec.default.group_size), None
    return spec.default, None


def fit_group(params: QParams, shape: tuple[int, ...]) -> tuple[QParams | None, str | None]:
    """Fall back to the largest smaller group size dividing the input dim (affine only), else float; with the
    reason. ``shape`` is the [rows, cols] weight."""
    rows, in_dim = shape
    if params.mode == "nvfp4" and (rows * in_dim) % 32:
        # MLX 0.32's nvfp4 quantize reshapes into blocks of 32 values and fails on anything else (probed on CPU).
        return None, f"nvfp4 needs rows x cols divisible by 32 in MLX {_mlx_version()}, got {rows} x {in_dim}"
    if in_dim % params.group_size == 0:
        return params, None
    why = f"input dim {in_dim} not divisible by group size {params.group_size}"
    if params.mode == "affine":
        for g in sorted(MODES["affine"][1], reverse=True):
            if g < params.group_size and in_dim % g == 0:
                return QParams(params.bits, g, params.mode), f"{why}: quantized with group size {g}"
    return None, why


def _mlx_version() -> str:
    from importlib.metadata import version

    return version("mlx")


def config_entry(default: QParams, layers: dict[str, QParams]) -> dict[str, Any]:
    """The config.json ``quantization`` dict: default parameters plus one entry per layer that differs."""
    entry = default.as_config()
    for path in sorted(layers):
        if layers[path] != default:
            entry[path] = layers[path].as_config()
    return entry


def packed_shapes(shape: tuple[int, ...], p: QParams) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(packed weight shape, scales shape, has biases) that ``mx.quantize`` produces for a [.., rows, cols]
    weight (stacked MoE experts are [experts, rows, cols])."""
    *lead, cols = shape
    return (*lead, cols * p.bits // 32), (*lead, cols // p.group_size), p.mode == "affine"


def layer_params(quantization: dict[str, Any] | None, path: str) -> QParams:
    """A quantized module's parameters from config.json ``quantization``: its own entry, else the defaults.

    Entries written without ``mode`` (older mlx-lm) are affine. InvalidArgument BAD_QUANTIZATION when neither
    exists or the entry says the layer is not quantized although ``<path>.scales`` is there.
    """
    entry = (quantization or {}).get(path, quantization)
    if not isinstance(entry, dict) or "bits" not in entry:
        msg = f"{path} is quantized (has .scales) but config.json has no quantization entry for it: re-convert"
        raise InvalidArgument(msg, reason="BAD_QUANTIZATION", tensor=path)
    mode = str(entry.get("mode", "affine"))
    group = int(entry.get("group_size") or MODES.get(mode, MODES["affine"])[2][1])
    return QParams(int(entry["bits"]), group, mode)
