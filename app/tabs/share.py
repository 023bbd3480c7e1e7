"""Tab 3: the share-error heatmap (pruned candidates x kept blocks), per rank, metric and matrix.

The ``function`` metric (activation-aware: the error on the inputs each pruned block really
receives) adds a "no donor" column, the error of the block's own rank-r fit with no donor.
"""
from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go

from app import figures, text
from app.common import heavy, session_key, user_errors
from app.session import work
from app.share_figure import share_heatmap
from app.tabs.scores import analysis_token, run_analysis

METRICS = ("relative", "absolute", "paper", "function")
METRIC_CHOICES = [("relative", "relative"), ("absolute", "absolute"), ("paper", "paper"),
                  ("function (activation-aware)", "function")]
AGGREGATED = "all matrices (aggregated)"
RANK_CHOICES = (8, 32, 64)
PAIRS = {"pruned x kept blocks of the plan (fast)": "subset", "all block pairs (slow)": "all"}
LABELS = {"relative": "relative error (0 = perfect, 1.41 = unrelated)", "absolute": "absolute error (sum over matrices)",
          "paper": "paper-variant error",
          "function": "error on real inputs (0 = perfect; beat the 'no donor' column)"}


def share_matrix(analysis: dict, metric: str, rank: int | str, view: str = AGGREGATED):
    """The ``(L, L)`` matrix for a metric / rank / matrix view, or raise ValueError saying what exists."""
    se = analysis.get("share_error")
    if not se:
        raise ValueError("this analysis has no share error yet: press 'Compute share error'")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "function" and not se.get("function"):
        raise ValueError("this analysis has no function-space error: press 'Compute share error' again")
    rank = str(int(rank))
    if view and view != AGGREGATED:
        if metric == "paper":
            raise ValueError("the paper variant is only stored aggregated; pick 'relative' or 'absolute' per matrix")
        per = ((se.get("per_matrix") or {}).get(metric) or {}).get(rank) or {}
        if view not in per:
            raise ValueError(f"matrix {view!r} at rank {rank} not in this analysis; available: {sorted(per)}")
        return per[view]
    table = se.get(metric) or {}
    if rank not in table or table[rank] is None:
        raise ValueError(f"rank {rank} not computed for metric {metric!r}; available ranks: {sorted(table, key=int)}")
    return table[rank]


def no_donor_column(analysis: dict, metric: str, rank: int | str, view: str = AGGREGATED) -> list | None:
    """Per block: the error with no donor (``function`` metric only; None when not computed)."""
    nd = (analysis.get("share_error") or {}).get("no_donor") or {}
    if metric != "function" or not nd:
        return None
    rank = str(int(rank))
    if view and view != AGGREGATED:
        return ((nd.get("per_matrix") or {}).get(metric) or {}).get(rank, {}).get(view)
    return (nd.get(metric) or {}).get(rank)


def without_donor(donors: dict[int, int], matrix, no_donor) -> dict[int, int | None]:
    """``donors`` with ``None`` where the "no donor" error is not above the best donor's."""
    if not no_donor:
        return dict(donors)
    out: dict[int, int | None] = {}
    for i, j in donors.items():
        alone, best = no_donor[i] if i < len(no_donor) else None, matrix[i][j]
        out[i] = None if alone is not None and best is not None and alone <= best else j
    return out


def donors_for(analysis: dict, matrix, pruned) -> dict[int, int]:
    """Row minima over kept blocks (``flexigpt.sharing.choose_donors``) for the pruned set."""
    from flexigpt.sharing import choose_donors

    if not pruned:
        return {}
    clean = [[float("nan") if v is None else float(v) for v in row] for row in matrix]
    return choose_donors(clean, pruned)


def on_share_view(metric: str, rank, view: str, plan=None, request: gr.Request = None) -> tuple[go.Figure, str]:
    """Draw the heatmap for the stored analysis; marks donors for the plan's pruned blocks
    (or the analysis' own suggestion when there is no plan)."""
    analysis = work(session_key(request)).analysis
    if analysis is None:
        return figures.message_figure("Score the blocks first (tab 2), then compute the share error."), ""
    if not analysis.get("share_error"):
        return figures.message_figure("Press 'Compute share error' to fill this heatmap."), ""
    try:
        matrix = share_matrix(analysis, metric, rank, view)
    except ValueError as err:
        return figures.message_figure(str(err)), ""
    se = analysis["share_error"]
    suggestion = analysis.get("donor_suggestion") or {}
    pruned = list(plan.pruned_blocks) if plan is not None and getattr(plan, "method", "") == "flexigpt" \
        else list(suggestion.get("pruned") or [])
    no_donor = no_donor_column(analysis, metric, rank, view)
    donors = without_donor(donors_for(analysis, matrix, pruned), matrix, no_donor)
    rows = list(se.get("rows") or range(len(matrix)))
    cols = list(se.get("cols") or range(len(matrix)))
    if pruned:  # pruned candidates x kept blocks: the choice the plan actually faces
        rows = [r for r in rows if r in pruned] or rows
        cols = [c for c in cols if c not in pruned] or cols
    label = LABELS.get(metric, metric) if view == AGGREGATED else f"{metric} error of {view}"
    which = "all matrices" if view == AGGREGATED else view
    fig = share_heatmap(matrix, rows, cols, donors, label=label, colorbar=metric, no_donor=no_donor,
                        title=f"Share error at rank {rank} ({metric}, {which}); lower = better donor")
    from flexigpt.sharing import degeneracy_warning

    real = {b: d for b, d in donors.items() if d is not None}
    warn = degeneracy_warning(real) if real else None
    note = ", ".join(f"{b}←{'no donor' if d is None else d}" for b, d in sorted(donors.items())) or "none"
    md = f"Suggested donors (pruned block ← donor, 0-based): {note}."
    alone = sorted(b for b, d in donors.items() if d is None)
    if alone:
        md += (f"\n\nNo kept block beats **no donor** for block{'s' if len(alone) > 1 else ''} "
               f"{', '.join(map(str, alone))}: on real inputs a rank-{rank} fit of the block alone is closer.")
    if warn:
        md += f"\n\n⚠️ {warn}"
    return fig, md


def share_choices(analysis: dict | None) -> tuple[list, list]:
    """The rank and matrix choices present in an analysis."""
    se = (analysis or {}).get("share_error") or {}
    ranks = [int(r) for r in se.get("ranks") or []]
    return ranks, [AGGREGATED] + list(se.get("matrices") or [])


def on_refresh(metric: str, rank, view: str, plan=None, request: gr.Request = None):
    """After a new analysis: update the rank / matrix choices, then redraw."""
    analysis = work(session_key(request)).analysis
    ranks, views = share_choices(analysis)
    rank = rank if rank in ranks else (ranks[-1] if ranks else None)
    view = view if view in views else AGGREGATED
    fig, md = on_share_view(metric, rank, view, plan, request) if rank is not None else (
        figures.message_figure("Press 'Compute share error' to fill this heatmap (on 2 cores 10-15 s for the plan's pairs, about 15 s for all pairs; then cached on disk)."), "")
    return gr.update(choices=ranks, value=rank), gr.update(choices=views, value=view), fig, md


@user_errors
def on_compute(model_ref: str, data_ref: str, samples: int, seq_len: int, ranks: list, pairs: str, plan=None,
               request: gr.Request = None, progress=gr.Progress()) -> tuple[str, str]:
    """Compute the share-error matrices at the chosen ranks; returns (status, analysis token).

    ``pairs`` is ``subset`` (the plan's pruned blocks x the kept ones: fast) or ``all``.
    """
    if not isinstance(ranks, (list, tuple, type(None))) or len(ranks or ()) > len(RANK_CHOICES):
        raise ValueError(f"pick up to {len(RANK_CHOICES)} ranks from {list(RANK_CHOICES)}, got {ranks!r:.100}")
    ranks = tuple(sorted({int(r) for r in (ranks or [])}))
    if not ranks:
        raise ValueError("pick at least one rank, e.g. 8 or 32")
    pairs = PAIRS.get(pairs, pairs)
    if pairs not in ("subset", "all"):
        raise ValueError(f"pairs must be 'subset' or 'all', got {pairs!r}")
    pruned = tuple(plan.pruned_blocks) if pairs == "subset" and plan is not None and plan.pruned_blocks else None
    analysis, seconds, kept = run_analysis(model_ref, data_ref, samples=samples, seq_len=int(seq_len), ranks=ranks,
                                           pairs=pairs, pruned=pruned, progress=progress, key=session_key(request))
    where = "kept from this visit" if kept else ("from the disk cache" if analysis.get("cached") else "computed")
    return f"Share error at ranks {list(ranks)} {where} in {seconds:.1f} s.", analysis_token(analysis)


def render(ctx) -> None:
    gr.Markdown(text.SHARE_HELP)
    with gr.Row():
        ranks = gr.CheckboxGroup(list(RANK_CHOICES), value=[8], label="ranks to compute", elem_id="share-ranks")
        pairs = gr.Radio(list(PAIRS), value=list(PAIRS)[0], label="pairs", elem_id="share-pairs")
        compute = gr.Button("Compute share error", variant="primary", elem_id="share-btn")
    status = gr.Markdown("", elem_id="share-status")
    with gr.Row():
        metric = gr.Radio(METRIC_CHOICES, value="function", label="metric", elem_id="share-metric")
        rank = gr.Dropdown([], label="rank r of the correction", elem_id="share-rank", allow_custom_value=True)
        view = gr.Dropdown([AGGREGATED], value=AGGREGATED, label="matrix", elem_id="share-view")
    fig = gr.Plot(label="share error", elem_id="share-plot")
    donors_md = gr.Markdown("", elem_id="share-donors")
    inputs = [metric, rank, view, ctx.plan]
    compute.click(on_compute, [ctx["model_ref"], ctx["data_ref"], ctx["samples"], ctx["seq_len"], ranks, pairs, ctx.plan],
                  [status, ctx.analysis_token], api_name="share_error", **heavy())
    ctx.analysis_token.change(on_refresh, inputs, [rank, view, fig, donors_md], queue=False)
    for comp in (metric, rank, view):
        comp.input(on_share_view, inputs, [fig, donors_md], queue=False)
