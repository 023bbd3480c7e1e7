"""Tab 7: the same message to the original and to a built model, both streaming side by side."""
from __future__ import annotations

import queue
import threading
import time

import gradio as gr

from app import limits, text
from app.common import heavy, session_key, user_errors
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


# Shown in place of an empty reply (a model that ends its turn at once, as a briefly recovered build may),
# so the bubble is not blank; plain_messages turns it back into "" before the history reaches a model.
EMPTY_REPLY = "(no reply: the model ended its turn at once)"


def plain_messages(history, max_chars: int | None = None) -> list[dict]:
    """The chat history a client sent back, checked: only user/assistant turns of text, control
    characters removed, at most ``max_chars`` characters in all (ValueError beyond)."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"chat history must be a list of messages, got {type(history).__name__}")
    out = []
    for i, m in enumerate(history):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ValueError(f"chat history message {i} must have role 'user' or 'assistant', got {str(m)[:80]!r}")
        content, _ = limits.clean_text(plain_text(m.get("content")), 10**9)
        if m["role"] == "assistant" and content == EMPTY_REPLY:
            content = ""  # the marker the tab shows for an empty reply is not what the model said
        out.append({"role": m["role"], "content": content})
    total = sum(len(m["content"]) for m in out)
    if max_chars is not None and total > max_chars:
        raise ValueError(f"the conversation holds {total:,} characters; the limit on this server is {max_chars:,}: "
                         "press Clear to start a new one")
    return out


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
        raise ValueError(f"build {str(name)[:80]!r} not found among your builds; build a model in tab 5 first")
    return b.model, b.tokenizer


SPECULATIVE_INFO = ("the same replies as greedy decoding, for both models: each drafts with some of its own "
                    "sub-layers skipped (chosen by measured speed) and checks the draft in one pass")
SPECULATIVE_OFF = "needs temperature 0 (greedy): speculative decoding here is exact only for greedy replies"


def speculative_reply_stream(model, tokenizer, messages, max_new_tokens: int, stats: dict):
    """One self-speculative greedy reply as a one-item stream; its statistics go into ``stats``."""
    from flexigpt.speculative import speculative_reply

    text, result = speculative_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens)
    stats.update(drafted=result.drafted, accepted=result.accepted, rate=result.acceptance_rate,
                 calls=result.target_calls, tokens=result.new_tokens, seconds=result.seconds)
    yield text


def speculative_status(stats: dict, who: str = "the built model") -> str:
    """The line under the reply: acceptance rate and timing of a speculative reply."""
    if not stats:
        return ""
    tps = stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    return (f" Speculative decoding of {who}: {stats['accepted']} of {stats['drafted']} drafted tokens "
            f"accepted (**{100 * stats['rate']:.0f} %**); {stats['tokens']} tokens from {stats['calls']} full-model "
            f"passes in {stats['seconds']:.2f} s ({tps:.1f} tokens/s); the reply equals plain greedy decoding.")


def on_temperature(temperature) -> dict:
    """Speculative decoding is offered for greedy replies only."""
    try:
        greedy = float(temperature) <= 0
    except (TypeError, ValueError):
        greedy = False
    if greedy:
        return gr.update(interactive=True, info=SPECULATIVE_INFO)
    return gr.update(value=False, interactive=False, info=SPECULATIVE_OFF)


@user_errors
def on_chat(message: str, build: str, left: list, right: list, max_new_tokens: int, temperature: float,
            top_p: float, model_ref: str, request: gr.Request = None, speculative: bool = False):
    """Generator: stream both replies, alternating one chunk of each; yields (left, right, box, status).

    With ``speculative``, the built model's greedy reply is decoded self-speculatively (it arrives
    whole) and the status line reports the acceptance rate and timing.
    """
    from flexigpt.chat import neutralise, stream_reply

    lim = limits.current()
    message, notes = limits.clean_text(message, lim.chat_chars)
    message = message.strip()
    if not message:
        raise ValueError("type a message first" + (f" (your input had only {notes[0]})" if notes else ""))
    key = session_key(request)
    if not build or not isinstance(build, str):
        raise ValueError("pick a built model to talk to (build one in tab 5)")
    base_model, tok = _model_for(key, ORIGINAL, limits.check_model_ref(model_ref, lim))
    built_model, built_tok = _model_for(key, build, model_ref)
    settings = dict(max_new_tokens=limits.check_int("max new tokens", max_new_tokens, 1, lim.new_tokens),
                    temperature=limits.check_float("temperature", temperature, 0.0, 2.0),
                    top_p=limits.check_float("top-p", top_p, 0.01, 1.0), seed=0)
    if speculative and settings["temperature"] > 0:
        raise ValueError(f"speculative decoding is exact only for greedy replies: set the temperature to 0 "
                         f"(it is {settings['temperature']}) or switch speculative decoding off")
    if neutralise(message, tok) != message:
        notes.append("special-token text (like <|im_start|>) is shown to the models as plain text, not as a "
                     "control token")
    if notes:
        gr.Warning("Your message was changed: " + "; ".join(notes) + ".")
    left = plain_messages(left, lim.history_chars) + [{"role": "user", "content": message}]
    right = plain_messages(right, lim.history_chars) + [{"role": "user", "content": message}]
    stats: dict = {}
    base_stats: dict = {}
    built_stream = (speculative_reply_stream(built_model, built_tok, list(right), settings["max_new_tokens"], stats)
                    if speculative else stream_reply(built_model, built_tok, list(right), **settings))
    # the original drafts for itself too (skipped sub-layers chosen by measured speed), where the runner supports it
    from flexigpt.runner import runner_support

    base_speculative = speculative and runner_support(base_model) is None
    base_stream = (speculative_reply_stream(base_model, tok, list(left), settings["max_new_tokens"], base_stats)
                   if base_speculative else stream_reply(base_model, tok, list(left), **settings))
    streams = [base_stream, built_stream]
    replies, first, start = ["", ""], [None, None], time.perf_counter()
    left.append({"role": "assistant", "content": ""})
    right.append({"role": "assistant", "content": ""})
    for i, chunk in merge_streams(streams):
        if first[i] is None:
            first[i] = time.perf_counter() - start
        replies[i] = chunk  # stream_reply yields the whole reply so far
        left[-1]["content"], right[-1]["content"] = replies
        yield left, right, "", "streaming…"
    for turn, text in ((left[-1], replies[0]), (right[-1], replies[1])):
        if not text.strip():
            turn["content"] = EMPTY_REPLY
    firsts = ", ".join(f"{n}: {'n/a (empty reply)' if f is None else f'{f:.1f} s'}"
                       for n, f in zip((ORIGINAL, build), first))
    note = f" Note: your message was changed: {'; '.join(notes)}." if notes else ""
    yield (left, right, "",
           f"First token after {firsts}; total {time.perf_counter() - start:.1f} s."
           f"{speculative_status(base_stats, 'the original')}{speculative_status(stats)}{note}")


FIDELITY_TOKENS = 48  # max new tokens per fidelity prompt (the library's default protocol)
FIDELITY_SHOWN = 12  # failing prompts listed at most


@user_errors
def on_fidelity(build: str, model_ref: str, request: gr.Request = None, progress=gr.Progress()) -> str:
    """Answer the built-in chat-fidelity prompts greedily with the original (once per visit) and the
    chosen build; returns both scores and the prompts the build fails where the original passes."""
    from flexigpt.fidelity import chat_fidelity

    key = session_key(request)
    w = work(key)
    if not build or build not in w.builds:
        raise ValueError(f"pick a built model first (tab 5); available: {sorted(w.builds) or 'none'}")
    b = w.builds[build]
    ref = b.plan.base_model
    loaded = REGISTRY.get(ref)

    def bar(start: float, span: float, what: str):
        return lambda done, total: progress(start + span * done / max(total, 1), desc=f"{what}: {done}/{total} prompts")

    if ref not in w.base_fidelity:  # the original's replies are also cached on disk across visits
        w.base_fidelity[ref] = chat_fidelity(loaded.model, loaded.tokenizer, max_new_tokens=FIDELITY_TOKENS,
                                             cache=True, callback=bar(0.0, 0.3, "original"))
    original = w.base_fidelity[ref]
    report = chat_fidelity(b.model, b.tokenizer, reference=original, max_new_tokens=FIDELITY_TOKENS,
                           callback=bar(0.3, 0.7, build))
    b.fidelity = report.to_dict(rows=False)
    lost = report.regressions(original)
    p = report.protocol
    lines = [f"**Chat fidelity** ({p['size']} built-in prompts with answer keys, greedy, up to {FIDELITY_TOKENS} "
             f"new tokens): original **{original.score:.2f}** ({original.passed}/{p['size']}), **{build}** "
             f"**{report.score:.2f}** ({report.passed}/{p['size']}); agreement with the original's first "
             f"{p['agreement_tokens']} reply tokens {report.agreement:.2f}; replies stuck in a loop: "
             f"{report.degenerate} (original {original.degenerate}).",
             "Answered per kind of prompt, this build against the original: "
             + ", ".join(f"{kind} {mine[0]}/{mine[1]} against {original.by_kind().get(kind, (0, 0))[0]}"
                         for kind, mine in report.by_kind().items()) + "."]
    if lost:
        lines.append(f"Prompts {build} fails and the original answers ({len(lost)}):")
        for mine, theirs in lost[:FIDELITY_SHOWN]:
            lines.append(f"- *{mine.prompt}* → {build}: “{_short(mine.reply)}”; original: “{_short(theirs.reply)}”")
        if len(lost) > FIDELITY_SHOWN:
            lines.append(f"- … and {len(lost) - FIDELITY_SHOWN} more.")
    else:
        lines.append("No prompt that the original answers is lost.")
    return "\n".join(lines)


def _short(reply: str, n: int = 90) -> str:
    one = " ".join(reply.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def on_builds(token=None, request: gr.Request = None):
    names = list(work(session_key(request)).builds)
    return gr.update(choices=names, value=names[0] if names else None)


def render(ctx) -> None:
    gr.Markdown(text.CHAT_HELP)
    with gr.Row():
        build = gr.Dropdown([], label="built model", elem_id="chat-build")
        max_new = gr.Slider(8, min(256, limits.current().new_tokens), value=64, step=8, label="max new tokens",
                            elem_id="chat-max")
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.1, label="temperature (0 = greedy)", elem_id="chat-temp")
        top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="top-p", elem_id="chat-top-p")
        speculative = gr.Checkbox(False, label="speculative decoding (exact, faster)", info=SPECULATIVE_INFO,
                                  elem_id="chat-speculative")
    with gr.Row():
        left = gr.Chatbot(label="original model", elem_id="chat-original", height=360)
        right = gr.Chatbot(label="built model", elem_id="chat-built", height=360)
    with gr.Row():
        box = gr.Textbox(placeholder="Ask both models the same thing…", show_label=False, scale=5, elem_id="chat-box")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    status = gr.Markdown("", elem_id="chat-status")
    with gr.Row():
        fidelity = gr.Button("Fidelity check", elem_id="fidelity-btn")
    fidelity_md = gr.Markdown("", elem_id="fidelity-status")
    fidelity.click(on_fidelity, [build, ctx["model_ref"]], [fidelity_md], api_name="fidelity", **heavy())
    inputs = [box, build, left, right, max_new, temperature, top_p, ctx["model_ref"], speculative]
    outputs = [left, right, box, status]
    send.click(on_chat, inputs, outputs, api_name="chat", **heavy())
    box.submit(on_chat, inputs, outputs, **heavy())
    clear.click(lambda: ([], [], ""), None, [left, right, status], queue=False)
    temperature.change(on_temperature, [temperature], [speculative], queue=False, show_progress="hidden")
    ctx.builds_token.change(on_builds, [ctx.builds_token], [build], queue=False, api_name="chat_builds")
