"""A text model's plan: the r8 slots' budget split into r4 slots plus kept-block LoRA r2."""
from __future__ import annotations

import json

import pytest

from flexigpt.plan import AdapterSpec, Plan
from flexigpt.plan.budget import TEXT_KEPT_LORA_RANK, TEXT_SLOT_RANK, text_model_budget, undo_text_budget, with_chosen_rank

_BI = [0.9, 0.1, 0.05, 0.3, 0.02, 0.5]


def _flexi(rank=8):
    return Plan("tiny", 6, (0, 1, None, 3, None, 5), adapter=AdapterSpec(rank=rank))


def test_split_moves_four_ranks_to_the_kept_blocks():
    plan = text_model_budget(_flexi())
    assert (plan.adapter.rank, plan.kept_lora_rank) == (TEXT_SLOT_RANK, TEXT_KEPT_LORA_RANK) == (4, 2)
    assert plan.layer_map == _flexi().layer_map and "kept-block LoRA r2" in plan.note("budget")


@pytest.mark.parametrize("plan", [_flexi(rank=32), _flexi().with_kept_lora(2), _flexi().with_method("drop"),
                                  Plan.identity("tiny", 6, method="flexigpt")])
def test_split_leaves_other_plans_alone(plan):
    """Another slot rank or the plan's own kept LoRA was the user's choice; drops and plans
    without slots have no slot budget to split."""
    assert text_model_budget(plan) == plan


@pytest.mark.parametrize("chat_template,flags,expected", [
    (False, [], (4, 2)),                          # a text model: the measured split
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


def test_a_rank_chosen_by_hand_undoes_the_split_and_nothing_else():
    split = text_model_budget(_flexi())
    chosen = with_chosen_rank(split, 8)
    assert (chosen.adapter.rank, chosen.kept_lora_rank, chosen.note("budget")) == (8, None, None)
    assert chosen.layer_map == split.layer_map
    assert undo_text_budget(split) == _flexi() and undo_text_budget(_flexi().with_kept_lora(2)) == _flexi().with_kept_lora(2)
    own = _flexi().with_kept_lora(2)  # a kept LoRA the user asked for is theirs: it stays
    assert (with_chosen_rank(own, 4).adapter.rank, with_chosen_rank(own, 4).kept_lora_rank) == (4, 2)


@pytest.mark.parametrize("chat_template,expected", [(False, (4, 2)), (True, (8, None)), (None, (8, None))])
def test_app_plan_tab_splits_a_text_models_budget_as_the_cli_does(request_, chat_template, expected):
    """The app proposes what `plan` proposes; the rank box then shows the plan's rank, and a rank
    typed there is the user's choice (no split), as `plan --rank` is."""
    from app import session
    from app.tabs import plan as plan_tab

    analysis = {"format_version": 1, "model": "default", "num_blocks": 6, "block_influence": _BI}
    if chat_template is not None:
        analysis["chat_template"] = chat_template
    session.work(request_.session_hash).analysis = analysis
    plan = plan_tab.on_propose(0.34, "FlexiGPT (share a donor + adapter)", 8, request_)
    assert (plan.adapter.rank, plan.kept_lora_rank) == expected
    assert plan_tab.rank_box(plan)["value"] == expected[0]
    assert plan_tab.on_rank(plan, expected[0]) == plan  # the box left as shown changes nothing
    typed = plan_tab.on_rank(plan, 8 if expected[0] != 8 else 4)
    assert typed.kept_lora_rank is None and typed.note("budget") is None
    drop = plan_tab.on_method(plan, "drop (ShortGPT)", 0.34, 8, request_)
    assert (drop.method, drop.kept_lora_rank, drop.note("budget")) == ("drop", None, None)  # recovery matches its LoRA
    back = plan_tab.on_method(drop, "FlexiGPT (share a donor + adapter)", 0.34, 8, request_)
    assert (back.adapter.rank, back.kept_lora_rank) == expected and back.pruned_blocks == plan.pruned_blocks
    assert back.donors == plan.donors == {b: None for b in plan.pruned_blocks}  # no share error: no donor, as proposed
    if expected[1]:
        lines = plan_tab.plan_message(plan, {"num_parameters": 10 ** 6}, _Counts())
        assert f"rank-{expected[1]} LoRA" in lines and "no chat template" in lines


class _Counts:
    stored = run = 10 ** 5
