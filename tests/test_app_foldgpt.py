"""App handlers for FoldGPT (gate score, plan method, group size), aligned donors and
self-speculative chat, called directly with plain values on the tiny model."""
from __future__ import annotations


import gradio as gr
import plotly.graph_objects as go
import pytest

from app import figures, session, tables
from app.tabs import build as build_tab
from app.tabs import chat as chat_tab
from app.tabs import plan as plan_tab
from app.tabs import scores as scores_tab

FOLD = "FoldGPT (remove, then share in groups)"
FLEXI = "FlexiGPT (share a donor + adapter)"




def _quiet(*args, **kwargs):
    return None


def test_gates_foldgpt_plan_and_speculative_chat(tiny_folder, tiny_text_file, request_, monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))
    data = str(tiny_text_file)
    with pytest.raises(gr.Error, match="Score blocks"):
        scores_tab.on_gates(3, 0.3, request_, progress=_quiet)
    scores_tab.on_score(tiny_folder, data, 4, 64, False, request_)
    # before gates are trained, FoldGPT falls back to Block Influence
    bi_plan = plan_tab.on_propose(0.34, FOLD, 4, request_, 2)
    assert bi_plan.method == "foldgpt" and bi_plan.note("selection") == "lowest block influence"
    status, bar, table, token = scores_tab.on_gates(3, 0.34, request_, progress=_quiet)
    assert "FoldGPT gates trained for 3 steps" in status and token
    gates = session.work(request_.session_hash).analysis["foldgpt_gates"]["gates"]
    assert len(gates) == 6 and list(table["FoldGPT gate"]) == [round(g, 4) for g in gates]
    assert any("FoldGPT gate" in a.text for a in bar.layout.annotations)  # its own panel under BI

    plan = plan_tab.on_propose(0.34, FOLD, 4, request_, 2)
    assert plan.method == "foldgpt" and plan.note("selection") == "lowest FoldGPT gate"
    lowest = sorted(range(6), key=lambda i: (gates[i], i))[:2]
    assert set(plan.removed_blocks) == set(lowest) and plan.group_size == 2
    fig, params, ptable, code, message, path, _ = plan_tab.on_render(plan, request_)
    assert "FoldGPT" in message and "removed" in message and '"sources"' in code
    assert len(fig.layout.shapes) == 2  # two groups of two slots share weights
    assert list(ptable["action"]).count("prune") == 2
    regrouped = plan_tab.on_group_size(plan, 4)
    assert regrouped.layer_map == (plan.sources[0],) * 4
    with pytest.raises(gr.Error, match="group size"):
        plan_tab.on_group_size(plan, 0)
    flexi = plan_tab.on_method(plan, FLEXI, 0.34, 4, request_, 2, True)
    assert flexi.method == "flexigpt" and set(flexi.unstored_blocks) == set(lowest) and flexi.adapter.align
    assert not plan_tab.on_align(flexi, False).adapter.align
    assert plan_tab.on_align(plan, True) == plan  # align concerns FlexiGPT adapters only
    back = plan_tab.on_method(flexi, FOLD, 0.34, 4, request_, 2, False)
    assert back == plan

    status, choices, builds = build_tab.on_build(plan, data, False, 0, request_)
    name = choices["value"]
    assert builds == 1 and name.startswith("foldgpt")
    args = ("w1 w2 w3", name, [], [], 6, 0.0, 1.0, tiny_folder, request_)
    plain = list(chat_tab.on_chat(*args))[-1]
    fast = list(chat_tab.on_chat(*args, True))[-1]
    assert fast[1][-1]["content"] == plain[1][-1]["content"]  # exact: the same greedy reply
    assert fast[0][-1]["content"] == plain[0][-1]["content"]  # the original too drafts for itself, exactly
    assert "Speculative decoding of the built model" in fast[3] and "accepted" in fast[3]
    assert "Speculative decoding of the original" in fast[3]
    assert "Speculative" not in plain[3]
    with pytest.raises(gr.Error, match="temperature to 0"):
        list(chat_tab.on_chat("w1 w2", name, [], [], 6, 0.7, 1.0, tiny_folder, request_, True))


def test_speculative_switch_follows_temperature():
    off = chat_tab.on_temperature(0.7)
    assert off["interactive"] is False and off["value"] is False and "temperature 0" in off["info"]
    assert chat_tab.on_temperature(0.0)["interactive"] is True
    assert "%" in chat_tab.speculative_status({"drafted": 8, "accepted": 6, "rate": 0.75, "calls": 3, "tokens": 9,
                                               "seconds": 0.5})
    assert chat_tab.speculative_status({}) == ""


def test_figures_and_tables_show_groups_and_gates():
    fig = figures.slot_map(6, (0, 0, 3, 3), sources=(0, 1, 3, 5))
    assert isinstance(fig, go.Figure) and len(fig.layout.shapes) == 2
    assert len(fig.layout.annotations) == 2  # arrows to the two slots that run another block's weights
    assert fig.data[0].marker.color[1] == figures.COLORS["muted"] and fig.data[0].marker.color[2] == figures.COLORS["dropped"]
    plain = figures.slot_map(6, (0, 1, 1, 3, 3, 5), replaced_slots=(2, 4))
    assert not plain.layout.shapes
    df = tables.plan_table(6, (0, 0, 3, 3), "foldgpt", sources=(0, 1, 3, 5))
    assert list(df["action"]) == ["keep", "keep", "prune", "keep", "prune", "keep"]
    assert list(df.iloc[:, 3]) == ["", "0", "", "", "", "3"]
    analysis = {"block_influence": [0.5, 0.1, 0.2], "foldgpt_gates": {"gates": [0.9, 0.2, 0.6]}}
    cols = tables.score_columns(analysis)
    assert cols["foldgpt_gate"] == [0.9, 0.2, 0.6]
    assert len(figures.scores_bar(cols).data) == 2
