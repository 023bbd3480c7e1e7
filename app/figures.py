"""Pure plotly figures for the explorer: plain data in, ``go.Figure`` out.

No gradio import and no computation beyond reshaping, so every figure is unit-testable. Every block id on
screen is 0-based and the axis titles say so, because 1-based vs 0-based confusion is the most
common complaint in the depth-pruning tools we studied (PruneMe #4/#12, mergekit #360).
Each public function is wrapped in :func:`failsafe`: a figure that cannot be drawn becomes a
figure with the error written in it, never a traceback in the UI.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

log = logging.getLogger(__name__)

TEMPLATE = "plotly_white"
BLOCK_AXIS = "block id (0-based)"
COLORS = {
    "kept": "#4C78A8",
    "dropped": "#BBBBBB",
    "shared": "#F58518",
    "extra": "#54A24B",
    "embed": "#9D755D",
    "accent": "#E45756",
    "muted": "#72B7B2",
}
_FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=13)


def _base(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE, title=dict(text=title, x=0.01, xanchor="left"), height=height,
        margin=dict(l=60, r=20, t=60, b=55), font=_FONT, hoverlabel=dict(font_size=12),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    return fig


def message_figure(text: str, title: str = "") -> go.Figure:
    """A blank figure that shows one message (empty states and errors)."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#555"), align="center")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _base(fig, title, height=260)


def failsafe(fn):
    """Turn an exception inside a figure function into a figure that says what went wrong."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a figure must never break the page
            log.exception("figure %s failed", fn.__name__)
            return message_figure(f"Could not draw this figure: {type(err).__name__}: {err}")

    return wrapper


def _block_ticks(n: int, narrow: bool = False) -> dict:
    step = 1 if n <= (16 if narrow else 32) else 2 if n <= (32 if narrow else 64) else 4
    return dict(tickmode="array", tickvals=list(range(0, n, step)), ticktext=[str(i) for i in range(0, n, step)])


def _fmt_params(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return f"{int(n)}"


@failsafe
def block_stack(info: Mapping[str, Any]) -> go.Figure:
    """The base model as a row of tiles: embeddings, blocks 0..L-1, final norm + LM head.

    Args:
        info: ``flexigpt.models.model_info`` output (num_blocks, block_parameters, vocab_size...).
    """
    n = int(info["num_blocks"])
    per_block = int(info.get("block_parameters", 0))
    emb = int(info.get("vocab_size", 0)) * int(info.get("hidden_size", 0))
    fig = go.Figure()
    hover = [f"block {i} (0-based)<br>{_fmt_params(per_block)} parameters<br>attention + MLP" for i in range(n)]
    fig.add_trace(go.Bar(x=list(range(n)), y=[1] * n, marker_color=COLORS["kept"], name="decoder block",
                         hovertext=hover, hoverinfo="text", width=0.85, text=[str(i) for i in range(n)],
                         textposition="inside", insidetextanchor="middle"))
    tied = " (tied with embeddings)" if info.get("tied_embeddings") else ""
    ends = [(-2.0, "embed", f"token embeddings<br>{_fmt_params(emb)} parameters"),
            (n + 1.0, "head", f"final norm + LM head{tied}")]
    for x, label, text in ends:
        fig.add_trace(go.Bar(x=[x], y=[1], width=1.6, marker_color=COLORS["embed"], name=label, showlegend=False,
                             hovertext=[text], hoverinfo="text", text=[label], textposition="inside"))
    fig.add_annotation(x=n / 2 - 0.5, y=1.12, text="tokens flow left to right through the residual stream →",
                       showarrow=False, font=dict(size=12, color="#555"))
    ticks = _block_ticks(n)
    fig.update_xaxes(title=BLOCK_AXIS, tickvals=[-2] + ticks["tickvals"] + [n + 1],
                     ticktext=["emb"] + ticks["ticktext"] + ["head"], tickmode="array", range=[-3.2, n + 2.2])
    fig.update_yaxes(visible=False, range=[0, 1.25])
    title = (f"{info.get('architecture', 'model')}: {n} blocks, width {info.get('hidden_size')}, "
             f"{_fmt_params(info.get('num_parameters', 0))} parameters")
    fig = _base(fig, title, height=230)
    fig.update_layout(showlegend=False, bargap=0.05, uniformtext=dict(minsize=9, mode="show"))
    return fig


@failsafe
def scores_bar(scores: Mapping[str, Sequence[float | None]], marked: Sequence[int] = (),
               marked_label: str = "pruned by the plan") -> go.Figure:
    """Block Influence per block, with the other per-block scores in aligned panels below.

    Args:
        scores: ``{"block_influence": [L], "angular_distance_1": [L] (optional),
            "nll_increase": [L] or None, "foldgpt_gate": [L] or None}``; one entry per block, 0-based order.
        marked: block ids to highlight (e.g. the ones the current plan prunes).
        marked_label: legend text for the highlighted blocks.

    Block Influence spans orders of magnitude (block 0 rewrites the embedding, BI near 1; middle
    blocks 0.02), so its panel switches to a log axis when max/min > 20.
    """
    bi = [float(v) for v in scores["block_influence"]]
    n = len(bi)
    panels = [("block_influence", "Block Influence (1 − cos in/out)")]
    if scores.get("nll_increase") is not None:
        panels.append(("nll_increase", "loss increase when the block is removed (nats/token)"))
    if scores.get("angular_distance_1") is not None:
        panels.append(("angular_distance_1", "angular distance in→out (0..1)"))
    if scores.get("foldgpt_gate") is not None:
        panels.append(("foldgpt_gate", "FoldGPT gate after training (low = removable given the others)"))
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        subplot_titles=[p[1] for p in panels])
    marked_set = {int(i) for i in marked}
    lowest = sorted(range(n), key=lambda i: bi[i])
    rank = {b: r for r, b in enumerate(lowest)}
    for row, (key, label) in enumerate(panels, start=1):
        vals = [None if v is None else float(v) for v in scores[key]]
        colors = [COLORS["accent"] if i in marked_set else COLORS["kept"] for i in range(n)]
        hover = [f"block {i} (0-based)<br>{label}: {'n/a' if v is None else f'{v:.4f}'}"
                 + (f"<br>rank {rank[i] + 1} of {n} by BI (1 = most removable)" if key == "block_influence" else "")
                 + (f"<br><b>{marked_label}</b>" if i in marked_set else "")
                 for i, v in enumerate(vals)]
        fig.add_trace(go.Bar(x=list(range(n)), y=vals, marker_color=colors, hovertext=hover, hoverinfo="text",
                             showlegend=False, name=label), row=row, col=1)
        fig.update_xaxes(**_block_ticks(n), row=row, col=1)
    if marked_set:
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color=COLORS["accent"], name=marked_label))
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color=COLORS["kept"], name="other blocks"))
    fig.update_xaxes(title=BLOCK_AXIS, row=len(panels), col=1)
    fig.update_yaxes(rangemode="tozero")
    positive = [v for v in bi if v > 0]
    if positive and max(positive) / min(positive) > 20:
        fig.update_yaxes(type="log", title="BI (log scale)", row=1, col=1)
    return _base(fig, "Per-block scores: low bars = the block changes the hidden state little",
                 height=260 + 170 * len(panels))


@failsafe
def angular_triangle(values: Sequence[Sequence[float | None]]) -> go.Figure:
    """Angular distance between the input of block ``l`` and the output of block ``l+n-1``.

    Args:
        values: ``values[n-1][l]`` (schema ``angular_distance.values``); row ``n-1`` has ``L-n+1`` entries.
    """
    rows = len(values)
    n_blocks = len(values[0]) if rows else 0
    z, hover = [], []
    for r, row in enumerate(values):
        span = r + 1
        zr = [None if v is None else float(v) for v in row] + [None] * (n_blocks - len(row))
        z.append(zr)
        hover.append([
            (f"drop blocks {l}..{l + span - 1} (0-based, inclusive; {span} block{'s' if span > 1 else ''})"
             f"<br>angular distance {v:.4f}") if v is not None else "" for l, v in enumerate(zr)])
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_blocks)), y=list(range(1, rows + 1)), colorscale="Viridis",
                               hovertext=hover, hoverinfo="text", colorbar=dict(title="distance")))
    # the best start for each span length: the cheapest contiguous run to remove
    best_x, best_y = [], []
    for r, row in enumerate(z):
        finite = [(v, l) for l, v in enumerate(row) if v is not None]
        if finite:
            best_x.append(min(finite)[1])
            best_y.append(r + 1)
    fig.add_trace(go.Scatter(x=best_x, y=best_y, mode="markers", name="lowest distance for this span",
                             marker=dict(symbol="x", color="white", size=9, line=dict(width=1, color="black")),
                             hoverinfo="skip"))
    fig.update_xaxes(title="first block of the span, " + BLOCK_AXIS, **_block_ticks(n_blocks, narrow=True))
    fig.update_yaxes(title="span length (blocks)", dtick=1 if rows <= 16 else 2)
    fig = _base(fig, "Angular distance of spans (dark = removable run)", 480)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))
    return fig


@failsafe
def similarity_heatmap(sim: Sequence[Sequence[float | None]]) -> go.Figure:
    """Mean token cosine between the outputs of block ``a`` and block ``b``."""
    n = len(sim)
    z = [[None if v is None else float(v) for v in row] for row in sim]
    hover = [[f"output of block {a} vs block {b} (0-based)<br>cosine {v:.4f}" if v is not None else ""
              for b, v in enumerate(row)] for a, row in enumerate(z)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n)), y=list(range(n)), colorscale="Blues", zmax=1,
                               hovertext=hover, hoverinfo="text", colorbar=dict(title="cosine")))
    fig.update_xaxes(title=BLOCK_AXIS, **_block_ticks(n, narrow=True))
    fig.update_yaxes(title=BLOCK_AXIS, autorange="reversed", **_block_ticks(n, narrow=True))
    return _base(fig, "Similarity of block outputs (dark = alike)", 460)


@failsafe
def slot_map(num_blocks: int, layer_map: Sequence[int], replaced_slots: Sequence[int] = (),
             title: str = "", *, sources: Sequence[int] | None = None,
             spans: Sequence[Sequence[int]] = (), span_label: str = "") -> go.Figure:
    """Base blocks (top row) and the new model's slots (bottom row), with an arrow from each donor.

    Args:
        num_blocks: depth of the base model.
        layer_map: the donor base block of every slot of the new model.
        replaced_slots: slots that run a donor's shared weights plus their own adapter.
        sources: FoldGPT plans only: the base block each slot stands for (its own pre-norms come
            from it). Slots that run another block's weights are then drawn as shared and every
            group of slots running the same weights is framed.
        spans: span methods only: ``(start, end)`` runs of base blocks replaced as one, framed on
            the top row and labelled ``span_label`` (e.g. "one linear map").
    """
    layer_map = [None if b is None else int(b) for b in layer_map]  # None: a FlexiGPT slot with no donor
    fold = sources is not None
    sources = [int(b) for b in sources] if fold else None
    replaced = ({s for s in range(len(layer_map)) if layer_map[s] != sources[s]} if fold
                else {int(s) for s in replaced_slots})
    used = {b for b in layer_map if b is not None}
    alone = {s for s, b in enumerate(layer_map) if b is None}
    present = set(sources) if fold else used
    n_slots = len(layer_map)
    fig = go.Figure()
    top_color = [COLORS["kept"] if b in used else (COLORS["muted"] if b in present else COLORS["dropped"])
                 for b in range(num_blocks)]
    donors_of = {}
    for s in replaced - alone:
        donors_of.setdefault(layer_map[s], []).append(s)

    def top_state(b: int) -> str:
        if b in used:
            return "kept"
        if b in present:
            return "weights not stored; its slot keeps only its own pre-norms"
        return "dropped, weights not stored"

    top_hover = [f"base block {b} (0-based): " + top_state(b)
                 + (f"<br>donor for slot(s) {', '.join(map(str, sorted(donors_of[b])))}" if b in donors_of else "")
                 for b in range(num_blocks)]
    fig.add_trace(go.Bar(x=list(range(num_blocks)), y=[0.8] * num_blocks, base=[1.2] * num_blocks, marker_color=top_color,
                         text=[str(b) for b in range(num_blocks)], textposition="inside", hovertext=top_hover,
                         hoverinfo="text", width=0.85, showlegend=False, name="base"))
    bottom_color = [COLORS["accent"] if s in alone else COLORS["shared"] if s in replaced else (COLORS["extra"] if s >= num_blocks else COLORS["kept"])
                    for s in range(n_slots)]
    bottom_text = ["–" if s in alone else f"{layer_map[s]}" for s in range(n_slots)]
    if fold:
        bottom_hover = [f"slot {s} (0-based) stands for base block {sources[s]} (its own pre-norms) and runs block "
                        f"{layer_map[s]}'s weights" + (" (shared)" if s in replaced else "") for s in range(n_slots)]
    else:
        bottom_hover = [f"slot {s} (0-based) has no donor: it runs only its own rank-r factors of block {s}"
                        if s in alone else f"slot {s} (0-based) runs base block {layer_map[s]}"
                        + (" shared weights + its own adapter" if s in replaced else "") for s in range(n_slots)]
    fig.add_trace(go.Bar(x=list(range(n_slots)), y=[0.8] * n_slots, base=[0.0] * n_slots, marker_color=bottom_color,
                         text=bottom_text, textposition="inside", hovertext=bottom_hover, hoverinfo="text",
                         width=0.85, showlegend=False, name="slots"))
    for s in sorted(replaced - alone):
        fig.add_annotation(x=s, y=0.82, ax=layer_map[s], ay=1.18, xref="x", yref="y", axref="x", ayref="y",
                           showarrow=True, arrowhead=2, arrowwidth=1.5, arrowcolor=COLORS["shared"])
    groups = []
    if fold:
        for s, b in enumerate(layer_map):
            if groups and layer_map[groups[-1][-1]] == b:
                groups[-1].append(s)
            else:
                groups.append([s])
        for g in groups:
            if len(g) > 1:
                fig.add_shape(type="rect", x0=g[0] - 0.49, x1=g[-1] + 0.49, y0=-0.04, y1=0.84, xref="x", yref="y",
                              line=dict(color=COLORS["shared"], width=2, dash="dot"), fillcolor="rgba(0,0,0,0)")
    for start, end in spans:
        fig.add_shape(type="rect", x0=start - 0.49, x1=end - 0.51, y0=1.16, y1=2.04, xref="x", yref="y",
                      line=dict(color=COLORS["accent"], width=2, dash="dot"), fillcolor="rgba(0,0,0,0)")
        fig.add_annotation(x=(start + end - 1) / 2, y=2.04, text=f"blocks {start}-{end - 1} → {span_label or 'one'}",
                           showarrow=False, yanchor="bottom", font=dict(size=11, color=COLORS["accent"]))
    legend = [("kept block", COLORS["kept"]), ("dropped block", COLORS["dropped"]),
              ("slot sharing a donor's weights", COLORS["shared"])]
    if fold:
        legend.insert(1, ("block kept as a group member (own norms only)", COLORS["muted"]))
    for name, color in legend:
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color=color, name=name))
    if n_slots > num_blocks:
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color=COLORS["extra"], name="extra slot (extension)"))
    if alone:
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color=COLORS["accent"],
                             name="slot with no donor (own low-rank factors)"))
    width = max(num_blocks, n_slots)
    fig.update_xaxes(title="block id / slot id (0-based); the number in a slot is the base block it runs",
                     range=[-0.7, width - 0.3], **_block_ticks(width))
    fig.update_yaxes(tickmode="array", tickvals=[0.4, 1.6], ticktext=["new model<br>slots", "base model<br>blocks"],
                     range=[-0.08, 2.35 if spans else 2.1], showgrid=False, zeroline=False)
    depth = f"{n_slots} slots from {len(used)} stored blocks (base: {num_blocks})"
    if fold:
        depth += f"; {sum(len(g) > 1 for g in groups)} groups sharing weights (dotted frames)"
    fig = _base(fig, title or f"Resulting stack: {depth}", 300)
    fig.update_layout(uniformtext=dict(minsize=9, mode="show"))
    return fig


@failsafe
def loss_curve(steps: Sequence[int], losses: Sequence[float], title: str = "") -> go.Figure:
    """Recovery loss per step (raw and a short running mean)."""
    if not steps:
        return message_figure("No recovery steps yet: press Recover to start.", "Recovery loss")
    fig = go.Figure(go.Scatter(x=list(steps), y=list(losses), mode="lines+markers", name="loss per step",
                               line=dict(color=COLORS["kept"]), marker=dict(size=5)))
    if len(losses) >= 5:
        k = max(3, len(losses) // 10)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        fig.add_trace(go.Scatter(x=list(steps), y=smooth, mode="lines", name=f"mean of last {k}",
                                 line=dict(color=COLORS["accent"], width=2)))
    fig.update_xaxes(title="training step", tickformat="d", dtick=max(1, len(steps) // 10) if len(steps) < 40 else None)
    fig.update_yaxes(title="loss (nats/token)")
    return _base(fig, title or f"Recovery loss ({len(steps)} steps)", 340)


@failsafe
def slot_fit_bars(before: Mapping[str, float], after: Mapping[str, float], title: str = "") -> go.Figure:
    """One bar pair per replaced slot: the share R^2 of its pruned block's residual update it reproduces,
    before and after fitting it alone (0 = a plain drop of the block, 1 = a perfect stand-in)."""
    if not after:
        return message_figure("No slots fitted yet: press Fit slots.", "Slot fit")
    slots = sorted(after, key=int)
    fig = go.Figure()
    if before:
        fig.add_trace(go.Bar(x=slots, y=[before.get(s) for s in slots], name="before fitting",
                             marker_color=COLORS["dropped"], hovertemplate="slot %{x}: R² %{y:.3f}<extra>before</extra>"))
    fig.add_trace(go.Bar(x=slots, y=[after[s] for s in slots], name="after fitting", marker_color=COLORS["shared"],
                         hovertemplate="slot %{x}: R² %{y:.3f}<extra>after</extra>"))
    fig.add_hline(y=0, line=dict(color="#444", width=1))
    fig.update_xaxes(title="replaced slot = pruned block id (0-based)", type="category")
    fig.update_yaxes(title="R² of the block's update (0 = drop, 1 = exact)", range=[min(0.0, *after.values(), *(before or {0: 0}).values()) - 0.05, 1.0])
    fig.update_layout(barmode="group")
    return _base(fig, title or "How much of each pruned block each slot reproduces (on calibration text)", 340)


@failsafe
def compare_bars(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Perplexity before/after recovery and stored parameters for every model of this visit.

    Args:
        rows: dicts with ``name``, ``ppl_before``, ``ppl_after`` (None if not recovered),
            ``stored_params``; the first row is the original model (its perplexity is drawn as
            a dashed reference line).
    """
    if not rows:
        return message_figure("Build a model to compare it with the original.", "Comparison")
    names = [r["name"] for r in rows]
    before = [r.get("ppl_before") for r in rows]
    after = [r.get("ppl_after") for r in rows]
    values = [v for v in before + after if v]
    log_axis = bool(values) and max(values) / min(values) > 50  # thousands next to tens: log, else linear
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.12,
                        subplot_titles=["held-out perplexity (lower is better)", "stored parameters"])
    fmt = [None if v is None else f"{v:.1f}" for v in before]
    fig.add_trace(go.Bar(x=names, y=before, name="before recovery", marker_color=COLORS["dropped"], text=fmt,
                         textposition="outside",
                         hovertemplate="%{x}<br>perplexity before recovery %{y:.2f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=after, name="after recovery", marker_color=COLORS["kept"],
                         text=[None if v is None else f"{v:.1f}" for v in after], textposition="outside",
                         hovertemplate="%{x}<br>perplexity after recovery %{y:.2f}<extra></extra>"), row=1, col=1)
    if before[0]:
        fig.add_hline(y=before[0], line_dash="dash", line_color=COLORS["accent"], row=1, col=1,
                      annotation_text=f"original {before[0]:.1f}", annotation_position="top left")
    fig.add_trace(go.Bar(x=names, y=[r.get("stored_params") for r in rows], name="stored parameters",
                         marker_color=COLORS["muted"], showlegend=False,
                         text=[None if r.get("stored_params") is None else _fmt_params(r["stored_params"]) for r in rows],
                         textposition="outside", hovertemplate="%{x}<br>%{y:,} stored parameters<extra></extra>"),
                  row=1, col=2)
    fig.update_yaxes(type="log" if log_axis else "linear", title="perplexity" + (" (log scale)" if log_axis else ""),
                     row=1, col=1)
    if not log_axis and values:
        fig.update_yaxes(range=[0, max(values) * 1.18], row=1, col=1)
    stored = [r.get("stored_params") or 0 for r in rows]
    fig.update_yaxes(title="parameters", range=[0, max(stored) * 1.15 or 1], row=1, col=2)
    fig = _base(fig, "Original vs built models", 450)
    fig.update_layout(barmode="group", legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="left", x=0))
    return fig
