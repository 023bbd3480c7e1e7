"""A text model's plan: the r8 slots' budget split into r6 slots plus kept-block LoRA r1."""
from __future__ import annotations

import json

import pytest

from flexigpt.plan import AdapterSpec, Plan
from flexigpt.plan.budget import TEXT_KEPT_LORA_RANK, TEXT_SLOT_RANK, text_model_budget

_BI = [0.9, 0.1, 0.05, 0.3, 0.02, 0.5]


def _flexi(rank=8):
    return Plan("tiny", 6, (0, 1, None, 3, None, 5), adapter=AdapterSpec(rank=rank))


def test_split_moves_two_ranks_to_the_kept_blocks():
    plan = text_model_budget(_flexi())
    assert (plan.adapter.rank, plan.kept_lora_rank) == (TEXT_SLOT_RANK, TEXT_KEPT_LORA_RANK) == (6, 1)
    assert plan.layer_map == _flexi().layer_map and "kept-block LoRA r1" in plan.note("budget")


@pytest.mark.parametrize("plan", [_flexi(rank=32), _flexi().with_kept_lora(2), _flexi().with_method("drop"),
                                  Plan.identity("tiny", 6, method="flexigpt")])
def test_split_leaves_other_plans_alone(plan):
    """Another slot rank or the plan's own kept LoRA was the user's choice; drops and plans
    without slots have no slot budget to split."""
    assert text_model_budget(plan) == plan


@pytest.mark.parametrize("chat_template,flags,expected", [
    (False, [], (6, 1)),                          # a text model: the measured split
    (True, [], (8, None)),                        # a chat model keeps r8 slots alone
    (None, [], (8, None)),                        # an analysis written before the field: no split
    (False, ["--rank", "8"], (8, None)),          # the user named the slot rank
    (False, ["--kept-lora-rank", "3"], (8, 3)),   # or the kept LoRA
    (False, ["--method", "drop"], (8, None)),     # a drop plan: recovery matches its rank
])
def test_cli_plan_applies_the_split_only_to_text_models(tmp_path, capsys, chat_template, flags, expected):
    from flexigpt.cli import main

    analysis = {"format_version": 1, "model": "default", "num_blocks": 6, "block_influence": _BI}
    if chat_template is not None:
        analysis["chat_template"] = chat_template
    (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    out = tmp_path / "plan.json"
    assert main(["plan", "--analysis", str(tmp_path), "--ratio", "0.34", *flags, "--out", str(out)]) == 0
    plan = Plan.from_json(out.read_text())
    assert (plan.adapter.rank, plan.kept_lora_rank) == expected
    capsys.readouterr()


def test_analysis_records_whether_the_model_has_a_chat_template(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    from flexigpt.analysis import analyze

    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path))
    kw = dict(model_ref="tiny", data="default", samples=2, seq_len=16, ranks=(2,), share=False)
    assert analyze(tiny_model, tiny_tokenizer, **kw).to_dict()["chat_template"] is True
    template, tiny_tokenizer.chat_template = tiny_tokenizer.chat_template, None
    try:
        again = analyze(tiny_model, tiny_tokenizer, **kw).to_dict()
        assert again["cached"] and again["chat_template"] is False  # read from the cache, then told
    finally:
        tiny_tokenizer.chat_template = template
