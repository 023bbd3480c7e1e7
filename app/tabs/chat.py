"""Tab 7: the same message to the original and to a built model, both streaming side by side."""
from __future__ import annotations

import queue
import threading
import time

import gradio as gr

from app import text
from app.common import GPU, session_key, user_errors
from app.session import REGISTRY, work

ORIGINAL = "original"


def plain_text(content) -> str:
    """Chatbot message content (a string, or Gradio 6's list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(plain_text(c) for c in content)
    return "" if content is None else str(content)


def plain_messages(history) -> list[dict]:
    return [{"role": m["role"], "content": plain_text(m["content"])} for m in (history or [])]


def merge_streams(streams):
    """Consume several iterators at once (one thread each, so both models start generating
    immediately) and yield ``(index, item)`` as items arrive. An error in any stream is re-raised."""
    out: queue.Queue = queue.Queue()
    done = object()

    def pump(i, it):
        try:
            for item in it:
                out.put((i, item))
            out.put((i, done))
        except BaseException as err:  # handed to the consumer, which re-raises it
            out.put((i, err))

    threads = [threading.Thread(target=pump, args=(i, it), daemon=True) for i, it in enumerate(streams)]
    for t in threads:
        t.start()
    alive = len(threads)
    while alive:
        i, item = out.get()
        if item is done:
            alive -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield i, item


def _model_for(key: str, name: str, model_ref: str):
    if name == ORIGINAL:
        loaded = REGISTRY.get(model_ref)
        return loaded.model, loaded.tokenizer
    b = work(key).builds.get(name)
    if b is None:
        raise ValueError(f"build {name!r} not found; build a model in tab 5 first")
    return b.model, b.tokenizer


@user_errors
def on_chat(message: str, build: str, left: list, right: list, max_new_tokens: int, temperature: float,
            top_p: float, model_ref: str, request: gr.Request = None):
    """Generator: stream both replies, alternating one chunk of each; yields (left, right, box, status)."""
    from flexigpt.chat import stream_reply

    message = (message or "").strip()
    if not message:
        raise ValueError("type a message first")
    key = session_key(request)
    if not build:
        raise ValueError("pick a built model to talk to (build one in tab 5)")
    base_model, tok = _model_for(key, ORIGINAL, (model_ref or "").strip() or "default")
    built_model, built_tok = _model_for(key, build, model_ref)
    settings = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p), seed=0)
    left = plain_messages(left) + [{"role": "user", "content": message}]
    right = plain_messages(right) + [{"role": "user", "content": message}]
    streams = [stream_reply(base_model, tok, list(left), **settings),
               stream_reply(built_model, built_tok, list(right), **settings)]
    replies, first, start = ["", ""], [None, None], time.perf_counter()
    left.append({"role": "assistant", "content": ""})
    right.append({"role": "assistant", "content": ""})
    for i, chunk in merge_streams(streams):
        if first[i] is None:
            first[i] = time.perf_counter() - start
        replies[i] = chunk  # stream_reply yields the whole reply so far
        left[-1]["content"], right[-1]["content"] = replies
        yield left, right, "", "streaming…"
    firsts = ", ".join(f"{n}: {'n/a' if f is None else f'{f:.1f} s'}" for n, f in zip((ORIGINAL, build), first))
    yield left, right, "", f"First token after {firsts}; total {time.perf_counter() - start:.1f} s."


def on_builds(token=None, request: gr.Request = None):
    names = list(work(session_key(request)).builds)
    return gr.update(choices=names, value=names[0] if names else None)


def render(ctx) -> None:
    gr.Markdown(text.CHAT_HELP)
    with gr.Row():
        build = gr.Dropdown([], label="built model", elem_id="chat-build")
        max_new = gr.Slider(8, 256, value=64, step=8, label="max new tokens", elem_id="chat-max")
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.1, label="temperature (0 = greedy)", elem_id="chat-temp")
        top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="top-p", elem_id="chat-top-p")
    with gr.Row():
        left = gr.Chatbot(label="original model", elem_id="chat-original", height=360)
        right = gr.Chatbot(label="built model", elem_id="chat-built", height=360)
    with gr.Row():
        box = gr.Textbox(placeholder="Ask both models the same thing…", show_label=False, scale=5, elem_id="chat-box")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    status = gr.Markdown("", elem_id="chat-status")
    inputs = [box, build, left, right, max_new, temperature, top_p, ctx["model_ref"]]
    outputs = [left, right, box, status]
    send.click(on_chat, inputs, outputs, concurrency_id=GPU)
    box.submit(on_chat, inputs, outputs, concurrency_id=GPU)
    clear.click(lambda: ([], [], ""), None, [left, right, status], queue=False)
    ctx.builds_token.change(on_builds, [ctx.builds_token], [build], queue=False)
