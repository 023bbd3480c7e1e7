"""App handlers called directly with plain values (no browser, no server), on tiny models."""
from __future__ import annotations

import json

import gradio as gr
import plotly.graph_objects as go
import pytest

from app import session
from app.tabs import build as build_tab
from app.tabs import model as model_tab
from app.tabs import plan as plan_tab
from flexigpt.pipeline import TEXT_FIT_STEPS, TEXT_RATES
from flexigpt.recover_spec import RecoverSpec




def test_build_demo_constructs_without_launching():
    from app.ui import build_demo, launch_options

    demo = build_demo()
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    for needed in ("load-btn", "score-btn", "share-plot", "ratio", "slots-plot", "build-btn", "recover-btn",
                   "stop-btn", "compare-table", "chat-original", "chat-built", "export-compact"):
        assert needed in ids, needed
    opts = launch_options()
    assert opts["server_name"] and isinstance(opts["server_port"], int)


def test_on_load_summarises_the_model(tiny_folder, tiny_text_file, request_):
    md, table, fig = model_tab.on_load(tiny_folder, str(tiny_text_file), request_)
    assert "6 blocks" in md and "ids 0 to 5" in md
    assert dict(zip(table["property"], table["value"]))["blocks"] == "6"
    assert isinstance(fig, go.Figure) and list(fig.data[0].x) == list(range(6))


def test_on_load_bad_reference_is_a_gradio_error(request_):
    with pytest.raises(gr.Error, match="does not exist"):
        model_tab.on_load("/no/such/folder", "default", request_)
    with pytest.raises(gr.Error, match="does not exist"):
        model_tab.on_load("default", "/no/such/file.txt", request_)


def _plan(ref: str):
    from flexigpt.plan import Plan

    return Plan(ref, 6, (0, 1, 1, 3, 3, 5))  # blocks 2 and 4 pruned, donors 1 and 3


def test_plan_render_and_edits(tiny_folder, request_):
    plan = _plan(tiny_folder)
    fig, params, table, code, message, path, _ = plan_tab.on_render(plan, request_)
    # (render speed is a target measured in the browser test, not asserted here)
    assert isinstance(fig, go.Figure)
    assert list(table["action"]) == ["keep", "keep", "prune", "keep", "prune", "keep"]
    assert "2←1" in message and "4←3" in message
    stored = int(params.loc[0, "parameters"].replace(",", ""))
    from flexigpt.params import estimate_params

    assert stored == estimate_params(plan, session.REGISTRY.info(tiny_folder)).stored
    assert json.loads(open(path).read())["layer_map"] == [0, 1, 1, 3, 3, 5]
    assert json.loads(code) == json.loads(plan.to_json())
    # edits return new plans
    kept = plan_tab.on_edit(plan, 2, "keep", None)
    assert kept.layer_map == (0, 1, 2, 3, 3, 5)
    redonor = plan_tab.on_edit(plan, 4, "prune", 5)
    assert redonor.layer_map[4] == 5
    pruned = plan_tab.on_edit(plan, 0, "prune", plan_tab.AUTO)
    assert 0 in pruned.pruned_blocks
    assert plan_tab.on_rank(plan, 4).adapter.rank == 4
    new_plan, fig2, _, table2, *_ = plan_tab.edit_view(plan, 2, "keep", None, request_)  # plan + its views at once
    assert new_plan == kept and list(table2["action"]).count("prune") == 1 and isinstance(fig2, go.Figure)
    drop = plan_tab.on_method(plan, "drop (ShortGPT)", 0.3, 8, request_)
    assert drop.method == "drop" and drop.layer_map == (0, 1, 3, 5)


def test_no_donor_in_the_plan_editor(tiny_folder, request_):
    """"none" in the donor menu gives a slot with no donor, drawn and tabled as such."""
    plan = _plan(tiny_folder)
    action, donors = plan_tab.on_pick_block(plan, 2)
    assert plan_tab.NO_DONOR in donors["choices"]
    alone = plan_tab.on_edit(plan, 2, "prune", plan_tab.NO_DONOR, request_)
    assert alone.layer_map[2] is None and alone.pruned_blocks == plan.pruned_blocks
    assert plan_tab.on_pick_block(alone, 2)[1]["value"] == plan_tab.NO_DONOR
    fresh = plan_tab.on_edit(plan, 0, "prune", plan_tab.NO_DONOR, request_)  # a kept block, pruned with no donor
    assert fresh.layer_map[0] is None
    fig, params, table, code, message, path, _ = plan_tab.on_render(alone, request_)
    assert list(table["donor (0-based)"])[2] == "none" and "2←no donor" in message
    assert json.loads(open(path).read())["layer_map"][2] is None
    slots = fig.data[1]
    assert slots.text[2] == "–" and "no donor" in slots.hovertext[2]
    drop = plan_tab.on_method(plan, "drop (ShortGPT)", 0.3, 8, request_)
    with pytest.raises(gr.Error, match="applies to FlexiGPT plans"):
        plan_tab.on_edit(drop, 2, "prune", plan_tab.NO_DONOR, request_)


def test_bad_plan_edits_are_gradio_errors_not_tracebacks(tiny_folder, request_):
    plan = _plan(tiny_folder)
    with pytest.raises(gr.Error, match="block 1 is the donor of slots"):
        plan_tab.on_edit(plan, 1, "prune", None)  # 1 donates to slot 2
    with pytest.raises(gr.Error, match="donors must be kept"):
        plan_tab.on_edit(plan, 4, "prune", 2)  # block 2 is itself pruned
    with pytest.raises(gr.Error, match="got 9"):
        plan_tab.on_edit(plan, 9, "keep", None)
    with pytest.raises(gr.Error, match="no block scores yet"):
        plan_tab.on_propose(0.3, "FlexiGPT (share a donor + adapter)", 8, request_)
    with pytest.raises(gr.Error, match="rank"):
        plan_tab.on_render(plan.with_rank(1000), request_)


def test_plan_upload_round_trip(tiny_folder, tmp_path, request_):
    plan = _plan(tiny_folder)
    good = tmp_path / "plan.json"
    good.write_text(plan.to_json())
    assert plan_tab.on_upload(str(good), request_) == plan
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": 1, "base_model": "x", "num_blocks": 6, "layer_map": [0, 9]}')
    with pytest.raises(gr.Error, match="layer_map"):
        plan_tab.on_upload(str(bad), request_)


def test_stop_sets_the_session_flag(request_):
    assert "Stopping" in build_tab.on_stop(request_)
    assert session.work(request_.session_hash).stop.is_set()


def test_sessions_are_freed(request_):
    w = session.work("someone-else")
    tmp = w.tmp_dir()
    assert "someone-else" in session.active_sessions()
    session.drop("someone-else")
    assert "someone-else" not in session.active_sessions() and not tmp.exists()


def test_story_on_the_tiny_model(tiny_folder, tiny_text_file, request_, monkeypatch, tmp_path):
    """Score -> share error -> plan -> build -> recover -> compare -> chat -> export, by handlers."""
    from app.tabs import chat as chat_tab
    from app.tabs import compare as compare_tab
    from app.tabs import export as export_tab
    from app.tabs import scores as scores_tab
    from app.tabs import share as share_tab

    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))
    data = str(tiny_text_file)
    status, bar, table, tri, sim, token = scores_tab.on_score(tiny_folder, data, 4, 64, False, request_)
    assert "computed" in status and "(0-based)" in status and token
    assert list(table["block (0-based)"]) == list(range(6))
    assert isinstance(bar, go.Figure) and isinstance(tri, go.Figure) and isinstance(sim, go.Figure)
    status2, _, table2, *_, token2 = scores_tab.on_score(tiny_folder, data, 4, 64, False, request_)
    assert table2.equals(table)  # the session keeps the last result (its speed is measured in the browser test)
    _, drop_bar, drop_table, *_ = scores_tab.on_score(tiny_folder, data, 4, 64, True, request_)
    assert "ppl without the block" in drop_table.columns and len(drop_bar.data) >= 3
    assert "kept from this visit" in status2 and token2 != token

    plan = plan_tab.on_propose(0.3, "FlexiGPT (share a donor + adapter)", 4, request_)
    assert len(plan.pruned_blocks) == 2 and plan.adapter.rank == 4
    bi = session.work(request_.session_hash).analysis["block_influence"]
    assert set(plan.pruned_blocks) == set(sorted(range(6), key=lambda i: bi[i])[:2])

    msg, token3 = share_tab.on_compute(tiny_folder, data, 4, 64, [4], "pruned x kept blocks of the plan (fast)",
                                       plan, request_)
    assert "ranks [4]" in msg
    rank_upd, view_upd, fig, donors_md = share_tab.on_refresh("relative", None, share_tab.AGGREGATED, plan, request_)
    assert rank_upd["value"] == 4 and "q_proj" in view_upd["choices"]
    heat = fig.data[0]
    assert [y for y in heat.y] == [f"block {b}" for b in plan.pruned_blocks]  # rows: the plan's pruned blocks
    assert "←" in donors_md
    # "auto (suggested)" on a hand edit is the share-error suggestion, as in the heatmap
    b = plan.pruned_blocks[0]
    sugg = session.work(request_.session_hash).analysis["donor_suggestion"]
    suggested = sugg.get("suggested", sugg["donors"])[str(b)]  # "none": the block's own fit beats every donor
    kept_b = plan_tab.on_edit(plan, b, "keep", None, request_)
    assert plan_tab.on_edit(kept_b, b, "prune", plan_tab.AUTO, request_).donors[b] == \
        (None if suggested == "none" else suggested)
    per_matrix, _ = share_tab.on_share_view("absolute", 4, "q_proj", plan, request_)
    assert len(per_matrix.data[0].z) == 2
    # a new analysis (here: the share error again, at another rank) keeps the hand edits
    other = next(k for k in plan.kept_blocks if k != plan.layer_map[b])
    edited = plan_tab.on_edit(plan, b, "prune", other, request_)
    share_tab.on_compute(tiny_folder, data, 4, 64, [2], "pruned x kept blocks of the plan (fast)", edited, request_)
    after = plan_tab.on_analysis(edited, 0.3, "FlexiGPT (share a donor + adapter)", 4, request_)
    assert after.pruned_blocks == edited.pruned_blocks and after.layer_map[b] == other
    assert plan_tab.on_analysis(None, 0.3, "FlexiGPT (share a donor + adapter)", 4, request_).pruned_blocks == \
        plan.pruned_blocks  # no plan yet: a fresh proposal
    with pytest.raises(gr.Error, match="pick at least one rank"):
        share_tab.on_compute(tiny_folder, data, 4, 64, [], "all block pairs (slow)", plan, request_)

    status, choices, builds = build_tab.on_build(plan, data, True, 0, request_)
    assert builds == 1 and "flexigpt 33% r4" in status and "drop 33%" in status and "heldout" in status
    assert choices["value"] == "flexigpt 33% r4"
    # the slots calibrated as `build --steps N` calibrates them: a fifth chat for a chat model, the text otherwise
    loaded = session.REGISTRY.get(tiny_folder)
    cal = build_tab.calibration_windows(loaded, data)
    assert cal.data.startswith("mix(") and "chat:chat-distill-v1" in cal.data and ", first 64:" in cal.data \
        and cal.data.endswith(", 0.2)")
    assert cal.num_windows == build_tab.CALIBRATION_WINDOWS
    template, loaded.tokenizer.chat_template = loaded.tokenizer.chat_template, None
    try:
        assert "chat" not in build_tab.calibration_windows(loaded, data).data
    finally:
        loaded.tokenizer.chat_template = template
    # the recover panel follows the picked build's model: the chat recipe here, the text recipe without a template
    objective, source, note, fit, lr, gate = build_tab.on_pick_build("flexigpt 33% r4", request_)
    assert (objective["value"], source["value"]) == build_tab.default_recipe(True) and "chat" in note["value"]
    assert fit["value"] == build_tab.FIT_STEPS  # `build` fits no slot of a chat model
    assert (lr["value"], gate["value"]) == (RecoverSpec().lr, RecoverSpec().gate_lr_scale)  # the chat recipe's
    tok = session.work(request_.session_hash).builds["flexigpt 33% r4"].tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        objective, source, note, fit, lr, gate = build_tab.on_pick_build("flexigpt 33% r4", request_)
        drop_fit, drop_lr = build_tab.on_pick_build("drop 33%", request_)[3:5]
    finally:
        tok.chat_template = template
    assert (objective["value"], source["value"]) == build_tab.default_recipe(False) == ("mix", "the text of tab 1 (train split)")
    assert "without a chat template" in note["value"] and "Fit slots" in note["value"]
    assert fit["value"] == TEXT_FIT_STEPS and drop_fit["value"] == build_tab.FIT_STEPS  # as `build` fits a text model
    # the text recipe's rates, for FlexiGPT and drop builds alike (the baseline recovers as the slots do)
    assert lr["value"] == drop_lr["value"] == TEXT_RATES["lr"] and gate["value"] == TEXT_RATES["gate_lr_scale"]
    assert build_tab.on_pick_build("no such build", request_) == (gr.update(),) * 6
    # fit slots: each replaced slot trained alone; one R^2 bar pair per slot, never worse than before
    fig, msg = build_tab.on_fit("flexigpt 33% r4", 3, data, request_)
    after = dict(zip(fig.data[-1].x, fig.data[-1].y))
    before = dict(zip(fig.data[0].x, fig.data[0].y))
    assert sorted(after, key=int) == [str(s) for s in plan.replaced_slots] and "mean R²" in msg
    assert all(after[s] >= before[s] - 1e-6 for s in after)
    assert session.work(request_.session_hash).builds["flexigpt 33% r4"].fit["steps"] == 3
    with pytest.raises(gr.Error, match="no replacement slots"):
        build_tab.on_fit("drop 33%", 3, data, request_)
    with pytest.raises(gr.Error, match="fit steps per slot"):
        build_tab.on_fit("flexigpt 33% r4", 0, data, request_)
    outs = list(build_tab.on_recover("flexigpt 33% r4", 2, 1, 64, 1e-3, data, builds, request_))
    # the tiny tokenizer has a chat template: the default recipe mixes in the original's chat replies
    assert len(outs) == 5 and "Preparing the chat data" in outs[0][1]  # preparing, start, 2 steps, final
    assert "Recipe: lm objective on" in outs[-1][1] and "chat" in outs[-1][1]
    assert "Recovery finished after 2 steps" in outs[-1][1] and outs[-1][2] == 2
    assert len(outs[-1][0].data[0].x) == 2  # the loss curve has both steps
    # Stop: the loop ends after the current step and still reports the result
    gen = build_tab.on_recover("flexigpt 33% r4", 5, 1, 64, 1e-3, data, 2, request_)
    next(gen), next(gen)  # preparing the chat data, then the start
    build_tab.on_stop(request_)
    rest = list(gen)
    assert "Recovery stopped after 3 steps" in rest[-1][1]  # 2 earlier steps + 1 before the stop was seen
    # recovering the plain drop makes it the ShortGPT + LoRA baseline at the FlexiGPT build's budget
    outs = list(build_tab.on_recover("drop 33%", 2, 1, 64, 1e-3, data, 2, request_))
    assert "ShortGPT + LoRA baseline: LoRA rank" in outs[-1][1] and "Recovery finished after 2 steps" in outs[-1][1]

    table, fig = compare_tab.on_refresh(2, request_)
    assert list(table["model"]) == [f"original ({tiny_folder})", "flexigpt 33% r4", "drop 33%"]
    assert table.loc[1, "ppl after recovery"] != "n/a" and "heldout" in table.loc[1, "perplexity protocol"]
    assert table.loc[2, "ppl after recovery"] != "n/a"
    assert isinstance(fig, go.Figure)
    table, _ = compare_tab.on_speed(request_)
    assert all(v != "n/a" and float(v) > 0 for v in table["tokens/s"])
    assert table.loc[0, "speed-up"] == "x1.00" and table.loc[0, "forward ms"].endswith("(x1.00)")
    assert all(v.startswith("x") for v in table["speed-up"])

    chats = list(chat_tab.on_chat("w1 w2 w3", "flexigpt 33% r4", [], [], 4, 0.0, 1.0, tiny_folder, request_))
    left, right, box, status = chats[-1]
    assert left[0]["content"] == "w1 w2 w3" and right[0]["content"] == "w1 w2 w3"
    assert left[-1]["role"] == "assistant" and isinstance(right[-1]["content"], str)
    assert "First token after" in status and box == ""
    with pytest.raises(gr.Error, match="type a message"):
        list(chat_tab.on_chat("  ", "flexigpt 33% r4", [], [], 4, 0.0, 1.0, tiny_folder, request_))
    # fidelity check: both scores, the lost prompts; the compare tab shows the score
    md = chat_tab.on_fidelity("flexigpt 33% r4", tiny_folder, request_)
    assert "**Chat fidelity**" in md and "original **" in md and "agreement" in md
    assert "Answered per kind of prompt" in md
    table, _ = compare_tab.on_refresh(3, request_)
    assert table.loc[0, "chat fidelity"] != "n/a" and table.loc[1, "chat fidelity"] != "n/a"
    with pytest.raises(gr.Error, match="pick a built model"):
        chat_tab.on_fidelity("nope", tiny_folder, request_)

    archive, msg = export_tab.on_export("flexigpt 33% r4", "compact", request_)
    import zipfile

    names = zipfile.ZipFile(archive).namelist()
    assert "plan.json" in names and "compact" in msg
    assert plan.adapter.out_norm == "scale"  # the default output norms fold into a plain checkpoint
    merged, _ = export_tab.on_export("flexigpt 33% r4", "merged", request_)
    assert "config.json" in " ".join(zipfile.ZipFile(merged).namelist())
    paper = plan_tab.on_out_norm(plan, "layernorm (paper)")
    assert paper.adapter.out_norm == "layernorm"
    assert plan_tab.on_out_norm(paper, "scale (default; mergeable into a plain checkpoint)").adapter.out_norm == "scale"
    plan_path = export_tab.on_plan_file("flexigpt 33% r4", request_)
    assert json.loads(open(plan_path).read())["layer_map"] == list(plan.layer_map)

    # a build that ends its turn at once: the bubble says so, and the marker never reaches a model
    import torch

    b = session.work(request_.session_hash).builds["flexigpt 33% r4"]
    head = torch.nn.Linear(b.model.lm_head.in_features, b.model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[b.tokenizer.eos_token_id] = 100.0  # always the end of the turn
    b.model.lm_head = head
    left, right, _, status = list(chat_tab.on_chat("w1 w2", "flexigpt 33% r4", [], [], 4, 0.0, 1.0, tiny_folder,
                                                   request_))[-1]
    assert right[-1]["content"] == chat_tab.EMPTY_REPLY and "flexigpt 33% r4: n/a (empty reply)" in status
    assert chat_tab.plain_messages(right)[-1] == {"role": "assistant", "content": ""}


def test_example_plans_load_for_the_embedded_model(request_):
    from flexigpt.plan import Plan

    paths = plan_tab.example_plans()
    assert len(paths) == 3
    for path in paths:
        plan = plan_tab.on_upload(path, request_)
        assert isinstance(plan, Plan) and plan.num_blocks == 30 and plan.pruned_blocks
    with pytest.raises(gr.Error, match="not found"):
        plan_tab.example_view("nope", request_)


def test_span_methods_in_the_plan_tab(tiny_folder, tiny_text_file, request_, monkeypatch, tmp_path):
    """ReplaceMe from the method menu: the lowest angular-distance span, drawn as one linear map,
    built with its fitted map (the build status says how well it fits)."""
    from app.tabs import scores as scores_tab

    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))
    data = str(tiny_text_file)
    scores_tab.on_score(tiny_folder, data, 4, 64, False, request_)
    label = next(k for k, v in plan_tab.METHODS.items() if v == "replaceme")
    plan = plan_tab.on_method(None, label, 0.34, 4, request_)
    assert plan.method == "replaceme" and len(plan.spans) == 1 and plan.spans[0][1] - plan.spans[0][0] == 2
    assert plan.spans[0][0] >= 1  # never at block 0: no block before it
    fig, params, table, code, message, path, _ = plan_tab.on_render(plan, request_)
    assert any("one linear map" in (a.text or "") for a in fig.layout.annotations) and "contiguous spans" in message
    start, end = plan.spans[0]
    shorter = plan_tab.on_edit(plan, end - 1, "keep", None, request_)
    assert shorter.spans == ((start, end - 1),) and shorter.method == "replaceme"
    status, choices, _ = build_tab.on_build(plan, data, False, 0, request_)
    assert "linear map error" in status and choices["value"].startswith("replaceme")
    # iterative selection (SLEB) proposes the pruned blocks instead of Block Influence
    sleb = plan_tab.on_iterative(0.34, "drop (ShortGPT)", 4, request_, progress=lambda *a, **k: None)
    assert sleb.method == "drop" and len(sleb.pruned_blocks) == 2 and "SLEB" in sleb.note("selection")
    assert "Blocks chosen by: iterative (SLEB)" in plan_tab.on_render(sleb, request_)[4]


def test_recover_panel_starts_at_the_benchmarked_recovery_within_the_limits():
    from app import limits

    assert build_tab.recover_defaults(limits.current({})) == (100, 4, 256)  # as bench/chat.py and build --steps 100
    small = limits.current({"FLEXIGPT_RECOVER_STEPS": "7", "FLEXIGPT_RECOVER_BATCH": "2", "FLEXIGPT_SEQ_LEN": "200"})
    assert build_tab.recover_defaults(small) == (7, 2, 128)  # never above this server's limits
