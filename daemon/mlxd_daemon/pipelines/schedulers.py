"""Samplers: diffusers' own scheduler classes, so every step is diffusers' math exactly (timestep spacing,
sigmas, multistep history, ancestral noise from the same ``torch.Generator``). They act on the small latent
tensors only; the UNet runs in MLX. Adding a scheduler: put its diffusers class name in ``SCHEDULERS`` under a
short name, and add it to the parity test's list (tests/test_sd_pipeline.py) — the loop in ``sd.py`` is generic
over ``set_timesteps`` / ``scale_model_input`` / ``step``.
"""

from __future__ import annotations

import inspect
from typing import Any

from mlxd_daemon.errors import InvalidArgument, Unsupported

# short name (as --scheduler takes it) -> diffusers class; all predict epsilon or v as the UNet was trained.
SCHEDULERS: dict[str, str] = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpmsolver_multistep": "DPMSolverMultistepScheduler",
}
_BY_CLASS = {v: k for k, v in SCHEDULERS.items()}


def check_scheduler_class(class_name: str) -> str:
    """The short name of a diffusers scheduler class mlxd runs; ``Unsupported`` UNSUPPORTED_SCHEDULER otherwise."""
    if class_name not in _BY_CLASS:
        msg = (f"scheduler class {class_name!r} is not supported; supported: {', '.join(SCHEDULERS.values())} "
               "(set _class_name in scheduler/scheduler_config.json to one of them)")  # fmt: skip
        raise Unsupported(msg, reason="UNSUPPORTED_SCHEDULER", scheduler=class_name)
    return _BY_CLASS[class_name]


def make_scheduler(config: dict[str, Any], name: str = "") -> Any:
    """A fresh diffusers scheduler: the pipeline's own (scheduler_config.json) or ``name`` (a short name or class
    name) built ``from_config`` on the pipeline's config, as ``pipe.scheduler = X.from_config(...)`` does."""
    import diffusers

    if name:
        class_name = SCHEDULERS.get(name, name)
        if class_name not in _BY_CLASS:
            msg = f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}"
            raise InvalidArgument(msg, reason="UNKNOWN_SCHEDULER", scheduler=name)
    else:
        class_name = str(config.get("_class_name", ""))
        check_scheduler_class(class_name)
    return getattr(diffusers, class_name).from_config(config)


def step_kwargs(scheduler: Any, generator: Any) -> dict[str, Any]:
    """What the diffusers pipeline passes to ``step`` (its ``prepare_extra_step_kwargs``): eta 0 and the generator,
    each only when the scheduler's ``step`` takes it."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs
