"""The build pipeline: recipe (kept-block LoRA), calibration-based slot initialisation, local fit."""
from __future__ import annotations

import random

import pytest
import torch

from flexigpt import evaluate
from flexigpt.pipeline import build, drop_baseline, needs_calibration, recipe
from flexigpt.plan import AdapterSpec, Plan


def _windows(n=8, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, (n, t), generator=g)


def test_recipe_gives_a_recovered_drop_plan_its_matched_kept_lora(tiny_model):
    from flexigpt.params import matched_lora_rank

    flexi = Plan("tiny", 6, (0, 1, 1, 3, 3, 5))
    drop = flexi.with_method("drop")
    assert recipe(drop, tiny_model, recovering=False) == drop
    assert recipe(drop, tiny_model, recovering=True).kept_lora_rank == matched_lora_rank(drop, tiny_model)
    assert recipe(flexi, tiny_model, recovering=True) == flexi
    assert recipe(drop, tiny_model, recovering=True, kept_lora_rank=3).kept_lora_rank == 3
    assert Plan.from_json(drop.with_kept_lora(3).to_json()).kept_lora_rank == 3


def test_the_drop_baseline_of_a_hybrid_plan_matches_its_whole_trainable_count(tiny_model):
    from flexigpt.params import measure_params
    from flexigpt.surgery import apply_plan

    flexi = Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=2))
    assert drop_baseline(flexi, tiny_model) == flexi.with_method("drop")  # rank matched at recovery
    hybrid = flexi.with_kept_lora(1)
    base = drop_baseline(hybrid, tiny_model)
    assert base.method == "drop" and base.pruned_blocks == hybrid.pruned_blocks
    budget = measure_params(apply_plan(tiny_model, hybrid)).trainable
    slots_only = measure_params(apply_plan(tiny_model, flexi)).trainable
    assert budget > slots_only  # the hybrid's kept LoRA is part of what the baseline must match

    def gap(rank):
        return abs(measure_params(apply_plan(tiny_model, base.with_kept_lora(rank))).trainable - budget)
    rank = base.kept_lora_rank
    assert rank > 1 and gap(rank) <= min(gap(rank - 1), gap(rank + 1))


def test_whitened_build_needs_calibration_and_reports_the_fit(tiny_model):
    plan = Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=4, init="whitened"))
    assert needs_calibration(plan) and not needs_calibration(plan.with_adapter(init="svd"))
    with pytest.raises(ValueError, match="calibration windows"):
        build(tiny_model, plan)
    report: dict = {}
    model = build(tiny_model, plan, calibration=_windows(), fit_steps=5, report=report)
    assert set(report["r2"]) == {"2", "4"} and report["fit_steps"] == 5 and report["fit_seconds"] >= 0
    assert model.flexigpt_build.plan == plan


@pytest.mark.parametrize("seed", range(4))
def test_whitened_start_is_never_worse_than_the_plain_drop(tiny_model, seed):
    """Property over random plans: after the whitened init and closed-form scales, a build starts
    at most 2 % above the plain drop of the same blocks on held-out tokens."""
    rng = random.Random(seed)
    pruned = sorted(rng.sample(range(1, 6), rng.randint(1, 3)))
    plan = Plan.identity("tiny", 6, method="drop")
    for b in pruned:
        plan = plan.drop(b)
    flexi = plan.with_method("flexigpt").with_adapter(rank=rng.choice([2, 4, 8]), init="whitened")
    held = _windows(6, 24, seed=100 + seed)
    drop_ppl = evaluate.perplexity(build(tiny_model, plan), held).ppl
    flexi_ppl = evaluate.perplexity(build(tiny_model, flexi, calibration=_windows(16, 24, seed)), held).ppl
    assert flexi_ppl <= 1.02 * drop_ppl, (pruned, flexi.donors, flexi_ppl, drop_ppl)
