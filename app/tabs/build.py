"""Tab 5: build the plan (base untouched), preview its perplexity, recover with a live loss curve."""
from __future__ import annotations

import math
import time

import gradio as gr

from app import figures, limits, tables, text
from app.common import fmt_params, heavy, session_key, user_errors
from app.session import MB, REGISTRY, Build, admit_build, check_server_memory, own_bytes, work
from flexigpt.recover_spec import RecoverSpec, default_rates

PREVIEW_WINDOWS = 4
PREVIEW_SEQ_LEN = 128
CALIBRATION_WINDOWS = 32  # train windows the slot fits read (whitened init, fit slots)
# The recovery the benchmarks measure (bench/chat.py, bench/quality.py: 100 steps x batch 4 x 256 tokens). A
# shorter default answered almost nothing: 20 steps x batch 2 x 128 tokens gave 5 of 73 chat-fidelity prompts
# and 7 looping replies, against 20 and 2 (bench/RESULTS.md, "What a visitor gets").
RECOVER_STEPS = 100
SEQ_LENS = (64, 128, 256)
FIT_STEPS = 50  # the fit-slots box before a build is picked, and for a build `build` fits none (a chat model)
CHAT_RATES_0 = default_rates(True)  # the panel starts with the chat recipe's rates (the embedded model's)
OBJECTIVES = ("lm", "distill", "mix")
CHAT_PROMPTS_MAX = 512  # distillation prompts the app generates replies for at most (the library has 356)
TEXT = "text"
SOURCES = {"the text of tab 1 (train split)": TEXT, "chat: the original's own replies": "chat",
           "mixed: a fifth chat, the rest text": "mixed"}  # the share is flexigpt.pipeline.CHAT_SHARE


def recover_defaults(lim) -> tuple[int, int, int]:
    """``(steps, batch, tokens per window)`` the recover panel starts with: the recovery the benchmarks
    measure and `build --steps 100` runs (``RECOVER_STEPS`` x ``RecoverSpec``'s batch and window), within
    this server's limits."""
    spec = RecoverSpec()
    seq = max((n for n in SEQ_LENS if n <= min(spec.seq_len, lim.seq_len)), default=SEQ_LENS[0])
    return min(RECOVER_STEPS, lim.recover_steps), min(spec.batch_size, lim.recover_batch), seq


def recipe_note(chat_model: bool = True) -> str:
    """One sentence on the recipe the panel starts with for a chat (or a text) model, and why."""
    objective, source = default_recipe(chat_model)
    what = {"lm": "next-token loss", "distill": "distillation from the original model's predictions",
            "mix": "next-token loss plus distillation"}[objective]
    if not chat_model:
        rates = default_rates(False)
        return (f"Default for a model without a chat template: **{what}** on **{source}**: on the text it ended "
                "below the plain drop + LoRA at a matched budget in-domain and on another text (bench/RESULTS.md, "
                f"15.52 / 132.90 against 16.41 / 136.23 at lr {rates['lr']:g}, gate x{rates['gate_lr_scale']:g} and KL weight "
                f"{rates['kd_weight']:g}, the text recipe's rates, with 200 fit steps per slot first, as `build` runs them: "
                "press *Fit slots* before *Recover*).")
    return (f"Default: **{what}** on **{source}**: among the recipes we measured (bench/RESULTS.md) it answers "
            "the most chat questions (3.3x as many as training on the text alone: 20 of 73 against 6) while held-out perplexity "
            "stays within 10 % of it; pick *the text* when only perplexity on your text matters.")


def on_pick_build(name: str, request: gr.Request = None) -> tuple:
    """The recover panel's objective, data, note, fit steps, learning rate and gate multiplier follow the
    picked build's model: the chat recipe for a model with a chat template, the text recipe otherwise
    (``pipeline.default_recovery`` and ``default_rates``), and the fit steps `build` runs for it
    (``pipeline.default_fit_steps``; ``FIT_STEPS`` where it runs none). No change while nothing is picked."""
    from flexigpt.pipeline import default_fit_steps, default_rates

    b = work(session_key(request)).builds.get(name) if name else None
    if b is None:
        return (gr.update(),) * 6
    chat = bool(getattr(b.tokenizer, "chat_template", None))
    objective, source = default_recipe(chat)
    fit = default_fit_steps(b.plan, chat) or FIT_STEPS
    rates = default_rates(chat)
    return (gr.update(value=objective), gr.update(value=source), gr.update(value=recipe_note(chat)),
            gr.update(value=min(fit, limits.current().fit_steps)), gr.update(value=rates["lr"]),
            gr.update(value=rates["gate_lr_scale"]))


def default_recipe(chat_model: bool) -> tuple[str, str]:
    """``(objective, source label)`` the recover panel starts with: the recipe that won bench/chat.py
    for chat models, the one that won bench/quality.py on the text otherwise (see bench/RESULTS.md)."""
    from flexigpt.pipeline import default_recovery

    objective, data = default_recovery(chat_model)
    return objective, next(k for k, v in SOURCES.items() if v == (data or TEXT))


def build_name(plan) -> str:
    """A short readable name: ``flexigpt 30% r8``, ``drop 30%``, ``extend +6`` (the method's own)."""
    return plan.method_spec.short_name(plan)


def preview_windows(tokenizer, data_ref: str):
    """The few held-out windows every quick perplexity in this app uses (same protocol for all)."""
    from flexigpt.data import token_windows

    return token_windows(tokenizer, limits.check_data_ref(data_ref), seq_len=PREVIEW_SEQ_LEN,
                         split="heldout", max_windows=PREVIEW_WINDOWS)


def quick_ppl(model, windows) -> tuple[float, dict]:
    from flexigpt import evaluate

    result = evaluate.perplexity(model, windows)
    return float(result.ppl), dict(result.protocol or windows.protocol())


def base_ppl(key: str, model_ref: str, data_ref: str) -> tuple[float, dict]:
    """The original model's preview perplexity, measured once per visit and data."""
    w = work(key)
    cache_key = f"{model_ref}|{data_ref}"
    if cache_key not in w.base_ppl:
        loaded = REGISTRY.get(model_ref)
        w.base_ppl[cache_key] = quick_ppl(loaded.model, preview_windows(loaded.tokenizer, data_ref))
    return w.base_ppl[cache_key]


def _build_one(key: str, plan, data_ref: str) -> Build:
    """Build one plan and keep it for the visitor, if the limits allow it (checked again with the
    build's real size: the bytes its own tensors take beyond the shared base weights)."""
    from flexigpt import pipeline
    from flexigpt.params import measure_params

    name = build_name(plan)
    admit_build(key, [name])
    loaded = REGISTRY.get(plan.base_model)
    calibration = None
    if pipeline.needs_calibration(plan):  # whitened slot init, a span method's fit
        calibration = calibration_windows(loaded, data_ref)
    report: dict = {}
    model = pipeline.build(loaded.model, plan, calibration=calibration, report=report)
    size = own_bytes(model, loaded.model)
    admit_build(key, [name], size)
    ppl, protocol = quick_ppl(model, preview_windows(loaded.tokenizer, data_ref))
    b = Build(name=name, plan=plan, model=model, tokenizer=loaded.tokenizer, ppl_before=ppl,
              protocol=protocol, params=measure_params(model).to_dict(), own_bytes=size, fit=report or None)
    work(key).builds[b.name] = b
    return b


def chat_prompts(source: str, windows: int, seq_len: int) -> int:
    """Distillation prompts to answer for ``windows`` windows of ``source`` (``chat`` or ``mixed``,
    whose chat share is ``CHAT_SHARE``): about one conversation per 40 chat tokens, in batches of 64,
    so a short run generates few replies (the whole set, 356, from about 80 chat windows of 256)."""
    from flexigpt.pipeline import CHAT_SHARE

    chat_windows = windows if source == "chat" else math.ceil(windows * CHAT_SHARE)
    return min(CHAT_PROMPTS_MAX, 64 * max(1, math.ceil(chat_windows * seq_len / (40 * 64))))


def calibration_source(tokenizer, data_ref: str) -> str:
    """What a build's slots calibrate on: the recovery data of the model's default recipe (``mixed`` for
    a chat model), else the text ``data_ref``."""
    from flexigpt.pipeline import default_recovery
    from flexigpt.recovery_data import has_chat_template

    return default_recovery(has_chat_template(tokenizer))[1] or data_ref


def calibration_windows(loaded, data_ref: str):
    """The windows a build's slots calibrate on (whitened init, fit slots), as `build --steps N` reads
    them: ``CALIBRATION_WINDOWS`` windows of ``RunOptions``' length from the recovery data the model's
    recipe uses (a fifth chat for a chat model, its replies to the first ``chat_prompts`` distillation
    prompts, where `build` reads all of them; the text of tab 1 otherwise). Measured on the chat model
    (bench/chat.py, 100 steps): slots calibrated on the text alone gave 13 looping replies of 73, on
    the mixed data 2."""
    from flexigpt.pipeline import CHAT_SHARE, RunOptions
    from flexigpt.recovery_data import recovery_windows

    data_ref = limits.check_data_ref(data_ref)
    source = calibration_source(loaded.tokenizer, data_ref)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or None
    build_seq_len = RunOptions(out="").seq_len
    seq_len = min(build_seq_len, limits.current().seq_len, context or build_seq_len)
    return recovery_windows(loaded.model, loaded.tokenizer, source, text=data_ref, seq_len=seq_len,
                            max_windows=CALIBRATION_WINDOWS, max_len=context, fraction=CHAT_SHARE,
                            prompts=chat_prompts(source, CALIBRATION_WINDOWS, seq_len) if source != data_ref else None)


def _fit_summary(report: dict | None) -> str:
    """One sentence on what the build fitted to the original model (span methods), or nothing."""
    spans = (report or {}).get("spans") or []
    parts = []
    for f in spans:
        s, e = f["span"]
        if "error_vs_drop" in f:
            parts.append(f"blocks {s}-{e - 1}: linear map error {f['error_vs_drop']:.2f} x a plain drop's")
        elif "r2" in f:
            parts.append(f"blocks {s}-{e - 1}: one block reproduces R² {f['r2']:.3f} of the span's output "
                         f"(plain drop {f['r2_drop']:.3f})")
    return (" Fitted on calibration text: " + "; ".join(parts) + ".") if parts else ""


@user_errors
def on_build(plan, data_ref: str, also_drop: bool, token: int, request: gr.Request = None, progress=gr.Progress()):
    """Build the plan (and the plain-drop baseline of the same blocks); returns
    (status, build choices update, builds token)."""
    from flexigpt.pipeline import needs_calibration

    if plan is None:
        raise ValueError("there is no plan yet: set one in tab 4 first")
    key = session_key(request)
    data_ref = limits.check_data_ref(data_ref)
    start = time.perf_counter()
    check_server_memory()
    progress(0.05, desc="measuring the original model")
    ppl0, protocol = base_ppl(key, plan.base_model, data_ref)
    todo = [plan]
    if also_drop and plan.method != "drop" and plan.method_spec.editable and plan.pruned_blocks:
        from flexigpt.pipeline import drop_baseline  # the baseline at the plan's whole trainable budget

        todo.append(drop_baseline(plan, REGISTRY.get(plan.base_model).model))
    admit_build(key, [build_name(p) for p in todo])  # the count limits, before any work
    lines = [f"Original: perplexity **{ppl0:.2f}**."]
    built = []
    for i, p in enumerate(todo):
        chat_calibration = (needs_calibration(p)
                            and calibration_source(REGISTRY.get(p.base_model).tokenizer, data_ref) != data_ref)
        progress(0.2 + 0.7 * i / len(todo), desc=f"building {build_name(p)}" + (
            " (its slots calibrate on a fifth chat: on a fresh server the original model first writes 64 chat "
            "replies, a minute or two on 2 cores, once)" if chat_calibration else ""))
        b = _build_one(key, p, data_ref)
        built.append(b.name)
        lines.append(f"**{b.name}**: {p.num_slots} slots, {fmt_params(b.params.get('stored'))} stored parameters; "
                     f"{b.own_bytes / MB:.1f} MB of its own tensors; "
                     f"quick preview perplexity before recovery **{b.ppl_before:.2f}**.{_fit_summary(b.fit)}")
    lines.append(f"Preview protocol: {tables.protocol_text(protocol)}. Built in {time.perf_counter() - start:.1f} s.")
    names = list(work(key).builds)
    return "\n\n".join(lines), gr.update(choices=names, value=built[0]), int(token or 0) + 1


@user_errors
def on_recover(name: str, steps: int, batch: int, seq_len: int, lr: float, data_ref: str, token: int,
               request: gr.Request = None, gate_lr_scale: float | None = None, objective: str | None = None,
               source: str | None = None):
    """Generator: train the build's adapters, yielding (loss figure, status, builds token) per step.
    ``objective`` (``lm``/``distill``/``mix``) and ``source`` (a ``SOURCES`` label) default to the
    recipe the app recommends for the model (``default_recipe``)."""
    from flexigpt.pipeline import CHAT_LOSS, CHAT_SHARE, default_rates, recover_model
    from flexigpt.recover import RecoverSpec
    from flexigpt.recovery_data import recovery_windows

    key = session_key(request)
    w = work(key)
    if not name or name not in w.builds:
        raise ValueError(f"build {name!r} not found; build a model first (available: {sorted(w.builds)})")
    lim = limits.current()
    steps = limits.check_int("recovery steps", steps, 1, lim.recover_steps)
    batch = limits.check_int("batch (windows)", batch, 1, lim.recover_batch)
    seq_len = limits.check_int("tokens per window", seq_len, 2, lim.seq_len)
    lr = limits.check_float("learning rate", lr, 1e-8, 1.0)
    gates = {} if gate_lr_scale is None else {
        "gate_lr_scale": limits.check_float("gate learning-rate multiplier", gate_lr_scale, 0.01, 1000.0)}
    data_ref = limits.check_data_ref(data_ref, lim)
    check_server_memory(lim)
    b = w.builds[name]
    note = ""
    if b.plan.method == "drop":
        note = _attach_baseline_lora(b)
    chat = bool(getattr(b.tokenizer, "chat_template", None))
    default_objective, default_source = default_recipe(chat)
    objective = objective or default_objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    ref = SOURCES.get(source or default_source, source)
    if ref not in SOURCES.values():
        raise ValueError(f"recovery data must be one of {list(SOURCES)}, got {source!r}")
    ref = data_ref if ref == TEXT else ref
    # the rate the panel does not show (the logit KL's weight) is the model's recipe's, as in `build`
    spec = RecoverSpec(steps=steps, lr=float(lr), batch_size=batch, seq_len=seq_len, objective=objective,
                       kd_weight=default_rates(chat)["kd_weight"], **gates)
    context = getattr(b.model.config, "max_position_embeddings", None) or None
    if ref != data_ref:
        yield figures.loss_curve(b.steps, b.losses, name), ("Preparing the chat data (the original model's own "
                                                            "replies; generated once, then cached)…"), int(token or 0)
    needed = min(512, steps * batch)
    prompts = chat_prompts(ref, needed, seq_len)
    windows = recovery_windows(REGISTRY.get(b.plan.base_model).model, b.tokenizer, ref, text=data_ref,
                               seq_len=seq_len, max_windows=needed, max_len=context, prompts=prompts,
                               fraction=CHAT_SHARE, replies_only=CHAT_LOSS == "replies")
    note += f" Recipe: {objective} objective on {windows.data}."
    w.stop.clear()
    offset = b.steps[-1] if b.steps else 0
    token = int(token or 0)
    yield figures.loss_curve(b.steps, b.losses, name), f"Recovering **{name}**: starting…{note}", token
    last = None
    base = REGISTRY.get(b.plan.base_model).model
    for log in recover_model(b.model, base, windows, spec, should_stop=w.stop.is_set):
        last = log
        b.steps.append(offset + int(log.step))
        b.losses.append(float(log.loss))
        status = (f"Recovering **{name}**: step {log.step}/{steps}, loss {log.loss:.3f}, lr {log.lr:.2e}, "
                  f"{log.tokens_seen:,} tokens, {log.elapsed_s:.1f} s")
        yield figures.loss_curve(b.steps, b.losses, f"Recovery loss: {name}"), status, token
    b.model.eval()
    b.recovered_steps = b.steps[-1] if b.steps else 0
    ppl, _ = quick_ppl(b.model, preview_windows(b.tokenizer, data_ref))
    b.ppl_after = ppl
    done = "stopped" if w.stop.is_set() else "finished"
    took = f" in {last.elapsed_s:.1f} s" if last is not None else ""
    yield (figures.loss_curve(b.steps, b.losses, f"Recovery loss: {name}"),
           f"Recovery {done} after {b.recovered_steps} steps{took}. Preview perplexity: "
           f"{b.ppl_before:.2f} before → **{ppl:.2f}** after.{note}", token + 1)


@user_errors
def on_fit(name: str, fit_steps: int, data_ref: str, request: gr.Request = None, progress=gr.Progress()):
    """Fit every replaced slot of the build alone to its pruned block's output (before recovery);
    returns (R^2 figure, status)."""
    from flexigpt.slot_fit import fit_slots

    key = session_key(request)
    w = work(key)
    if not name or name not in w.builds:
        raise ValueError(f"build {name!r} not found; build a model first (available: {sorted(w.builds)})")
    lim = limits.current()
    fit_steps = limits.check_int("fit steps per slot", fit_steps, 1, lim.fit_steps)
    data_ref = limits.check_data_ref(data_ref, lim)
    b = w.builds[name]
    if not (b.plan.method == "flexigpt" and b.plan.replaced_slots):
        raise ValueError(f"{name!r} has no replacement slots to fit (method {b.plan.method!r}); "
                         "fitting applies to FlexiGPT builds")
    check_server_memory(lim)
    loaded = REGISTRY.get(b.plan.base_model)
    windows = calibration_windows(loaded, data_ref)
    progress(0.0, desc="caching the pruned blocks' inputs and outputs from the original model")

    def tick(slot: int, done: int, total: int) -> None:
        progress(done / max(total, 1), desc=f"fitting slot {slot} alone ({done}/{total} steps)")

    report = fit_slots(b.model, loaded.model, windows, steps=fit_steps, callback=tick)
    b.model.eval()
    b.fit = report.to_dict()
    before = {str(f.slot): f.r2_before for f in report.slots}
    after = {str(f.slot): f.r2_after for f in report.slots}
    ppl, _ = quick_ppl(b.model, preview_windows(b.tokenizer, data_ref))
    b.ppl_before = ppl
    mean = sum(after.values()) / len(after)
    return (figures.slot_fit_bars(before, after, f"Slot fit: {name}"),
            f"Fitted {len(after)} slots of **{name}** ({fit_steps} steps each, {report.seconds:.1f} s): mean R² "
            f"{sum(before.values()) / len(before):.3f} → **{mean:.3f}**. Preview perplexity now **{ppl:.2f}** "
            f"(before recovery).")


def recover_view(name, steps, batch, seq_len, lr, data_ref, token, gate_lr_scale, objective, source,
                 request: gr.Request = None):
    """``on_recover`` with the advanced row's settings (event inputs are positional)."""
    yield from on_recover(name, steps, batch, seq_len, lr, data_ref, token, request, gate_lr_scale, objective, source)


def _attach_baseline_lora(b: Build) -> str:
    """A plain drop has nothing to train; recovering it makes it the ShortGPT + LoRA baseline: LoRA on
    the kept blocks at the rank whose trainable count matches the same blocks built as FlexiGPT."""
    from flexigpt.params import measure_params
    from flexigpt.pipeline import recipe
    from flexigpt.surgery import build_info
    from flexigpt.trainable import attach_kept_lora

    info = build_info(b.model)
    if info.kept_lora is None:
        loaded = REGISTRY.get(b.plan.base_model)
        attach_kept_lora(b.model, recipe(b.plan, loaded.model, recovering=True).kept_lora_rank)
        b.params = measure_params(b.model).to_dict()
    rank = build_info(b.model).kept_lora["rank"]
    return (f" (ShortGPT + LoRA baseline: LoRA rank {rank} on the {b.plan.num_slots} kept blocks, "
            f"{fmt_params(b.params.get('trainable'))} trainable parameters, matched to the FlexiGPT "
            f"build of the same blocks at adapter rank {b.plan.adapter.rank})")


def on_stop(request: gr.Request = None) -> str:
    """Ask the caller's own running recovery to end after its current step (the flag is per visitor)."""
    work(session_key(request)).stop.set()
    return "Stopping after the current step…"


def render(ctx) -> None:
    gr.Markdown(text.BUILD_HELP)
    with gr.Row():
        also_drop = gr.Checkbox(True, label="also build the plain drop of the same blocks (baseline)", elem_id="also-drop")
        build = gr.Button("Build", variant="primary", elem_id="build-btn")
    status = gr.Markdown("", elem_id="build-status")
    with gr.Row():
        name = gr.Dropdown([], label="model to recover", elem_id="recover-name")
        steps0, batch0, seq0 = recover_defaults(limits.current())
        steps = gr.Number(steps0, label="steps", precision=None, minimum=1, maximum=limits.current().recover_steps,
                          elem_id="recover-steps")
        batch = gr.Number(batch0, label="batch (windows)", precision=None, minimum=1, maximum=limits.current().recover_batch, elem_id="recover-batch")
        seq_len = gr.Dropdown(list(SEQ_LENS), value=seq0, label="tokens per window", elem_id="recover-seq")
        lr = gr.Number(CHAT_RATES_0["lr"], label="learning rate", elem_id="recover-lr")
    with gr.Accordion("advanced", open=False):
        with gr.Row():
            gate_lr = gr.Number(CHAT_RATES_0["gate_lr_scale"], label="gate learning-rate multiplier (output-norm scales, "
                                "norms, biases; no weight decay)", minimum=0.01, maximum=1000, elem_id="recover-gate-lr")
            objective0, source0 = default_recipe(True)
            objective = gr.Dropdown(list(OBJECTIVES), value=objective0, elem_id="recover-objective",
                                    label="objective (lm: next-token loss; distill: match the original's "
                                          "predictions; mix: both)")
            source = gr.Dropdown(list(SOURCES), value=source0, label="recovery data", elem_id="recover-source")
        note = gr.Markdown(recipe_note(), elem_id="recover-recipe")
    with gr.Row():
        fit_steps = gr.Number(FIT_STEPS, label="fit steps per slot", precision=0, minimum=1,
                              maximum=limits.current().fit_steps, elem_id="fit-steps")
        fit_btn = gr.Button("Fit slots", elem_id="fit-btn")
        recover_btn = gr.Button("Recover", variant="primary", elem_id="recover-btn")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
    rec_status = gr.Markdown("", elem_id="recover-status")
    fit_status = gr.Markdown("", elem_id="fit-status")
    fit_plot = gr.Plot(label="slot fit (R² per slot)", elem_id="fit-plot")
    curve = gr.Plot(label="recovery loss", elem_id="loss-plot")
    data = ctx["data_ref"]
    build.click(on_build, [ctx.plan, data, also_drop, ctx.builds_token], [status, name, ctx.builds_token],
                api_name="build", **heavy())
    name.change(on_pick_build, [name], [objective, source, note, fit_steps, lr, gate_lr], queue=False, show_progress="hidden",
                api_visibility="private")
    fit_btn.click(on_fit, [name, fit_steps, data], [fit_plot, fit_status], api_name="fit_slots", **heavy())
    recover_btn.click(recover_view, [name, steps, batch, seq_len, lr, data, ctx.builds_token, gate_lr, objective, source],
                      [curve, rec_status, ctx.builds_token], api_name="recover", **heavy())
    stop.click(on_stop, None, [rec_status], queue=False, api_name="stop")
