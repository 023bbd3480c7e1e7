"""Tab 2: Block Influence and the other per-block scores, the angular-distance triangle and the
block-similarity heatmap, each with a short explanation."""
from __future__ import annotations

import time

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app import figures, limits, tables, text
from app.common import heavy, session_key, user_errors
from app.session import REGISTRY, work

SEQ_LENS = (64, 128, 256)


def analysis_token(analysis: dict) -> str:
    """A short key that changes whenever a new analysis result is stored."""
    se = analysis.get("share_error") or {}
    return (f"{analysis.get('model')}|{analysis.get('fingerprint')}|{analysis.get('data')}|{analysis.get('samples')}|"
            f"{analysis.get('seq_len')}|{se.get('ranks')}|{time.monotonic():.3f}")


def run_analysis(model_ref: str, data_ref: str, *, samples: int, seq_len: int, ranks: tuple[int, ...] = (),
                 ppl_drop: bool = False, pairs: str = "subset", pruned: tuple[int, ...] | None = None, progress=None,
                 key: str = "local") -> tuple[dict, float, bool]:
    """Run (or fetch from the session / the engine's disk cache) the analysis of a model.

    Scores come first and alone (``ranks=()``: no share error), so they show within seconds;
    the share error (``ranks``) is a second, slower request from the Share tab.

    Returns:
        ``(analysis_dict, seconds, from_session)``.
    """
    from flexigpt.analysis import analyze

    lim = limits.current()
    model_ref = limits.check_model_ref(model_ref, lim)
    data_ref = limits.check_data_ref(data_ref, lim)
    seq_len = limits.check_int("tokens per window", seq_len, 2, lim.seq_len)
    if seq_len not in SEQ_LENS:
        raise ValueError(f"sequence length must be one of {SEQ_LENS}, got {seq_len!r}")
    samples = limits.check_int("calibration windows", samples, 1, lim.score_windows)
    ranks = tuple(limits.check_int("rank", r, 1, 1024) for r in ranks)
    w = work(key)
    want = (model_ref, data_ref, samples, int(seq_len), tuple(sorted(ranks)), bool(ppl_drop),
            (pairs, tuple(pruned or ())) if ranks else None)
    start = time.perf_counter()
    if w.analysis is not None and w.analysis_key is not None:
        have = w.analysis_key
        # a richer stored result (more ranks, ppl-drop) also answers a poorer request
        if (have[:4] == want[:4] and set(want[4]) <= set(have[4]) and (have[5] or not want[5])
                and (not want[4] or have[6] == want[6])):
            return w.analysis, time.perf_counter() - start, True
    from app.session import check_server_memory

    check_server_memory(lim)
    loaded = REGISTRY.get(model_ref)

    def report(fraction: float, message: str = "") -> None:
        if progress is not None:
            progress(max(0.0, min(1.0, float(fraction))), desc=message or "analysing")

    share = bool(ranks)
    result = analyze(loaded.model, loaded.tokenizer, model_ref=model_ref, data=data_ref, samples=samples,
                     seq_len=int(seq_len), ranks=tuple(ranks) if share else (8,), ppl_drop=bool(ppl_drop),
                     share=share, pairs=pairs, pruned=list(pruned) if pruned else None, progress=report)
    analysis = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    w.analysis, w.analysis_key = analysis, want
    return analysis, time.perf_counter() - start, False


def score_views(analysis: dict, ratio: float = 0.3) -> tuple[go.Figure, pd.DataFrame, go.Figure, go.Figure]:
    """The tab's figures and table from an analysis dict; the ``ratio`` lowest-BI blocks are marked."""
    cols = tables.score_columns(analysis)
    bi = analysis["block_influence"]
    lowest = sorted(range(len(bi)), key=lambda i: bi[i])[: int(round(ratio * len(bi)))]
    bar = figures.scores_bar(cols, marked=lowest,
                             marked_label=f"the {len(lowest)} lowest-BI blocks (a {round(100 * ratio)} % plan)")
    ad = (analysis.get("angular_distance") or {}).get("values") or []
    tri = figures.angular_triangle(ad) if ad else figures.message_figure("No angular distances in this analysis.")
    sim = analysis.get("similarity")
    simfig = figures.similarity_heatmap(sim) if sim else figures.message_figure("No similarity in this analysis.")
    return bar, tables.scores_table(analysis), tri, simfig


def status_line(analysis: dict, seconds: float, from_session: bool) -> str:
    proto = tables.protocol_text(analysis.get("protocol"))
    where = ("kept from this visit" if from_session else
             "from the disk cache" if analysis.get("cached") else "computed")
    low = sorted(range(len(analysis["block_influence"])), key=lambda i: analysis["block_influence"][i])[:5]
    return (f"Scores {where} in {seconds:.1f} s on {proto}. Lowest Block Influence (most removable first): "
            f"blocks **{', '.join(map(str, low))}** (0-based).")


@user_errors
def on_score(model_ref: str, data_ref: str, samples: int, seq_len: int, ppl_drop: bool,
             request: gr.Request = None, progress=gr.Progress()):
    """Score every block; returns (status, bar figure, table, triangle, similarity, analysis token)."""
    analysis, seconds, kept = run_analysis(model_ref, data_ref, samples=samples, seq_len=int(seq_len),
                                           ppl_drop=ppl_drop, progress=progress, key=session_key(request))
    bar, table, tri, sim = score_views(analysis)
    return status_line(analysis, seconds, kept), bar, table, tri, sim, analysis_token(analysis)


@user_errors
def on_gates(steps: int, budget: float, request: gr.Request = None, progress=gr.Progress()):
    """Train FoldGPT block gates for a few steps on the calibration windows of the current scores;
    returns (status, bar figure, table, analysis token)."""
    from flexigpt.data import token_windows
    from flexigpt.gates import GateSpec, train_gates
    from flexigpt.surgery import structural_copy

    key = session_key(request)
    analysis = work(key).analysis
    if analysis is None:
        raise ValueError("no block scores yet: press 'Score blocks' first (the gates train on the same windows)")
    lim = limits.current()
    spec = GateSpec(ratio=limits.check_float("gate budget", budget, 0.0, 0.9),
                    steps=limits.check_int("gate steps", steps, 1, 200))
    from app.session import check_server_memory

    check_server_memory(lim)
    loaded = REGISTRY.get(str(analysis["model"]))
    windows = token_windows(loaded.tokenizer, str(analysis.get("data") or "default"), seq_len=int(analysis["seq_len"]),
                            split="train", max_windows=int(analysis["samples"]))
    # the gates hook a structural copy (own modules, the same tensors): the shared base stays untouched
    result = train_gates(structural_copy(loaded.model), windows.input_ids, spec,
                         progress=lambda f, msg: progress(f, desc=msg))
    analysis["foldgpt_gates"] = {"gates": result.gates, "steps": spec.steps, "ratio": spec.ratio,
                                 "losses": result.losses, "seconds": round(result.seconds, 2)}
    bar, table, _, _ = score_views(analysis)
    low = result.removal_order()[:5]
    status = (f"FoldGPT gates trained for {spec.steps} steps in {result.seconds:.1f} s on the same calibration windows "
              f"(loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}). Lowest gates (most removable first): blocks "
              f"**{', '.join(map(str, low))}** (0-based). The Plan tab's FoldGPT method now removes the lowest-gated blocks.")
    return status, bar, table, analysis_token(analysis)


def render(ctx) -> None:
    with gr.Row():
        samples = gr.Slider(4, min(64, limits.current().score_windows), value=16, step=4, label="calibration windows",
                            elem_id="samples")
        seq_len = gr.Dropdown(list(SEQ_LENS), value=128, label="tokens per window", elem_id="seq-len")
        ppl_drop = gr.Checkbox(False, label="also measure the loss increase when each block is removed (slower)",
                               elem_id="ppl-drop")
        score = gr.Button("Score blocks", variant="primary", elem_id="score-btn")
    status = gr.Markdown("Press **Score blocks** (loads the model first if needed).", elem_id="score-status")
    gr.Markdown(text.SCORES_HELP["bi"])
    bar = gr.Plot(label="per-block scores", elem_id="scores-plot")
    with gr.Accordion("Scores as a table", open=False):
        table = gr.Dataframe(interactive=False, elem_id="scores-table")
    with gr.Accordion("FoldGPT gate: a second score, trained (a few seconds per step)", open=False):
        gr.Markdown(text.SCORES_HELP["gates"])
        with gr.Row():
            gate_steps = gr.Slider(2, 60, value=10, step=1, label="gate training steps", elem_id="gate-steps")
            gate_budget = gr.Slider(0.1, 0.6, value=0.3, step=0.05, label="gate budget (share of blocks to switch off)",
                                    elem_id="gate-budget")
            gates = gr.Button("Train FoldGPT gates", elem_id="gates-btn")
    with gr.Row():
        with gr.Column():
            gr.Markdown(text.SCORES_HELP["angular"])
            tri = gr.Plot(label="angular distance", elem_id="angular-plot")
        with gr.Column():
            gr.Markdown(text.SCORES_HELP["similarity"])
            sim = gr.Plot(label="block similarity", elem_id="similarity-plot")
    ctx.components.update(score_status=status, scores_plot=bar, samples=samples, seq_len=seq_len)
    score.click(on_score, [ctx["model_ref"], ctx["data_ref"], samples, seq_len, ppl_drop],
                [status, bar, table, tri, sim, ctx.analysis_token], api_name="score", **heavy())
    gates.click(on_gates, [gate_steps, gate_budget], [status, bar, table, ctx.analysis_token], api_name="gates",
                **heavy())
