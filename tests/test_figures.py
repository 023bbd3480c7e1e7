"""The app's pure figure and table functions: data in, plotly figure / DataFrame out (no browser)."""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import pytest

from app import figures, tables
from app.share_figure import NO_DONOR, share_heatmap

L = 6


def _analysis(L: int = L, ppl_drop: bool = True) -> dict:
    """A schema-v1 analysis dict with simple, known values (block 3 is the most removable)."""
    bi = [0.9, 0.2, 0.1, 0.02, 0.05, 0.4][:L]
    span = 3
    ad = [[round(0.1 * n + 0.01 * l, 4) for l in range(L - n + 1)] for n in range(1, span + 1)]
    sim = [[1.0 if a == b else round(1 - 0.1 * abs(a - b), 3) for b in range(L)] for a in range(L)]
    rel = [[None if i == j else round(1.3 + 0.01 * abs(i - j), 3) for j in range(L)] for i in range(L)]
    fn = [[None if i == j else round(0.5 + 0.1 * abs(i - j), 3) for j in range(L)] for i in range(L)]
    alone = [0.65] * L  # beats donors 2+ blocks away, loses to neighbours
    return {
        "format_version": 1, "model": "tiny", "fingerprint": "abc", "num_blocks": L, "data": "default",
        "samples": 4, "seq_len": 16,
        "protocol": {"data": "default", "split": "train", "windows": 4, "seq_len": 16, "tokens": 64,
                     "level": "token", "bos": False},
        "block_influence": bi,
        "angular_distance": {"max_span": span, "values": ad},
        "similarity": sim,
        "ppl_drop": {"samples": 2, "seq_len": 16, "tokens": 32, "base_ppl": 10.0,
                     "ppl": [10 + 5 * v for v in bi], "nll_increase": [math.log1p(0.5 * v) for v in bi]}
        if ppl_drop else None,
        "share_error": {"ranks": [8], "matrices": ["q_proj"], "pairs": "all", "rows": list(range(L)),
                        "cols": list(range(L)), "relative": {"8": rel}, "absolute": {"8": rel},
                        "per_matrix": {"relative": {"8": {"q_proj": rel}}, "absolute": {"8": {"q_proj": rel}},
                                       "function": {"8": {"q_proj": fn}}},
                        "paper": {"8": rel}, "weight_norms": {"q_proj": [1.0] * L},
                        "function": {"8": fn}, "no_donor": {"function": {"8": alone},
                                                            "per_matrix": {"function": {"8": {"q_proj": alone}}}}},
        "donor_suggestion": {"metric": "relative", "rank": 8, "pruned": [3, 4], "donors": {"3": 2, "4": 5},
                             "warning": None},
        "timings_s": {"total": 1.0}, "cached": False,
    }


def _axis_titles(fig: go.Figure) -> list[str]:
    return [fig.layout[k].title.text or "" for k in fig.layout if k.startswith(("xaxis", "yaxis"))]


def test_scores_bar_is_0_based_and_says_so():
    a = _analysis()
    fig = figures.scores_bar(tables.score_columns(a), marked=[3])
    assert isinstance(fig, go.Figure)
    bars = [t for t in fig.data if isinstance(t, go.Bar) and t.x and t.x[0] is not None]
    assert list(bars[0].x) == list(range(L))  # block 0 is the first bar
    assert list(bars[0].y) == a["block_influence"]
    assert any("block id (0-based)" in t for t in _axis_titles(fig))
    assert len(bars) == 3  # BI, loss increase, angular distance
    # the marked block is coloured differently from the others
    assert bars[0].marker.color[3] != bars[0].marker.color[0]
    assert "block 3 (0-based)" in bars[0].hovertext[3]
    assert "rank 1 of 6" in bars[0].hovertext[3]  # block 3 has the lowest BI


def test_scores_bar_without_ppl_drop_has_two_panels():
    fig = figures.scores_bar(tables.score_columns(_analysis(ppl_drop=False)))
    assert len([t for t in fig.data if isinstance(t, go.Bar)]) == 2


def test_angular_triangle_shape_and_best_marks():
    a = _analysis()
    fig = figures.angular_triangle(a["angular_distance"]["values"])
    heat = fig.data[0]
    assert len(heat.z) == 3 and all(len(r) == L for r in heat.z)
    assert heat.z[2][L - 2] is None  # row n-1 has L-n+1 entries; the rest is padding
    assert list(heat.y) == [1, 2, 3]  # span lengths, not 0-based ids
    best = fig.data[1]
    assert list(best.x) == [0, 0, 0]  # values grow with the start block here
    assert "0-based" in heat.hovertext[1][2] and "blocks 2..3" in heat.hovertext[1][2]


def test_similarity_and_share_heatmaps():
    a = _analysis()
    sim = figures.similarity_heatmap(a["similarity"])
    assert len(sim.data[0].z) == L
    se = a["share_error"]
    fig = share_heatmap(se["relative"]["8"], rows=[3, 4], cols=[0, 1, 2, 5], donors={3: 2, 4: 5})
    heat, marks = fig.data[0], fig.data[1]
    assert len(heat.z) == 2 and len(heat.z[0]) == 4
    assert heat.z[0][2] == pytest.approx(1.31)  # block 3 from donor 2
    assert list(marks.x) == ["2", "5"] and list(marks.y) == ["block 3", "block 4"]
    assert "rebuild block 3 from donor 2" in heat.hovertext[0][2]
    assert any("0-based" in t for t in _axis_titles(fig))


def test_share_heatmap_handles_missing_values():
    m = [[None, float("nan")], [1.0, None]]
    fig = share_heatmap(m, rows=[0, 1], cols=[0, 1])
    assert list(fig.data[0].z[0]) == [None, None]
    assert "not computed" in fig.data[0].hovertext[0][1]


def test_slot_map_flexigpt_and_extend():
    fig = figures.slot_map(6, (0, 1, 2, 2, 5, 5), replaced_slots=(3, 4))
    top, bottom = fig.data[0], fig.data[1]
    assert len(top.x) == 6 and len(bottom.x) == 6
    assert top.marker.color[3] == figures.COLORS["dropped"] and top.marker.color[2] == figures.COLORS["kept"]
    assert bottom.marker.color[3] == figures.COLORS["shared"]
    arrows = [a for a in fig.layout.annotations if a.showarrow]
    assert [(a.ax, a.x) for a in arrows] == [(2, 3), (5, 4)]  # donor block -> slot
    ext = figures.slot_map(3, (0, 0, 1, 2, 2), replaced_slots=(1, 4))
    assert len(ext.data[1].x) == 5
    assert ext.data[1].marker.color[1] == figures.COLORS["shared"]


def test_failsafe_returns_a_message_figure():
    fig = figures.scores_bar({"no": []})
    assert isinstance(fig, go.Figure)
    assert "Could not draw" in fig.layout.annotations[0].text


def test_block_stack_loss_curve_and_compare():
    info = {"architecture": "LlamaForCausalLM", "num_blocks": 6, "hidden_size": 64, "vocab_size": 128,
            "num_parameters": 300_000, "block_parameters": 40_000, "tied_embeddings": False}
    fig = figures.block_stack(info)
    assert list(fig.data[0].x) == list(range(6))
    assert "block id (0-based)" in fig.layout.xaxis.title.text
    curve = figures.loss_curve([1, 2, 3, 4, 5, 6], [5.0, 4.0, 3.5, 3.0, 2.8, 2.7])
    assert list(curve.data[0].y) == [5.0, 4.0, 3.5, 3.0, 2.8, 2.7] and len(curve.data) == 2
    assert "No recovery steps" in figures.loss_curve([], []).layout.annotations[0].text
    rows = [{"name": "original", "ppl_before": 11.0, "ppl_after": None, "stored_params": 100},
            {"name": "flexigpt 30%", "ppl_before": 50.0, "ppl_after": 20.0, "stored_params": 70}]
    cmp = figures.compare_bars(rows)
    assert list(cmp.data[0].y) == [11.0, 50.0] and cmp.layout.yaxis.type == "linear"
    assert any("original 11.0" in (a.text or "") for a in cmp.layout.annotations)  # the reference line
    rows[1]["ppl_before"] = 5000.0  # a collapsed model next to a healthy one: log axis
    assert figures.compare_bars(rows).layout.yaxis.type == "log"


def test_tables():
    a = _analysis()
    df = tables.scores_table(a)
    assert list(df["block (0-based)"]) == list(range(L))
    assert df.loc[3, "BI rank (1 = most removable)"] == 1
    assert "ppl without the block" in df.columns
    pt = tables.plan_table(6, (0, 1, 2, 2, 5, 5), "flexigpt", a["block_influence"])
    assert list(pt["action"]) == ["keep", "keep", "keep", "prune", "prune", "keep"]
    assert list(pt["donor (0-based)"])[3:5] == ["2", "5"]
    drop = tables.plan_table(6, (0, 1, 2, 5), "drop")
    assert list(drop["action"]).count("prune") == 2
    params = tables.params_table({"stored": 70, "run": 100, "trainable": 5}, base_total=100)
    assert list(params["vs base"]) == ["-30.0 %", "+0.0 %", "5.00 % of base"]
    assert "no BOS" in tables.protocol_text(a["protocol"])
    cmp = tables.compare_table([{"name": "x", "ppl_before": 12.345, "protocol": a["protocol"], "stored_params": 10}])
    assert isinstance(cmp, pd.DataFrame) and cmp.loc[0, "ppl before recovery"] == "12.35"
    assert tables.model_summary({"num_blocks": 6}).shape[1] == 2


def test_function_heatmap_has_a_no_donor_column_and_marks_it():
    a = _analysis()
    se = a["share_error"]
    alone = list(se["no_donor"]["function"]["8"])
    alone[4] = 0.55  # block 4: no donor beats its best donor (0.6)
    fig = share_heatmap(se["function"]["8"], rows=[3, 4], cols=[0, 1, 2, 5], donors={3: 2, 4: None},
                        no_donor=alone, label="error on real inputs")
    heat, marks = fig.data[0], fig.data[1]
    assert list(heat.x) == ["0", "1", "2", "5", NO_DONOR] and len(heat.z[0]) == 5
    assert heat.z[1][4] == pytest.approx(0.55) and heat.z[0][2] == pytest.approx(0.6)
    assert "block 4 (0-based) with no donor" in heat.hovertext[1][4]
    assert list(marks.x) == ["2", NO_DONOR] and list(marks.y) == ["block 3", "block 4"]
    assert fig.layout.shapes and fig.layout.shapes[0].x0 == pytest.approx(3.5)  # the column is set apart
    assert any("0-based" in t for t in _axis_titles(fig))


def test_share_tab_reads_the_function_metric():
    from app.tabs import share

    a = _analysis()
    assert "function" in share.METRICS and ("function (activation-aware)", "function") in share.METRIC_CHOICES
    fn = share.share_matrix(a, "function", 8)
    assert fn[3][2] == pytest.approx(0.6)
    assert share.share_matrix(a, "function", 8, "q_proj") == fn
    assert share.no_donor_column(a, "function", 8) == [0.65] * L
    assert share.no_donor_column(a, "relative", 8) is None
    assert share.no_donor_column(a, "function", 8, "q_proj") == [0.65] * L
    donors = share.donors_for(a, fn, [3, 4])
    assert donors == {3: 2, 4: 5}  # nearest neighbours: 0.6
    alone = [0.65] * L
    alone[4] = 0.55
    assert share.without_donor(donors, fn, alone) == {3: 2, 4: None}
    old = dict(a, share_error={k: v for k, v in a["share_error"].items() if k not in ("function", "no_donor")})
    with pytest.raises(ValueError, match="no function-space error"):
        share.share_matrix(old, "function", 8)
