"""Tab 1: pick the base model and the calibration data; show what the model is made of."""
from __future__ import annotations

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app import figures, limits, tables, text
from app.common import fmt_params, heavy, session_key, user_errors
from app.session import REGISTRY, check_server_memory, work


def model_markdown(ref: str, info: dict, load_seconds: float | None = None) -> str:
    """A one-paragraph summary of the loaded model."""
    chat = "has a chat template" if info.get("chat_template") else "has **no** chat template (chat uses plain text)"
    took = f" Loaded in {load_seconds:.1f} s." if load_seconds is not None else ""
    return (f"**{ref}**: a {info['architecture']} with **{info['num_blocks']} blocks** (ids 0 to "
            f"{info['num_blocks'] - 1}), width {info['hidden_size']}, {fmt_params(info['num_parameters'])} "
            f"parameters ({fmt_params(info['block_parameters'])} per block); the tokenizer {chat}.{took}")


@user_errors
def on_load(model_ref: str, data_ref: str, request: gr.Request = None) -> tuple[str, pd.DataFrame, go.Figure]:
    """Load the base model (once per reference) and check the calibration data exists."""
    from flexigpt.data import load_text

    model_ref = limits.check_model_ref(model_ref)
    data_ref = limits.check_data_ref(data_ref)
    load_text(data_ref)  # a missing, empty or binary file fails here with a clear message
    fresh = not REGISTRY.loaded(model_ref)
    if fresh:
        check_server_memory()
    loaded = REGISTRY.get(model_ref)
    info = REGISTRY.info(model_ref)
    work(session_key(request))
    md = model_markdown(model_ref, info, loaded.load_seconds if fresh else None)
    md += f"\n\nCalibration data: **{data_ref}** (first 90 % of its tokens; the last 10 % are held out)."
    return md, tables.model_summary(info), figures.block_stack(info)


def render(ctx) -> None:
    gr.Markdown(text.MODEL_HELP)
    with gr.Row():
        model_ref = gr.Textbox("default", label="model (default, a local folder, or a cached hub id)",
                               elem_id="model-ref", scale=3)
        data_ref = gr.Textbox("default", label="calibration data (default, or a .txt / .jsonl path)",
                              elem_id="data-ref", scale=3)
        load = gr.Button("Load model", variant="primary", elem_id="load-btn", scale=1)
    summary = gr.Markdown("No model loaded yet: press **Load model** (the embedded model loads in a few seconds).",
                          elem_id="model-summary")
    with gr.Row():
        stack = gr.Plot(label="block stack", elem_id="stack-plot", scale=3)
        table = gr.Dataframe(label="model summary", interactive=False, elem_id="model-table", scale=2)
    ctx.components.update(model_ref=model_ref, data_ref=data_ref, model_summary=summary)
    load.click(on_load, [model_ref, data_ref], [summary, table, stack], api_name="load_model", **heavy())
