"""Method ``extend``: a deeper model. Chosen blocks get a copy that shares their weights, with its
own LoRA (standard init: there is no pruned weight to approximate), output norms and pre-norms.

``layer_map`` is longer than the base: the first occurrence of every block is the original and
each later occurrence a copy. ``ExtendSpec.mode`` records the layout: ``block`` (each chosen
block followed by its copy) or ``sequential`` (a contiguous span repeated once, after itself).
"""
from __future__ import annotations

import argparse
from typing import Any

from flexigpt.methods.base import BuildContext
from flexigpt.methods.flexigpt import AdapterSlots, build_adapter_slot

__all__ = ["Extend"]


class Extend(AdapterSlots):
    name = "extend"
    label = "extend (copy blocks)"
    description = "repeat chosen blocks: each copy shares its block's weights and trains its own adapter"
    editable = False

    def validate(self, plan) -> None:
        lm, L = plan.layer_map, plan.num_blocks
        firsts = [b for s, b in enumerate(lm) if b not in lm[:s]]
        if firsts != list(range(L)):
            raise ValueError(f"an extend layer_map must contain every block 0..{L - 1} with first occurrences in "
                             f"order, got {list(lm)}")
        if len(lm) > 4 * L:
            raise ValueError(f"an extend layer_map may have at most {4 * L} slots, got {len(lm)}")

    def replaced_slots(self, plan) -> tuple[int, ...]:
        return tuple(s for s, b in enumerate(plan.layer_map) if b in plan.layer_map[:s])

    def pruned_blocks(self, plan) -> tuple[int, ...]:
        return ()

    def short_name(self, plan) -> str:
        return f"extend +{plan.num_slots - plan.num_blocks} r{plan.adapter.rank}"

    def from_pruned(self, plan, pruned, *, donors=None, group_size=None):
        raise ValueError(f"an extend plan cannot be converted to or from a pruned set; make one with extend_plan "
                         f"(got {plan.method!r} -> extend)")

    def drop(self, plan, block, donor):
        raise ValueError(f"cannot drop block {block} from an 'extend' plan; use method 'flexigpt' or 'drop'")

    def keep(self, plan, block):
        raise ValueError(f"keep() edits flexigpt, drop or foldgpt plans, not 'extend'")

    def build_slot(self, ctx: BuildContext, plan, slot: int):
        block = plan.layer_map[slot]
        if slot not in self.replaced_slots(plan):
            return ctx.copies[block]
        # the copy starts from its source block's norms; standard LoRA init (nothing to approximate)
        return build_adapter_slot(ctx, plan, donor=block, norm_source=block, pruned=None)

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--extend-blocks", default="", help="extend: blocks to repeat, e.g. 10,11,12")
        parser.add_argument("--extend-mode", choices=("block", "sequential"), default="block",
                            help="extend: a copy after each chosen block, or the span repeated once")

    def plan_options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"extend_mode": getattr(args, "extend_mode", "block")}
