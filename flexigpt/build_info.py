"""What was built? The record ``apply_plan`` keeps on every model it builds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BuildInfo", "build_info"]


@dataclass
class BuildInfo:
    """What ``flexigpt.surgery.apply_plan`` built, kept on the model as ``model.flexigpt_build``.

    Attributes:
        plan: the plan.
        base_config: the base model's config as a dict (the export stores it).
        ranks: the LoRA rank of each targeted matrix in replaced slots (after capping).
        kept_lora: ``{"rank", "targets", "ranks"}`` once kept-block LoRA is attached, else ``None``.
        extra: method-specific results of the build (e.g. fit residuals).
    """

    plan: Any
    base_config: dict[str, Any]
    ranks: dict[str, int] = field(default_factory=dict)
    kept_lora: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_info(model: Any) -> BuildInfo:
    """The ``BuildInfo`` of a model made by ``apply_plan``.

    Raises:
        ValueError: when the model was not built by ``apply_plan``.
    """
    info = getattr(model, "flexigpt_build", None)
    if not isinstance(info, BuildInfo):
        raise ValueError(f"{type(model).__name__} was not built by flexigpt.surgery.apply_plan (no build info)")
    return info
