"""One rule for turning a JSON config (config.json, preprocessor_config.json) into a frozen dataclass.

Keys the dataclass does not know are ignored (configs carry many we do not use); a ``None`` value means "the
default", as it does for transformers' configs and image processors (mlx-lm's ``BaseModelArgs.from_dict``).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def known_kwargs(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the dataclass ``cls`` and not None."""
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in known and v is not None}


class FromDict:
    """Mixin for config dataclasses: ``from_dict`` by the rule above."""

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Build from a config dict, ignoring unknown keys; None takes the field's default."""
        return cls(**known_kwargs(cls, d))
