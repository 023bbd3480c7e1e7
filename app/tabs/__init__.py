"""One module per tab. Each has ``render(ctx)`` (components + event wiring) and top-level
``on_<event>`` handlers that take and return plain values, so tests call them directly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """What the tabs share: a few ``gr.State``s and the components other tabs read.

    Attributes:
        plan: ``gr.State`` holding the current ``flexigpt.plan.Plan`` (or None).
        analysis_token: ``gr.State`` with a short key of the last analysis; its ``change``
            event tells the Share and Plan tabs to refresh.
        builds_token: ``gr.State`` counter bumped whenever a model is built or recovered.
        components: named components registered by tabs (``model_ref``, ``data_ref``, ``ratio``...).
    """

    plan: Any
    analysis_token: Any
    builds_token: Any
    components: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.components[name]
