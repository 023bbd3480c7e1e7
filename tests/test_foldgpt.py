"""FoldGPT end to end: the plan format (sources, format versions), surgery (hard sharing, own
trainable pre-norms), parameter accounting, exports, and the plan/build CLI on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from flexigpt.arch import arch_of, get_blocks, get_submodule
from flexigpt.params import estimate_params, measure_params, params_table
from flexigpt.plan import AdapterSpec, Plan, fold_layout, foldgpt_plan, plan_from_analysis
from flexigpt.surgery import apply_plan

BI8 = [0.9, 0.1, 0.05, 0.3, 0.02, 0.5, 0.4, 0.8]


def _fold(L=6, lm=(0, 0, 3, 3), sources=(0, 2, 3, 5), **kw):
    return Plan("tiny", L, tuple(lm), "foldgpt", sources=None if sources is None else tuple(sources), **kw)


# ---- the plan ----------------------------------------------------------------------------
def test_foldgpt_plan_removes_lowest_and_groups_the_rest():
    p = foldgpt_plan("m", BI8, 0.25, 2)  # removes blocks 4 and 2 (lowest scores)
    assert p.method == "foldgpt" and p.sources == (0, 1, 3, 5, 6, 7)
    assert p.layer_map == (0, 0, 3, 3, 6, 6) and p.groups == ((0, 1), (2, 3), (4, 5))
    assert p.removed_blocks == (2, 4) and p.kept_blocks == (0, 3, 6) and p.unstored_blocks == (1, 2, 4, 5, 7)
    assert p.shared_slots == (1, 3, 5) and p.donors == {1: 0, 3: 3, 5: 6} and p.replaced_slots == ()
    assert p.group_size == 2 and p.note("selection") == "lowest FoldGPT gate"
    assert foldgpt_plan("m", BI8, 0.25, 3).layer_map == (0, 0, 0, 5, 5, 5)
    assert foldgpt_plan("m", BI8, 0.0, 1).layer_map == tuple(range(8))  # group 1 = own norms only
    assert fold_layout((1, 2, 4, 5, 7), 2) == ((1, 1, 4, 4, 7), (1, 2, 4, 5, 7))
    # the BI fallback through an analysis, and conversions that keep the removed set
    a = {"format_version": 1, "model": "m", "num_blocks": 8, "block_influence": BI8}
    q = plan_from_analysis(a, 0.25, method="foldgpt", group_size=2)
    assert q.layer_map == p.layer_map and q.note("selection") == "lowest block influence"
    assert p.with_method("drop").layer_map == p.sources
    assert p.with_method("flexigpt").unstored_blocks == (2, 4)
    assert p.with_method("drop").with_method("foldgpt", group_size=2) == p
    assert p.with_group_size(3).layer_map == (0, 0, 0, 5, 5, 5)
    assert p.drop(7).sources == (0, 1, 3, 5, 6) and p.keep(2).sources == (0, 1, 2, 3, 5, 6, 7)
    with pytest.raises(ValueError, match="flexigpt"):
        p.with_donor(1, 3)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(sources=None), "sources"),
    (dict(sources=(0, 2, 3)), "4 slots"),
    (dict(sources=(0, 3, 2, 5)), "[0, 3, 2, 5]"),
    (dict(sources=(0, 2, 3, 9)), "9"),
    (dict(lm=(0, 0, 2, 3)), "block 2"),  # slot 2 runs block 2, whose slot runs block 0
    (dict(lm=(0, 0, 4, 4)), "removed"),
])
def test_invalid_foldgpt_plans_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        _fold(**kwargs)
    assert fragment in str(err.value)


def test_format_versions_old_plans_unchanged_new_features_need_2():
    old = Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(init="svd"))  # the format-1 default init
    d = old.to_dict()
    assert d["format_version"] == 1 and "sources" not in d and "align" not in d["adapter"]
    assert Plan.from_json(old.to_json()) == old
    fold = _fold()
    assert fold.to_dict()["format_version"] == 2 and Plan.from_json(fold.to_json()) == fold
    aligned = old.with_adapter(align=True)
    assert aligned.to_dict()["format_version"] == 2 and aligned.to_dict()["adapter"]["align"] is True
    assert Plan.from_json(aligned.to_json()) == aligned and aligned != old
    for plan in (fold, aligned):  # a file that claims version 1 cannot use version-2 features
        bad = {**plan.to_dict(), "format_version": 1}
        with pytest.raises(ValueError, match="format_version 2"):
            Plan.from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="only valid with method 'foldgpt'"):
        Plan.from_dict({**old.to_dict(), "sources": [0, 1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match="'zeros'"):
        AdapterSpec(init="zeros", align=True)


# ---- surgery, parameters, exports ----------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "opt"])
def test_surgery_shares_weights_and_gives_every_slot_own_norms(tiny_model, tiny_opt_model, which):
    base = tiny_model if which == "llama" else tiny_opt_model
    L = len(get_blocks(base))
    plan = foldgpt_plan("tiny", [1.0, 0.5, 0.1, 0.7, 0.2, 0.9][:L], 0.34, 2)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_plan(base, plan)
    spec = arch_of(model)
    blocks, base_blocks = get_blocks(model), get_blocks(base)
    assert len(blocks) == plan.num_slots == model.config.num_hidden_layers
    for s, (donor, source) in enumerate(zip(plan.layer_map, plan.sources)):
        lin = get_submodule(blocks[s], spec.linears[0]).weight
        assert lin.data_ptr() == get_submodule(base_blocks[donor], spec.linears[0]).weight.data_ptr()
        for path in spec.norms:
            mine, theirs = get_submodule(blocks[s], path).weight, get_submodule(base_blocks[source], path).weight
            assert mine.data_ptr() != theirs.data_ptr() and torch.equal(mine, theirs) and mine.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{path}." in n for path in spec.norms) for n in trainable)
    assert estimate_params(plan, base) == measure_params(model)
    assert estimate_params(plan.with_adapter(train_prenorms=False), base) == measure_params(
        apply_plan(base, plan.with_adapter(train_prenorms=False)))
    rows = {r["model"]: r for r in params_table(plan, base)}
    assert rows["foldgpt"]["stored"] < rows["drop"]["stored"] < rows["original"]["stored"]
    ids = torch.randint(0, 100, (2, 10))
    out = model(input_ids=ids).logits
    out.float().pow(2).mean().backward()  # the norms learn; the base never changes
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert model.generate(ids[:1], max_new_tokens=3, do_sample=False).shape[1] == 13


def test_exports_round_trip_bit_identical_and_merged(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from flexigpt.export import load_compact, save_compact, save_merged

    plan = foldgpt_plan("tiny", [1.0, 0.5, 0.1, 0.7, 0.2, 0.9], 0.34, 2)
    model = apply_plan(tiny_model, plan)
    with torch.no_grad():  # as after a cure: the norms differ from the base's
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    manifest = save_compact(model, plan, tiny_tokenizer, tmp_path / "c")
    assert manifest["weights_bytes"] < 4 * measure_params(model).stored + 8192  # shared weights stored once
    loaded = load_compact(tmp_path / "c")
    assert loaded.extra["plan"] == plan
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, ref)
    save_merged(model, plan, tiny_tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ref)


def test_self_speculative_draft_skips_group_members(tiny_model):
    from flexigpt.speculative import draft_for, greedy_generate, speculative_generate

    plan = foldgpt_plan("tiny", [1.0, 0.5, 0.1, 0.7, 0.2, 0.9], 0.0, 2)
    model = apply_plan(tiny_model, plan)
    draft = draft_for(model)
    assert len(get_blocks(draft)) == len(plan.kept_blocks)
    ids = torch.randint(0, 100, (1, 6))
    spec = speculative_generate(model, draft, ids, 8, draft_len=3)
    assert torch.equal(spec.sequences, greedy_generate(model, ids, 8).sequences)


# ---- CLI ----------------------------------------------------------------------------------
def _cli(argv, capsys):
    from flexigpt.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan_foldgpt_bi_and_gates_then_build_with_tail_distillation(tiny_model, tiny_tokenizer, tiny_text_file,
                                                                        tmp_path, capsys):
    base = tmp_path / "base"
    tiny_model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    bi = [0.9, 0.1, 0.05, 0.3, 0.02, 0.5]
    analysis = {"format_version": 1, "model": str(base), "num_blocks": 6, "block_influence": bi,
                "data": str(tiny_text_file), "samples": 4, "seq_len": 16}
    (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    out = tmp_path / "plan.json"
    code, stdout, err = _cli(["plan", "--analysis", str(tmp_path), "--ratio", "0.34", "--method", "foldgpt",
                              "--group-size", "2", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    plan = Plan.from_json(out.read_text())
    assert plan.removed_blocks == (2, 4) and plan.layer_map == (0, 0, 3, 3) and result["groups"] == [[0, 1], [2, 3]]
    assert result["params"]["stored"] == measure_params(apply_plan(tiny_model, plan)).stored
    avg = tmp_path / "avg.json"
    assert _cli(["plan", "--from-plan", str(out), "--representative", "average", "--out", str(avg)], capsys)[0] == 0
    assert Plan.from_json(avg.read_text()).note("representative") == "average"
    code, _, err = _cli(["plan", "--from-plan", str(out), "--method", "drop", "--representative", "average",
                         "--out", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "--representative average applies to --method foldgpt" in err
    code, stdout, err = _cli(["plan", "--analysis", str(tmp_path), "--ratio", "0.34", "--method", "foldgpt",
                              "--gates-steps", "2", "--out", str(tmp_path / "gated.json")], capsys)
    assert code == 0, err
    gated = Plan.from_json((tmp_path / "gated.json").read_text())
    gates = [float(g) for g in gated.note("gates").split(",")]
    kept = [b for b in range(6) if b not in gated.removed_blocks]
    assert len(gated.removed_blocks) == 2 and len(gates) == 6  # the lowest gates (notes round to 4 digits)
    assert max(gates[b] for b in gated.removed_blocks) <= min(gates[b] for b in kept) + 1e-4
    assert _cli(["plan", "--analysis", str(tmp_path), "--gates-steps", "2", "--out", str(out)], capsys)[0] == 2
    code, stdout, err = _cli(["build", "--plan", str(out), "--data", str(tiny_text_file), "--eval-windows", "2",
                              "--seq-len", "16", "--batch-size", "2", "--lr", "0.01", "--steps", "3",
                              "--objective", "distill", "--hidden-weight", "1.0", "--checkpoint-every", "0",
                              "--out", str(tmp_path / "m"), "--merged", "--json"], capsys)
    assert code == 0, err
    built = json.loads(stdout.strip().splitlines()[-1])
    assert built["method"] == "foldgpt" and built["slots"] == 4
    assert built["trainable_parameters"] == estimate_params(plan, tiny_model).trainable > 0
    assert built["ppl_after"] != built["ppl_before"] and built["recovery"]["hidden_weight"] == 1.0
    assert built["stored_parameters"] == estimate_params(plan, tiny_model).stored


# ---- the group's representative: first member or members' average -----------------------
def test_average_representative_runs_the_members_mean_and_exports_bit_identical(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from flexigpt.export import load_compact, save_compact, save_merged

    plan = foldgpt_plan("tiny", [1.0, 0.5, 0.1, 0.7, 0.2, 0.9], 0.34, 2).with_notes(representative="average")
    model = apply_plan(tiny_model, plan)
    spec = arch_of(model)
    blocks, base_blocks = get_blocks(model), get_blocks(tiny_model)
    for group in plan.groups:
        members = [plan.sources[s] for s in group]
        for path in spec.linears:
            mean = torch.stack([get_submodule(base_blocks[b], path).weight for b in members]).mean(0)
            for s in group:
                w = get_submodule(blocks[s], path).weight
                assert torch.equal(w, mean) and not w.requires_grad
                assert w.data_ptr() == get_submodule(blocks[group[0]], path).weight.data_ptr()
    assert estimate_params(plan, tiny_model) == measure_params(model)
    first = apply_plan(tiny_model, plan.with_notes(representative="first"))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert not torch.equal(ref, first(input_ids=ids).logits)
    save_compact(model, plan, tiny_tokenizer, tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "c").model(input_ids=ids).logits, ref)
    save_merged(model, plan, tiny_tokenizer, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(input_ids=ids).logits, ref)


def test_bad_representative_is_refused():
    plan = foldgpt_plan("tiny", [1.0, 0.5, 0.1, 0.7, 0.2, 0.9], 0.34, 2)
    with pytest.raises(ValueError, match="representative 'median' is not one of first, average"):
        plan.with_notes(representative="median")
