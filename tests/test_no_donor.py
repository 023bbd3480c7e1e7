"""No-donor slots: a replaced slot that runs only its own rank-r factors of the pruned block.

The ablation that answers "does sharing a donor's weights help at all?": plan format, validation,
surgery, parameter accounting, both exports and the CLI, on tiny models built in code.
"""
from __future__ import annotations

import json

import pytest
import torch

from flexigpt.arch import arch_of, block_linears, get_blocks
from flexigpt.export import load_compact, save_compact, save_merged
from flexigpt.params import estimate_params, measure_params
from flexigpt.plan import Plan
from flexigpt.slots import is_absent
from flexigpt.surgery import apply_plan
from tiny import tiny_llama, tiny_opt


def _plan(L: int, base: str = "tiny", **adapter) -> Plan:
    """Blocks 1 and 2 pruned: 1 shares donor 0, 2 has no donor."""
    return Plan.identity(base, L).drop(1, 0).drop(2).with_donor(2, None).with_adapter(rank=4, **adapter)


def _open_gates(model, value: float = 0.7) -> None:
    """Output-norm scales start tiny; open them so the slots matter in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(value)


def test_plan_views_json_and_version():
    plan = _plan(6)
    assert plan.layer_map == (0, 0, None, 3, 4, 5)
    assert plan.pruned_blocks == plan.replaced_slots == plan.unstored_blocks == (1, 2)
    assert plan.donors == {1: 0, 2: None} and plan.kept_blocks == (0, 3, 4, 5)
    assert plan.groups == ((0, 1), (3,), (4,), (5,))
    obj = json.loads(plan.to_json())
    assert obj["format_version"] == 4 and obj["layer_map"][2] is None
    assert Plan.from_json(plan.to_json()) == plan
    # back to a donor, and round trips through other methods
    assert plan.with_donor(2, 3).layer_map[2] == 3 and plan.with_donor(2, 3).required_version < 4
    assert plan.with_method("drop").layer_map == (0, 3, 4, 5)
    assert plan.keep(2).layer_map == (0, 0, 2, 3, 4, 5)


def test_bad_no_donor_plans_are_refused_with_a_message():
    obj = json.loads(_plan(6).to_json())
    with pytest.raises(ValueError, match="needs plan format_version 4"):
        Plan.from_dict({**obj, "format_version": 3})
    with pytest.raises(ValueError, match=r"layer_map\[1\] is null.*only 'flexigpt'"):
        Plan.from_dict({**obj, "method": "drop", "layer_map": [0, None, 2]})
    with pytest.raises(ValueError, match="cannot prune all 3 blocks"):
        Plan(base_model="tiny", num_blocks=3, layer_map=(None, None, None))
    with pytest.raises(ValueError, match="only in flexigpt plans"):
        Plan.identity("tiny", 6, method="drop").with_donor(1, None)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_no_donor_slot_builds_exports_and_reloads_bit_identical(make, tmp_path):
    base = make()
    plan = _plan(base.config.num_hidden_layers, out_norm="scale")
    model = apply_plan(base, plan)
    spec = arch_of(model)
    slot = get_blocks(model)[2]
    linears = block_linears(slot, spec)
    assert all(is_absent(getattr(m, "base_layer", getattr(m, "inner", m))) or is_absent(m.inner.base_layer)
               for m in linears.values())
    # nothing of the pruned block's dense weights is stored: not a parameter, not in the state dict
    assert not any(".layers.2." in n and n.endswith("base_layer.weight") for n in model.state_dict())
    assert measure_params(model) == estimate_params(plan, base)
    _open_gates(model)
    ids = torch.randint(0, base.config.vocab_size, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
    save_compact(model, plan, None, tmp_path / "compact")
    reloaded = load_compact(tmp_path / "compact").model
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    save_merged(model, plan, None, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_svd_init_is_the_best_rank_r_fit_of_the_pruned_block_alone():
    """With no donor, ``B A`` starts as the truncated SVD of ``W_pruned`` itself (Eckart-Young)."""
    base = tiny_llama()
    model = apply_plan(base, _plan(6))
    spec = arch_of(base)
    for name, layer in block_linears(get_blocks(model)[2], spec).items():
        lora = getattr(layer, "inner", layer)
        A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        w = block_linears(get_blocks(base)[2], spec)[name].weight.detach().float()
        r = A.shape[0]
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close(lora.scaling["default"] * B @ A, best, rtol=1e-4, atol=1e-5)


def test_whitened_init_and_local_fit_run_without_a_donor():
    from flexigpt.pipeline import build

    base = tiny_llama()
    calib = torch.randint(0, base.config.vocab_size, (4, 16))
    report = {}
    model = build(base, _plan(6, init="whitened"), calibration=calib, fit_steps=5, report=report)
    assert set(report["whitened_residual"]) == {"1", "2"} and 0 <= report["whitened_residual"]["2"] < 1
    assert report["r2"]["2"] >= report["r2_before"]["2"] - 1e-6
    assert torch.isfinite(model(calib).logits).all()


def test_cli_donor_none(tmp_path, capsys, tiny_folder):
    from flexigpt.cli import main

    src = tmp_path / "p.json"
    src.write_text(_plan(6, tiny_folder).with_donor(2, 3).to_json())
    out = tmp_path / "q.json"
    assert main(["plan", "--from-plan", str(src), "--donor", "2=none", "--out", str(out), "--json"]) == 0
    assert json.loads(out.read_text())["layer_map"][2] is None
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["donors"]["2"] is None
    assert main(["plan", "--from-plan", str(src), "--donor", "2=nothing", "--out", str(tmp_path / "r.json")]) == 2
    assert "PRUNED=none" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def _function_analysis(L: int, donor_error: float, alone: list[float]) -> dict:
    """An analysis.json with a function-metric share error: every donor costs ``donor_error``."""
    matrix = [[None if i == j else donor_error for j in range(L)] for i in range(L)]
    return {"format_version": 1, "model": "tiny", "num_blocks": L, "block_influence": [float(b) for b in range(L)],
            "share_error": {"function": {"8": matrix}, "no_donor": {"function": {"8": alone}}},
            "donor_suggestion": {"metric": "function", "rank": 8}}


def test_proposal_gives_no_donor_where_the_block_alone_fits_better():
    from flexigpt.plan import plan_from_analysis

    L = 6
    # block 0 (lowest BI) is fitted better alone (0.3 < 0.5); block 1 is not (0.9 > 0.5)
    analysis = _function_analysis(L, 0.5, [0.3, 0.9, 0.1, 0.1, 0.1, 0.1])
    plan = plan_from_analysis(analysis, 2 / L)
    assert plan.pruned_blocks == (0, 1)
    assert plan.layer_map[0] is None and plan.layer_map[1] is not None
    assert "donor_rule" in dict(plan.notes)
    assert Plan.from_json(plan.to_json()) == plan
    kept = plan_from_analysis(analysis, 2 / L, keep_donors=True)
    assert None not in kept.layer_map
    # a weight-space metric has no no-donor column: every slot keeps its donor
    weight = dict(analysis, share_error={"relative": analysis["share_error"]["function"]},
                  donor_suggestion={"metric": "relative", "rank": 8})
    assert None not in plan_from_analysis(weight, 2 / L).layer_map


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_no_donor_linears_skip_their_zero_product_exactly(make):
    """A no-donor slot's linears return zeros without the dense product; the logits are the ones
    the zero weights give through ``nn.Linear``."""
    from torch import nn

    from flexigpt.slots import AbsentLinear

    base = make()
    model = apply_plan(base, _plan(base.config.num_hidden_layers, out_norm="scale"))
    _open_gates(model)
    absent = [m for m in model.modules() if is_absent(m)]
    assert absent and all(type(m) is AbsentLinear for m in absent)
    ids = torch.randint(0, base.config.vocab_size, (2, 10))
    with torch.no_grad():
        skipped = model(ids).logits
        for m in absent:
            m.__class__ = nn.Linear
        dense = model(ids).logits
    assert torch.equal(skipped, dense)


def test_a_hand_pruned_block_follows_the_no_donor_suggestion():
    from flexigpt.plan import plan_from_analysis, suggests_no_donor

    L = 6
    analysis = _function_analysis(L, 0.5, [0.3, 0.9, 0.9, 0.9, 0.1, 0.9])
    plan = plan_from_analysis(analysis, 2 / L)
    assert suggests_no_donor(analysis, plan, 4)  # 0.1 alone beats 0.5 with any donor
    assert not suggests_no_donor(analysis, plan, 3)
    assert not suggests_no_donor(analysis, plan.with_method("drop"), 4)  # only flexigpt slots
    assert not suggests_no_donor(None, plan, 4)
    without = {k: v for k, v in analysis.items() if k != "share_error"}
    assert suggests_no_donor(without, plan, 3)  # nothing measured: no donor, the measured default


def test_cli_drop_follows_the_analysis_suggestion(tmp_path, capsys, tiny_folder):
    """`plan --analysis A --drop B` gives B the analysis' choice, as the proposal and the app's "auto" do."""
    from flexigpt.cli import main

    L = 6
    analysis = dict(_function_analysis(L, 0.5, [0.3, 0.9, 0.9, 0.9, 0.1, 0.9]), model=str(tiny_folder))
    (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    out = tmp_path / "p.json"
    assert main(["plan", "--analysis", str(tmp_path), "--ratio", str(1 / L), "--drop", "4,3", "--out", str(out)]) == 0
    lm = json.loads(out.read_text())["layer_map"]
    assert lm[0] is None and lm[4] is None  # fitted better alone (0.3, 0.1 < 0.5)
    assert lm[3] is not None and lm[3] not in (0, 3, 4)
    assert main(["plan", "--analysis", str(tmp_path), "--ratio", str(1 / L), "--drop", "4", "--keep-donors",
                 "--out", str(out)]) == 0
    assert None not in json.loads(out.read_text())["layer_map"]
    assert main(["plan", "--analysis", str(tmp_path), "--ratio", str(1 / L), "--drop", "4", "--donor", "4=5",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["layer_map"][4] == 5  # a hand-given donor wins
    capsys.readouterr()
