"""How many parameters? Stored, run per token and trainable, measured or estimated from a plan.

* **stored**: distinct tensors the model keeps (shared and tied tensors counted once, by
  ``data_ptr``), adapters and norms included. This is what FlexiGPT saves.
* **run**: parameters applied per token: every slot's weights count, shared or not, plus the
  adapters and norms. A FlexiGPT model stores fewer parameters but runs slightly more.
* **trainable**: the parameters recovery trains.

``estimate_params(plan, config)`` computes the same numbers without building anything (each
method counts its own slots from the shapes of a meta-device skeleton, ``flexigpt.shapes``), so
the app can update it on every plan edit; the tests check that estimate == measurement.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from flexigpt.arch import get_blocks
from flexigpt.plan import Plan
from flexigpt.shapes import capped_ranks, model_shapes

__all__ = ["ParamCounts", "estimate_params", "matched_lora_rank", "measure_params", "params_table", "rank_caps",
           "unique_numel"]


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model (see the module docstring)."""

    stored: int
    run: int
    trainable: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def unique_numel(params: Iterable[nn.Parameter]) -> int:
    """Elements of distinct tensors: shared or tied storage (same ``data_ptr``) is counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in params:
        key = (p.data_ptr(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def measure_params(model: nn.Module) -> ParamCounts:
    """Count a built (or any supported) model's parameters by inspecting its tensors."""
    blocks = get_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_blocks]
    run = unique_numel(outside) + sum(unique_numel(b.parameters()) for b in blocks)
    return ParamCounts(
        stored=unique_numel(model.parameters()),
        run=run,
        trainable=unique_numel(p for p in model.parameters() if p.requires_grad),
    )


def rank_caps(source: Any, rank: int, targets: tuple[str, ...] = ()) -> dict[str, int]:
    """The LoRA rank each targeted matrix gets: ``min(rank, d_in, d_out)``."""
    return capped_ranks(model_shapes(source).matrix_shapes, rank, targets)


def estimate_params(plan: Plan, source: Any, *, kept_lora_rank: int | None = None,
                    kept_lora_targets: tuple[str, ...] = ()) -> ParamCounts:
    """The counts ``measure_params`` of the built model would give, without building.

    Args:
        plan: the plan (its ``kept_lora_rank``, when set, adds kept-block LoRA).
        source: the base model, its config, a config dict or ``models.model_info()``.
        kept_lora_rank: add kept-block LoRA of this rank (overrides the plan's).
        kept_lora_targets: its targets (empty = every linear).
    """
    sh = model_shapes(source)
    if sh.num_blocks != plan.num_blocks:
        raise ValueError(f"plan is for {plan.num_blocks} blocks, but the model config has {sh.num_blocks}")
    method = plan.method_spec
    if method.has_adapters:
        rank_caps(source, plan.adapter.rank, plan.adapter.targets)  # validates rank and targets
    stored, run, trainable = method.estimate(plan, sh, plan.adapter)
    rank = kept_lora_rank if kept_lora_rank is not None else plan.kept_lora_rank
    if rank is not None:
        extra = len(plan.kept_slots) * sh.lora(rank, kept_lora_targets)
        stored, run, trainable = stored + extra, run + extra, trainable + extra
    return ParamCounts(stored=stored, run=run, trainable=trainable)


def matched_lora_rank(plan: Plan, source: Any, targets: tuple[str, ...] = ()) -> int:
    """The kept-block LoRA rank whose trainable count best matches ``plan`` built as FlexiGPT.

    This sets the ShortGPT + LoRA baseline at the same trainable budget. A FlexiGPT plan counts
    with its own kept-block LoRA (a hybrid plan's budget is its slots plus that LoRA); any other
    plan is counted as FlexiGPT slots alone. Ties go to the smaller rank; at least 1.
    """
    sh = model_shapes(source)
    flexi = plan if plan.method == "flexigpt" else plan.with_method("flexigpt").with_kept_lora(None)
    budget = estimate_params(flexi, source).trainable
    kept = len(flexi.kept_blocks)
    largest = max(min(o, i) for n, o, i in sh.matrices if not targets or n in targets)
    return min(range(1, largest + 1), key=lambda r: (abs(kept * sh.lora(r, targets) - budget), r))


def params_table(plan: Plan, source: Any) -> list[dict[str, Any]]:
    """Rows comparing original / drop / the plan's method for the plan's pruned set (FlexiGPT too
    for a drop plan), each with stored, run and trainable parameters and the stored fraction."""
    sh = model_shapes(source)
    original = sh.nonblock + sh.num_blocks * sh.block
    rows: list[tuple[str, Plan]] = [("original", Plan.identity(plan.base_model, plan.num_blocks, method="drop"))]
    if plan.method_spec.editable:
        rows.append(("drop", plan.with_method("drop")))
        rows.append((plan.method if plan.method != "drop" else "flexigpt",
                     plan if plan.method != "drop" else plan.with_method("flexigpt")))
    else:
        rows.append((plan.method, plan))
    out = []
    for name, p in rows:
        c = estimate_params(p, source)
        out.append({"model": name, "slots": p.num_slots, "stored": c.stored, "run": c.run, "trainable": c.trainable,
                    "stored_fraction": round(c.stored / original, 4)})
    return out
