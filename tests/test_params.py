"""Parameter accounting: estimate (no build) == measurement, on LLaMA (GQA) and OPT (tied, biases)."""
from __future__ import annotations

import pytest

from flexigpt.trainable import attach_kept_lora
from flexigpt.models import model_info
from flexigpt.params import estimate_params, measure_params, params_table, rank_caps
from flexigpt.plan import AdapterSpec, Plan, extend_plan
from flexigpt.surgery import apply_plan

PLANS = [
    Plan("t", 6, (0, 1, 1, 3, 3, 5)),
    Plan("t", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=40, out_norm="scale", train_prenorms=False)),
    Plan("t", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=3, targets=("k_proj", "down_proj"))),
    Plan("t", 6, (0, 2, 5), "drop"),
    extend_plan("t", 6, [1, 2]),
    extend_plan("t", 6, [2, 3, 4], "sequential"),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.method}-{p.layer_map}")
def test_estimate_equals_measured_llama(tiny_model, plan):
    measured = measure_params(apply_plan(tiny_model, plan))
    assert estimate_params(plan, tiny_model) == measured
    assert estimate_params(plan, tiny_model.config) == measured
    assert estimate_params(plan, model_info(tiny_model)) == measured


def test_estimate_equals_measured_opt_and_kept_lora(tiny_opt_model, tiny_model):
    plan = Plan("o", 4, (0, 0, 2, 3))
    assert estimate_params(plan, model_info(tiny_opt_model)) == measure_params(apply_plan(tiny_opt_model, plan))
    drop = Plan("t", 6, (0, 2, 5), "drop")
    model = attach_kept_lora(apply_plan(tiny_model, drop), 5)
    assert estimate_params(drop, tiny_model, kept_lora_rank=5) == measure_params(model)


def test_counts_make_sense(tiny_model):
    original = measure_params(tiny_model)
    assert original.stored == original.run == sum(p.numel() for p in tiny_model.parameters())
    flexi = estimate_params(PLANS[0], tiny_model)
    drop = estimate_params(PLANS[0].with_method("drop"), tiny_model)
    assert drop.stored < flexi.stored < original.stored < flexi.run
    rows = params_table(PLANS[0], tiny_model)
    assert [r["model"] for r in rows] == ["original", "drop", "flexigpt"] and rows[0]["stored"] == original.stored
    assert rank_caps(tiny_model, 48) == {"q_proj": 48, "k_proj": 32, "v_proj": 32, "o_proj": 48,
                                         "gate_proj": 48, "up_proj": 48, "down_proj": 48}
    with pytest.raises(ValueError, match="rank 65"):
        estimate_params(PLANS[0].with_rank(65), tiny_model)
    with pytest.raises(ValueError, match="8 blocks"):
        estimate_params(Plan("t", 8, tuple(range(8))), tiny_model)
