"""Tab 4: the Plan. A ratio proposes it; per-block edits refine it; one renderer draws it.

Editors only produce a new Plan (into ``ctx.plan``); ``on_render`` is the only view of it
(one renderer, so no view can disagree with another). Every edit goes through the Plan's own validation, so a bad
edit is a ``ValueError`` with a clear message, shown as ``gr.Error``.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from app import figures, limits, tables, text
from app.common import PLANS_DIR, fmt_params, heavy, session_key, user_errors
from app.session import REGISTRY, work
from flexigpt.methods import methods as registered_methods

METHODS = {m.label: m.name for m in registered_methods()}  # menu label -> method name, from the registry
METHOD_LABEL = {v: k for k, v in METHODS.items()}
AUTO = "auto (suggested)"


def _analysis(key: str) -> dict:
    analysis = work(key).analysis
    if analysis is None:
        raise ValueError("no block scores yet: press 'Score blocks' in tab 2 first")
    return analysis


def _gates(analysis: dict) -> list[float] | None:
    """The FoldGPT gates trained in tab 2 for this analysis, if any."""
    gates = (analysis.get("foldgpt_gates") or {}).get("gates")
    return list(gates) if gates and len(gates) == analysis.get("num_blocks") else None


@user_errors
def on_propose(ratio: float, method_label: str, rank: int, request: gr.Request = None, group_size: int = 2,
               align: bool = False):
    """A fresh plan from the stored analysis: prune (or copy) the lowest-BI ``ratio`` of blocks;
    FoldGPT removes the lowest-gated blocks when gates were trained in tab 2."""
    from flexigpt.plan import AdapterSpec, foldgpt_plan, plan_from_analysis
    from flexigpt.plan.budget import analysis_budget

    analysis = _analysis(session_key(request))
    method = METHODS.get(method_label, method_label)
    ratio = limits.check_float("prune ratio", ratio, 0.0, 0.9)
    rank = limits.check_int("adapter rank", rank, 1, 4096)
    if method == "foldgpt":
        size = limits.check_int("group size", group_size, 1, 64)
        gates = _gates(analysis)
        if gates is not None:
            steps = (analysis.get("foldgpt_gates") or {}).get("steps")
            return foldgpt_plan(str(analysis["model"]), gates, ratio, size, adapter=AdapterSpec(rank=rank),
                                notes={"gates_steps": steps, "analysis_data": analysis.get("data")})
        return plan_from_analysis(analysis, ratio, method="foldgpt", adapter=AdapterSpec(rank=rank), group_size=size)
    # a text model's plan spends the slots' budget as `plan` does (a rank typed afterwards undoes it: on_rank)
    return analysis_budget(plan_from_analysis(analysis, ratio, method=method,
                                              adapter=AdapterSpec(rank=rank, align=bool(align))), analysis)


SLEB_WINDOWS, SLEB_SEQ_LEN = 8, 128  # calibration for iterative selection (enough to rank blocks)


@user_errors
def on_iterative(ratio: float, method_label: str, rank: int, request: gr.Request = None, group_size: int = 2,
                 align: bool = False, progress=gr.Progress()):
    """A fresh plan whose pruned blocks come from iterative selection (SLEB: remove the block whose
    removal raises calibration perplexity least, re-measure on the cut model, repeat); cached."""
    from flexigpt.data import token_windows
    from flexigpt.plan import AdapterSpec, plan_from_analysis
    from flexigpt.plan.budget import analysis_budget
    from flexigpt.selection import iterative_selection

    analysis = _analysis(session_key(request))
    method = METHODS.get(method_label, method_label)
    ratio = limits.check_float("prune ratio", ratio, 0.0, 0.9)
    rank = limits.check_int("adapter rank", rank, 1, 4096)
    L = int(analysis["num_blocks"])
    n = int(round(ratio * L))
    if n < 1:
        raise ValueError(f"ratio {ratio} prunes no block of {L}; move the ratio slider up first")
    loaded = REGISTRY.get(str(analysis["model"]))
    windows = token_windows(loaded.tokenizer, limits.check_data_ref(str(analysis.get("data") or "default")),
                            seq_len=SLEB_SEQ_LEN, split="train", max_windows=SLEB_WINDOWS)
    progress(0.0, desc=f"iterative selection of {n} blocks")
    result = iterative_selection(loaded.model, windows, n, callback=lambda f, m: progress(f, desc=m))
    return analysis_budget(plan_from_analysis(
        analysis, ratio, method=method, adapter=AdapterSpec(rank=rank, align=bool(align)),
        group_size=limits.check_int("group size", group_size, 1, 64), scores=result.scores(L),
        selection="iterative (SLEB)"), analysis)


def iterative_view(ratio: float, method_label: str, rank: int, group_size: int = 2, align: bool = False,
                   request: gr.Request = None, progress=gr.Progress()) -> tuple:
    return _views(on_iterative(ratio, method_label, rank, request, group_size, align, progress), request)


HAND_DONORS = "hand_donors"  # plan note: pruned blocks whose donor was picked by hand
NO_DONOR = "none"  # the donor menu's entry for a slot with no donor (its own low-rank factors only)
SPAN_LABELS = {"replaceme": "one linear map, folded into the block before", "streamline": "one trained block"}


def _hand_donors(plan) -> set[int]:
    noted = plan.note(HAND_DONORS) or ""
    return {int(b) for b in str(noted).split(",") if b.strip().isdigit()}


@user_errors
def on_analysis(plan, ratio: float, method_label: str, rank: int, request: gr.Request = None, group_size: int = 2,
                align: bool = False):
    """A new analysis (block scores or share error) arrived. Without a plan for this model, propose
    one; with one, keep the user's work: its pruned set, method and hand-picked donors stay, and
    only donors left on "auto" follow the new analysis' suggestion."""
    analysis = work(session_key(request)).analysis
    if (plan is None or analysis is None or str(analysis.get("model")) != plan.base_model
            or analysis.get("num_blocks") != plan.num_blocks):
        return on_propose.__wrapped__(ratio, method_label, rank, request, group_size, align)
    if not plan.method_spec.chooses_donors:
        return plan
    return _auto_donors(plan, analysis)


def _auto_donors(plan, analysis: dict):
    """``plan`` with every donor left on "auto" set as the analysis suggests (as a proposal would set
    it: no donor where it says so, or where it measured no share error; else its suggested donor);
    hand-picked donors stay."""
    from flexigpt.plan import suggested_donor, suggests_no_donor

    hand, new = _hand_donors(plan), plan
    for b in plan.pruned_blocks:
        if b in hand:
            continue
        if suggests_no_donor(analysis, new, b):
            new = new.with_donor(b, None) if new.layer_map[b] is not None else new
            continue
        d = suggested_donor(analysis, new, b)
        if d is not None and d != new.layer_map[b]:
            new = new.with_donor(b, d)
    return new


@user_errors
def on_method(plan, method_label: str, ratio: float, rank: int, request: gr.Request = None, group_size: int = 2,
              align: bool = False):
    """Switch method; FlexiGPT <-> drop (and FoldGPT or a span method -> either) keep the hand-edited
    pruned set; extend, FoldGPT and the span methods (ReplaceMe, LLM-Streamline: the lowest
    angular-distance span) re-propose (FoldGPT from its gates when trained)."""
    from flexigpt.methods import get_method

    method = METHODS.get(method_label, method_label)
    proposes = method in ("extend", "foldgpt") or get_method(method).uses_spans  # a span method: lowest-distance span
    if plan is None or proposes or plan.method == "extend":
        return on_propose.__wrapped__(ratio, method_label, rank, request, group_size, align)
    from flexigpt.plan.budget import analysis_budget, undo_text_budget

    analysis = work(session_key(request)).analysis
    new = plan.with_method(method)
    if method == "flexigpt" and plan.method != method and analysis is not None:
        new = _auto_donors(new, analysis)  # the donors a proposal of the same blocks would get
    # a text model's split belongs to FlexiGPT's slots: a drop gets its matched LoRA instead
    split, new = plan.note("budget") is not None, undo_text_budget(new)
    if method == "flexigpt" and (split or plan.method == "drop") and analysis is not None:
        new = analysis_budget(new, analysis)  # back to FlexiGPT: the split again, as a fresh proposal would have it
    return new.with_adapter(align=bool(align)) if method == "flexigpt" else new


@user_errors
def on_group_size(plan, group_size):
    """Regroup a FoldGPT plan's kept blocks (other plans are unchanged)."""
    if plan is None or plan.method != "foldgpt":
        return plan
    return plan.with_group_size(limits.check_int("group size", group_size, 1, 64))


@user_errors
def on_align(plan, align: bool):
    """Permutation-aligned donors for the adapter initialisation (FlexiGPT plans only)."""
    if plan is None or not plan.method_spec.chooses_donors:
        return plan
    return plan.with_adapter(align=bool(align))


@user_errors
def on_rank(plan, rank):
    """Change the adapter rank (validated by the Plan and, at render, against the model's shapes). A
    rank typed here is the user's choice: a text model's budget split, if any, is undone."""
    from flexigpt.plan.budget import with_chosen_rank

    if plan is None:
        return None
    rank = limits.check_int("adapter rank", rank, 1, 4096)
    return plan if rank == plan.adapter.rank else with_chosen_rank(plan, rank)


OUT_NORMS = {"scale (default; mergeable into a plain checkpoint)": "scale", "layernorm (paper)": "layernorm"}


@user_errors
def on_out_norm(plan, label: str):
    """The replacement slots' output normalisation: the paper's LayerNorm, or a per-feature scale
    that a merged export can fold into the weights."""
    if plan is None:
        return None
    value = OUT_NORMS.get(label, label)
    if value not in OUT_NORMS.values():
        raise ValueError(f"output norm must be one of {list(OUT_NORMS.values())}, got {label!r}")
    return plan.with_adapter(out_norm=value)


@user_errors
def on_edit(plan, block, action: str, donor, request: gr.Request = None):
    """Keep or prune one block, optionally with a hand-picked donor (0-based ids); the "auto"
    donor is the share-error suggestion of this visit's analysis (``drop_with_suggestion``): no donor
    where it says so or where no share error was measured, else its suggested donor."""
    if plan is None:
        raise ValueError("there is no plan yet: score the blocks and move the ratio slider first")
    b = limits.check_int("block", block, 0, plan.num_blocks - 1)
    if action == "keep":
        return plan.keep(b)
    if action != "prune":
        raise ValueError(f"action must be 'keep' or 'prune', got {action!r}")
    if donor == NO_DONOR:
        if not plan.method_spec.allows_no_donor:
            raise ValueError(f"'{NO_DONOR}' applies to FlexiGPT plans; this plan's method is {plan.method!r}")
        plan = plan.with_notes(**{HAND_DONORS: ",".join(map(str, sorted(_hand_donors(plan) | {b})))})
        return (plan if b in plan.pruned_blocks else plan.drop(b)).with_donor(b, None)
    d = None if donor in (None, "", AUTO) else limits.check_int("donor", donor, 0, plan.num_blocks - 1)
    if d is None and plan.method_spec.chooses_donors:  # "auto": the analysis' own choice, not marked as a hand edit
        from flexigpt.plan import drop_with_suggestion

        return drop_with_suggestion(plan, work(session_key(request)).analysis, b)
    if not plan.method_spec.chooses_donors:
        return plan.drop(b)
    if donor not in (None, "", AUTO):  # remembered, so a later analysis does not replace it
        plan = plan.with_notes(**{HAND_DONORS: ",".join(map(str, sorted(_hand_donors(plan) | {b})))})
    if b in plan.pruned_blocks and d is not None:
        return plan.with_donor(b, d)
    return plan.drop(b, d)


def on_pick_block(plan, block):
    """When a block is picked: show its current action and the donors it may use."""
    if plan is None or block in (None, ""):
        return gr.update(), gr.update(choices=[AUTO], value=AUTO)
    try:
        b = limits.check_int("block", block, 0, plan.num_blocks - 1)
    except ValueError:
        return gr.update(), gr.update(choices=[AUTO], value=AUTO)
    pruned = b in plan.pruned_blocks
    kept = [k for k in plan.kept_blocks if k != b]
    current = plan.layer_map[b] if plan.method_spec.chooses_donors and pruned else AUTO
    none = [NO_DONOR] if plan.method_spec.allows_no_donor else []
    return (gr.update(value="prune" if pruned else "keep"),
            gr.update(choices=[AUTO] + kept + none, value=NO_DONOR if current is None else current))


def plan_message(plan, info: dict, counts) -> str:
    """A plain summary of the plan, and warnings worth reading before building."""
    base = info["num_parameters"]
    lines = []
    selection = plan.note("selection")
    if selection and plan.method != "foldgpt" and selection != "lowest block influence":
        lines.append(f"Blocks chosen by: {selection}.")
    if plan.method == "flexigpt":
        pairs = ", ".join(f"{b}←{'no donor' if d is None else d}" for b, d in sorted(plan.donors.items())) or "none"
        lines.append(f"**FlexiGPT**: {len(plan.pruned_blocks)} of {plan.num_blocks} blocks pruned; their slots "
                     f"reuse a donor (pruned ← donor, 0-based): {pairs}; adapter rank {plan.adapter.rank}.")
        if plan.kept_lora_rank:
            why = (f" This model has no chat template, so the slots' budget is spent the way that recovered best "
                   f"on text ({plan.note('budget')}); type a rank to choose it yourself." if plan.note("budget") else "")
            lines.append(f"The {plan.num_slots - len(plan.replaced_slots)} kept blocks also train a rank-"
                         f"{plan.kept_lora_rank} LoRA.{why}")
    elif plan.spans:
        shown = ", ".join(f"{a}-{e - 1}" for a, e in plan.spans)
        how = ("a least-squares linear map fitted on calibration text, folded into the block before the span "
               "(no training, no extra parameters)" if plan.method == "replaceme" else
               "one block (a copy of the span's first block) trained to map the span's input to its output")
        lines.append(f"**{plan.method_spec.label}**: blocks {shown} (0-based, contiguous spans) cut; each span "
                     f"is replaced by {how}. Prune or keep one block to change the spans.")
    elif plan.method == "foldgpt":
        groups = [g for g in plan.groups if len(g) > 1]
        shown = "; ".join(f"slots {', '.join(map(str, g))} (blocks {', '.join(str(plan.sources[s]) for s in g)}) run "
                          f"block {plan.layer_map[g[0]]}'s weights" for g in groups) or "none"
        lines.append(f"**FoldGPT** ({plan.note('selection') or 'lowest scores'}): blocks "
                     f"{', '.join(map(str, plan.removed_blocks)) or 'none'} (0-based) removed; the {plan.num_slots} "
                     f"kept blocks share weights in groups of up to {plan.group_size}: {shown}. Every slot keeps its "
                     "own pre-norms, the only parameters recovery trains (use the distill objective for the cure).")
    elif plan.method == "drop":
        lines.append(f"**drop**: blocks {', '.join(map(str, plan.pruned_blocks)) or 'none'} (0-based) removed; "
                     f"{plan.num_slots} blocks remain.")
    else:
        lines.append(f"**extend**: {plan.num_slots} slots from {plan.num_blocks} blocks; copies at slots "
                     f"{', '.join(map(str, plan.replaced_slots))} (adapter rank {plan.adapter.rank}).")
    lines.append(f"Stored parameters {fmt_params(counts.stored)} ({100 * counts.stored / base:.1f} % of "
                 f"{fmt_params(base)}); each forward pass runs {fmt_params(counts.run)}.")
    if plan.method_spec.chooses_donors and plan.donors:
        from flexigpt.sharing import degeneracy_warning

        warn = degeneracy_warning({int(k): int(v) for k, v in plan.donors.items() if v is not None})
        if warn:
            lines.append(f"⚠️ {warn}")
    if 0 in plan.pruned_blocks:
        lines.append("⚠️ block 0 is pruned: the first block usually matters most (highest BI).")
    return "\n\n".join(lines)


@user_errors
def on_render(plan, request: gr.Request = None):
    """The only view of the plan: (figure, parameter table, per-block table, JSON, message, download
    path, block choices)."""
    from flexigpt.params import estimate_params

    if plan is None:
        empty = figures.message_figure("No plan yet: score the blocks (tab 2), then set the ratio.")
        return empty, pd.DataFrame(), pd.DataFrame(), "", "No plan yet.", None, gr.update()
    info = REGISTRY.info(plan.base_model)
    if info["num_blocks"] != plan.num_blocks:
        raise ValueError(f"the plan is for {plan.num_blocks} blocks, but {plan.base_model!r} has {info['num_blocks']}")
    counts = estimate_params(plan, info)
    analysis = work(session_key(request)).analysis
    bi = analysis["block_influence"] if analysis and analysis.get("num_blocks") == plan.num_blocks else None
    fig = figures.slot_map(plan.num_blocks, plan.layer_map, plan.replaced_slots, sources=plan.sources,
                           spans=plan.spans or (), span_label=SPAN_LABELS.get(plan.method, ""))
    params = tables.params_table(counts.to_dict(), base_total=info["num_parameters"])
    table = tables.plan_table(plan.num_blocks, plan.layer_map, plan.method, bi, sources=plan.sources)
    path = work(session_key(request)).tmp_dir() / "plan.json"
    path.write_text(plan.to_json())
    blocks = gr.update(choices=list(range(plan.num_blocks)))
    return fig, params, table, plan.to_json(), plan_message(plan, info, counts), str(path), blocks


@user_errors
def on_upload(file, request: gr.Request = None):
    """Read an uploaded (or example) plan.json; it must fit the loaded model."""
    from flexigpt.plan import Plan

    if file is None:
        raise ValueError("no file received")
    if isinstance(file, dict):  # an API client may send Gradio's FileData as a dict
        file = file.get("path") or file.get("name")
    path = Path(getattr(file, "name", file))
    if not path.is_file():
        raise ValueError("the uploaded file could not be read")
    size, cap = path.stat().st_size, limits.current().upload_bytes
    if size > cap:
        raise ValueError(f"plan.json is {size:,} bytes; the limit on this server is {cap:,} bytes")
    plan = Plan.from_json(path.read_bytes())
    info = REGISTRY.info(plan.base_model)
    if info["num_blocks"] != plan.num_blocks:
        raise ValueError(f"plan.json is for {plan.num_blocks} blocks but {plan.base_model!r} has {info['num_blocks']}")
    return plan


def _views(plan, request) -> tuple:
    return (plan, *on_render(plan, request))


def propose_view(ratio: float, method_label: str, rank: int, group_size: int = 2, align: bool = False,
                 request: gr.Request = None) -> tuple:
    return _views(on_propose(ratio, method_label, rank, request, group_size, align), request)


def analysis_view(plan, ratio: float, method_label: str, rank: int, group_size: int = 2, align: bool = False,
                  request: gr.Request = None) -> tuple:
    return _views(on_analysis(plan, ratio, method_label, rank, request, group_size, align), request)


def method_view(plan, method_label: str, ratio: float, rank: int, group_size: int = 2, align: bool = False,
                request: gr.Request = None) -> tuple:
    return _views(on_method(plan, method_label, ratio, rank, request, group_size, align), request)


def group_size_view(plan, group_size, request: gr.Request = None) -> tuple:
    return _views(on_group_size(plan, group_size), request)


def align_view(plan, align: bool, request: gr.Request = None) -> tuple:
    return _views(on_align(plan, align), request)


def rank_box(plan):
    """The rank box's value for ``plan``: its slots' rank (no change without a plan)."""
    return gr.update() if plan is None else gr.update(value=plan.adapter.rank)


def rank_view(plan, rank, request: gr.Request = None) -> tuple:
    return _views(on_rank(plan, rank), request)


def out_norm_view(plan, label: str, request: gr.Request = None) -> tuple:
    return _views(on_out_norm(plan, label), request)


def edit_view(plan, block, action: str, donor, request: gr.Request = None) -> tuple:
    return _views(on_edit(plan, block, action, donor, request), request)


def upload_view(file, request: gr.Request = None) -> tuple:
    return _views(on_upload(file, request), request)


def example_view(name: str, request: gr.Request = None) -> tuple:
    """Load one of the shipped example plans by name (validated like an upload)."""
    paths = {Path(p).stem: p for p in example_plans()}
    if name not in paths:
        return _views(_refuse_example(name, sorted(paths)), request)
    return upload_view(paths[name], request)


@user_errors
def _refuse_example(name, valid):
    raise ValueError(f"example plan {name!r} not found; valid: {valid}")


def example_plans() -> list[str]:
    return sorted(str(p) for p in PLANS_DIR.glob("*.json")) if PLANS_DIR.is_dir() else []


def render(ctx) -> None:
    gr.Markdown(text.PLAN_HELP)
    with gr.Row():
        ratio = gr.Slider(0.0, 0.6, value=0.3, step=0.05, label="prune ratio (fraction of blocks)", elem_id="ratio")
        method = gr.Radio(list(METHODS), value=list(METHODS)[0], label="method", elem_id="method")
        with gr.Column():
            rank = gr.Number(8, label="adapter rank r", precision=None, minimum=1, elem_id="rank")
            out_norm = gr.Dropdown(list(OUT_NORMS), value=list(OUT_NORMS)[0], label="output norm of replacement slots",
                                   elem_id="out-norm")
            align = gr.Checkbox(False, label="align donors (permutation) before fitting the adapter", elem_id="align")
            group_size = gr.Number(2, label="FoldGPT group size (kept blocks sharing one block's weights)",
                                   precision=0, minimum=1, elem_id="group-size")
    with gr.Row():
        sleb = gr.Button("Choose the blocks by iterative selection (SLEB, about a minute)", elem_id="sleb-btn",
                         size="sm")
    message = gr.Markdown("No plan yet.", elem_id="plan-message")
    slots = gr.Plot(label="resulting stack", elem_id="slots-plot")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("**Edit one block** (0-based id): keep it, or prune it and choose its donor.")
            with gr.Row():
                block = gr.Dropdown(list(range(64)), label="block", elem_id="edit-block")
                action = gr.Radio(["keep", "prune"], value="prune", label="action", elem_id="edit-action")
                donor = gr.Dropdown([AUTO], value=AUTO, label="donor", elem_id="edit-donor")
            apply = gr.Button("Apply edit", elem_id="edit-apply")
        with gr.Column(scale=4):
            params = gr.Dataframe(label="parameters (estimated from the plan)", interactive=False,
                                  elem_id="params-table")
    with gr.Accordion("plan per block (table)", open=False):
        table = gr.Dataframe(interactive=False, max_height=360, elem_id="plan-table")
    with gr.Accordion("plan.json: download, upload, view", open=False):
        with gr.Row():
            download = gr.DownloadButton("Download plan.json", elem_id="plan-download")
            upload = gr.UploadButton("Upload plan.json", file_types=[".json"], elem_id="plan-upload")
        examples = {Path(p).stem: p for p in example_plans()}
        if examples:  # a menu, not gr.Examples: examples cannot feed an UploadButton
            with gr.Row():
                example = gr.Dropdown(list(examples), value=None, label="example plans (for the embedded model)",
                                      elem_id="plan-example")
                load_example = gr.Button("Load example", elem_id="plan-example-load")
        code = gr.Code(language="json", label="plan.json", interactive=False, max_lines=24, elem_id="plan-json")
    ctx.components.update(ratio=ratio, method=method, rank=rank)
    views = [slots, params, table, code, message, download, block]
    # Every editor returns the new plan *and* its rendered views in one request (queue=False, so an
    # edit never waits behind a heavy job and updates in one round trip). on_render stays the only
    # renderer. (A gr.State set by a queue=False event does not fire its change event in Gradio 6,
    # so "editors write the State, State.change renders" would need two queued round trips.)
    fast = dict(queue=False, show_progress="hidden")
    out = [ctx.plan, *views]
    proposing = [ratio, method, rank, group_size, align]
    # A new plan's slot rank can differ from the rank box (a text model's budget split, an uploaded
    # plan): the box then shows the plan's, so leaving it unchanged cannot re-rank the plan.
    show_rank = dict(fn=rank_box, inputs=[ctx.plan], outputs=[rank], api_visibility="private", **fast)
    ctx.analysis_token.change(analysis_view, [ctx.plan, *proposing], out, **fast).then(**show_rank)
    ratio.release(propose_view, proposing, out, api_name="propose", **fast).then(**show_rank)
    sleb.click(iterative_view, proposing, out, api_name="propose_iterative", **heavy()).then(**show_rank)
    method.input(method_view, [ctx.plan, method, ratio, rank, group_size, align], out, api_name="plan_method",
                 **fast).then(**show_rank)
    group_size.submit(group_size_view, [ctx.plan, group_size], out, api_name="plan_group_size", **fast)
    group_size.blur(group_size_view, [ctx.plan, group_size], out, **fast)
    align.input(align_view, [ctx.plan, align], out, api_name="plan_align", **fast)
    rank.submit(rank_view, [ctx.plan, rank], out, api_name="plan_rank", **fast)
    rank.blur(rank_view, [ctx.plan, rank], out, **fast)
    out_norm.input(out_norm_view, [ctx.plan, out_norm], out, api_name="plan_out_norm", **fast)
    block.input(on_pick_block, [ctx.plan, block], [action, donor], **fast)
    apply.click(edit_view, [ctx.plan, block, action, donor], out, api_name="edit_plan", **fast)
    upload.upload(upload_view, [upload], out, api_name="upload_plan", **fast).then(**show_rank)
    if examples:
        load_example.click(example_view, [example], out, api_name="example_plan", **fast).then(**show_rank)
