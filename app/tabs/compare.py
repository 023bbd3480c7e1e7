"""Tab 6: the original model and every build of this visit, side by side, with protocols."""
from __future__ import annotations

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app import figures, tables, text
from app.common import heavy, session_key, user_errors
from app.session import REGISTRY, work

SPEED_KEYS = ("tokens_per_s", "forward_s", "forward_ratio", "throughput_ratio")  # from evaluate.SpeedRow

def compare_rows(key: str) -> list[dict]:
    """Plain rows for ``tables.compare_table`` / ``figures.compare_bars``."""
    w = work(key)
    rows: list[dict] = []
    refs = {b.plan.base_model for b in w.builds.values()}
    for ref in sorted(refs):
        info = REGISTRY.info(ref)
        ppl = next((v for k, v in w.base_ppl.items() if k.startswith(f"{ref}|")), None)
        speed = w.base_speed.get(ref) or {}
        rows.append({"name": f"original ({ref})", "method": "original", "slots": info["num_blocks"],
                     "ppl_before": ppl[0] if ppl else None, "ppl_after": None, "steps": 0,
                     "stored_params": info["num_parameters"], "protocol": ppl[1] if ppl else None,
                     **{k: speed.get(k) for k in SPEED_KEYS},
                     "fidelity": getattr(w.base_fidelity.get(ref), "score", None)})
    for b in w.builds.values():
        rows.append({"name": b.name, "method": b.plan.method, "slots": b.plan.num_slots, "ppl_before": b.ppl_before,
                     "ppl_after": b.ppl_after, "steps": b.recovered_steps, "stored_params": b.params.get("stored"),
                     "protocol": b.protocol, **{k: (b.speed or {}).get(k) for k in SPEED_KEYS},
                     "fidelity": (b.fidelity or {}).get("score")})
    return rows


def on_refresh(token=None, request: gr.Request = None) -> tuple[pd.DataFrame, go.Figure]:
    rows = compare_rows(session_key(request))
    return tables.compare_table(rows), figures.compare_bars(rows)


@user_errors
def on_speed(request: gr.Request = None, progress=gr.Progress()):
    """Forward latency (128-token prompt) and greedy tokens/s of the original and every build,
    timed interleaved in eval mode (median of 5 rounds); returns the refreshed views."""
    from flexigpt import evaluate

    key = session_key(request)
    w = work(key)
    if not w.builds:
        raise ValueError("build a model first (tab 5)")
    progress(0.1, desc="timing the original and every build, interleaved (median of 5 rounds)")
    for ref in {b.plan.base_model for b in w.builds.values()}:
        loaded = REGISTRY.get(ref)
        mine = [b for b in w.builds.values() if b.plan.base_model == ref]
        models = {"original": loaded.model, **{b.name: b.model for b in mine}}
        report = evaluate.compare_speed(models, loaded.tokenizer, prompt_tokens=128, new_tokens=16, repeats=5)
        speeds = {row.name: {**{k: getattr(row, k) for k in SPEED_KEYS}, "protocol": report.protocol}
                  for row in report.rows}
        w.base_speed[ref] = speeds["original"]
        for b in mine:
            b.speed = speeds[b.name]
    return on_refresh(None, request)


def render(ctx) -> None:
    gr.Markdown(text.COMPARE_HELP)
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="compare-refresh")
        speed = gr.Button("Measure speed", elem_id="speed-btn")
    table = gr.Dataframe(interactive=False, elem_id="compare-table", wrap=True)
    fig = gr.Plot(label="comparison", elem_id="compare-plot")
    ctx.builds_token.change(on_refresh, [ctx.builds_token], [table, fig], queue=False)
    refresh.click(on_refresh, [ctx.builds_token], [table, fig], queue=False)
    speed.click(on_speed, None, [table, fig], api_name="speed", **heavy())
