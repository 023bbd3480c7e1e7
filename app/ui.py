"""``build_demo() -> gr.Blocks``: the explorer's layout, shared state and tab wiring.

Nothing heavy happens at import time or in ``build_demo``: models load on first use.
"""
from __future__ import annotations

import os

import gradio as gr

from app import limits, session, text
from app.common import CSS_PATH, session_key
from app.tabs import Context, build, chat, compare, export, model, plan, scores, share

TABS = (
    ("1 · Model & data", model),
    ("2 · Block scores", scores),
    ("3 · Share-base heatmap", share),
    ("4 · Plan", plan),
    ("5 · Build & recover", build),
    ("6 · Compare", compare),
    ("7 · Chat", chat),
    ("8 · Export", export),
)


def _on_unload(request: gr.Request) -> None:
    session.drop(session_key(request))


def limits_note(lim: limits.Limits) -> str:
    """One line telling visitors of a public server what they may use."""
    if not lim.public:
        return ""
    return (f"Public server: models {', '.join(lim.allowed_models)}; data {', '.join(lim.allowed_data)}; "
            f"up to {lim.builds_per_visitor} built models per visitor, {lim.recover_steps} recovery steps, "
            f"{lim.new_tokens} new tokens per reply; one model job runs at a time per {lim.heavy_jobs} slot(s), "
            f"others wait in the queue. Your work is private to this tab and freed "
            f"{lim.idle_seconds // 60} minutes after your last action.")


def build_demo() -> gr.Blocks:
    """Build the app (not launched, not queued: ``app.py`` does that with ``queue_options()``)."""
    lim = limits.current()
    session.start_sweeper()
    # public: Gradio's own copies of downloads are deleted after an hour (checked every 10 minutes)
    with gr.Blocks(title="FlexiGPT Studio", delete_cache=(600, 3600) if lim.public else None) as demo:
        gr.Markdown(text.INTRO, elem_id="intro")
        if lim.public:
            gr.Markdown(limits_note(lim), elem_id="limits-note")
        with gr.Accordion("Glossary: block, slot, donor, adapter, plan", open=False):
            gr.Markdown(text.GLOSSARY)
        ctx = Context(plan=gr.State(None), analysis_token=gr.State(""), builds_token=gr.State(0))
        with gr.Tabs():
            for i, (label, module) in enumerate(TABS):
                with gr.Tab(label, id=f"tab{i + 1}", elem_id=f"tab-{module.__name__.rsplit('.', 1)[-1]}"):
                    module.render(ctx)
        demo.unload(_on_unload)
    return demo


def queue_options() -> dict:
    """``queue()`` arguments: heavy handlers set their own shared limit (``app.common.heavy``);
    ``max_size`` bounds the waiting line in public mode (a visitor beyond it is told the queue is full)."""
    lim = limits.current()
    return {"default_concurrency_limit": lim.heavy_jobs, "max_size": lim.queue_size}


def launch_options() -> dict:
    """``launch()`` arguments: theme and css (Gradio 6 takes them at launch), host and port."""
    return {
        "server_name": os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        "theme": gr.themes.Soft(primary_hue="blue", secondary_hue="orange"),
        "css_paths": [CSS_PATH] if CSS_PATH.is_file() else None,
        # public: uploads beyond this never reach a handler (plan.json is tiny; there are no data uploads)
        "max_file_size": limits.current().upload_bytes if limits.current().public else None,
    }
