"""How should a FlexiGPT plan of a text model spend its trainable budget?

``plan`` proposes rank-8 replacement slots. For a model without a chat template it moves four of
those ranks to a rank-2 LoRA on every kept block ("hybrid"): 814,464 trainable parameters on the
embedded model's default plan, against 753,408 for r8 slots alone and 854,784 for the matched
drop + LoRA baseline. Measured with the text recipe (200 local-fit steps, ``mix`` at KL weight 2,
100 steps; bench/RESULTS.md, "The budget split and the learning rate"): 17.94 in-domain / 126.79 on
the other text in one bench run, against 19.48 / 134.37 for drop + LoRA. Side by side in the sweep:
17.94 / 126.27 against 17.84 / 130.86 for r6 slots + rank-1 kept LoRA (the split until then) and
18.33 / 135.83 for r8 slots alone; at lr 2e-3 the order is the same (16.58 / 122.77 against
16.61 / 127.41).
Chat models keep r8 slots alone: the hybrid answered fewer fidelity questions with more looping
replies (18 of 73 with 9 loops against 20 with 2, in the chat recipe).
"""
from __future__ import annotations

import dataclasses

from flexigpt.plan.core import Plan
from flexigpt.plan.specs import AdapterSpec

__all__ = ["TEXT_KEPT_LORA_RANK", "TEXT_SLOT_RANK", "analysis_budget", "text_model_budget", "undo_text_budget",
           "with_chosen_rank"]

TEXT_SLOT_RANK = 4
TEXT_KEPT_LORA_RANK = 2
_PROPOSED_RANK = AdapterSpec().rank  # the split was measured from this slot rank


def text_model_budget(plan: Plan) -> Plan:
    """``plan`` with the text models' split of the slots' budget: slots at ``TEXT_SLOT_RANK`` plus
    kept-block LoRA at ``TEXT_KEPT_LORA_RANK``. Unchanged unless it is a FlexiGPT plan with
    replacement slots at the proposed rank and no kept-block LoRA of its own."""
    if (plan.method != "flexigpt" or not plan.replaced_slots or plan.kept_lora_rank is not None
            or plan.adapter.rank != _PROPOSED_RANK):
        return plan
    return (plan.with_adapter(rank=TEXT_SLOT_RANK).with_kept_lora(TEXT_KEPT_LORA_RANK)
            .with_notes(budget=f"text model: r{_PROPOSED_RANK} budget as r{TEXT_SLOT_RANK} slots + kept-block LoRA "
                               f"r{TEXT_KEPT_LORA_RANK}"))


def with_chosen_rank(plan: Plan, rank: int) -> Plan:
    """``plan`` with slot rank ``rank`` chosen by hand. A hand-chosen rank gets no split (as
    ``plan --rank`` does): if ``text_model_budget`` made this plan's kept-block LoRA, it goes, with
    its ``budget`` note; a kept-block LoRA the user asked for stays."""
    if plan.note("budget") is None:
        return plan.with_rank(rank)
    notes = tuple((k, v) for k, v in plan.notes if k != "budget")
    return dataclasses.replace(plan.with_rank(rank).with_kept_lora(None), notes=notes)


def analysis_budget(plan: Plan, analysis: dict) -> Plan:
    """``text_model_budget(plan)`` when ``analysis`` says the model has no chat template, else
    ``plan`` (an analysis written before ``chat_template`` existed says nothing: no split)."""
    return text_model_budget(plan) if analysis.get("chat_template") is False else plan


def undo_text_budget(plan: Plan) -> Plan:
    """``plan`` as it was before ``text_model_budget`` split it (unchanged if it was not split)."""
    return with_chosen_rank(plan, _PROPOSED_RANK) if plan.note("budget") is not None else plan
