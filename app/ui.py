"""``build_demo() -> gr.Blocks``: the explorer's layout, shared state and tab wiring.

Nothing heavy happens at import time or in ``build_demo``: models load on first use.
"""
from __future__ import annotations

import os

import gradio as gr

from app import session, text
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


def build_demo() -> gr.Blocks:
    """Build the app (not launched, not queued: ``app.py`` does that)."""
    with gr.Blocks(title="FlexiGPT Studio") as demo:
        gr.Markdown(text.INTRO, elem_id="intro")
        with gr.Accordion("Glossary: block, slot, donor, adapter, plan", open=False):
            gr.Markdown(text.GLOSSARY)
        ctx = Context(plan=gr.State(None), analysis_token=gr.State(""), builds_token=gr.State(0))
        with gr.Tabs():
            for i, (label, module) in enumerate(TABS):
                with gr.Tab(label, id=f"tab{i + 1}", elem_id=f"tab-{module.__name__.rsplit('.', 1)[-1]}"):
                    module.render(ctx)
        demo.unload(_on_unload)
    return demo


def launch_options() -> dict:
    """``launch()`` arguments: theme and css (Gradio 6 takes them at launch), host and port."""
    return {
        "server_name": os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        "theme": gr.themes.Soft(primary_hue="blue", secondary_hue="orange"),
        "css_paths": [CSS_PATH] if CSS_PATH.is_file() else None,
    }
