"""One rule for turning a JSON config (config.json, preprocessor_config.json) into a frozen dataclass.

Keys the dataclass does not know are ignored (configs carry many we do not use); a ``None`` value means "the
default", as it does for transformers' configs and image processors (mlx-lm's ``BaseModelArgs.from_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

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


@dataclass(frozen=True, kw_only=True)
class ClassifierHead(FromDict):
    """Base for configs of models that may carry a classification head: transformers' ``architectures`` says
    whether the checkpoint is the ``HEAD_CLASS`` (e.g. BertForSequenceClassification), ``id2label`` names its
    outputs. Subclasses that define ``__post_init__`` call this one."""

    HEAD_CLASS: ClassVar[str] = ""
    architectures: tuple[str, ...] = ()
    id2label: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "architectures", tuple(self.architectures or ()))
        object.__setattr__(self, "id2label", {str(k): str(v) for k, v in (self.id2label or {}).items()})

    @property
    def is_classifier(self) -> bool:
        return self.HEAD_CLASS in self.architectures

    @property
    def labels(self) -> list[str]:
        """id2label in logit order (transformers' default names when config.json has none)."""
        n = len(self.id2label) or 2
        return [self.id2label.get(str(i), f"LABEL_{i}") for i in range(n)]


def labelled(result: dict[str, Any], config: ClassifierHead, classifier: bool) -> dict[str, Any]:
    """An Infer result with ``labels`` (``config.labels``, in logit order) added when the model is a classifier."""
    if classifier:
        result["labels"] = list(config.labels)
    return result
