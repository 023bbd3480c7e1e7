"""Methods ``replaceme`` and ``streamline`` through the plan, the pipeline and the exports."""
from __future__ import annotations

import json

import pytest
import torch

from flexigpt.export import load_compact, save_compact, save_merged
from flexigpt.methods import get_method
from flexigpt.methods.replaceme import RIDGE_SCALE
from flexigpt.params import estimate_params, measure_params
from flexigpt.pipeline import build, needs_calibration
from flexigpt.plan import Plan
from flexigpt.replaceme import replaceme
from flexigpt.spans import lowest_spans, runs
from flexigpt.surgery import apply_plan
from flexigpt.trainable import trainable_parameters
from tiny import tiny_llama


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def calib(base):
    return torch.randint(0, base.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(3))


def _span_plan(method: str, spans) -> Plan:
    return get_method(method).with_spans(Plan.identity("tiny", 6), spans)


def test_span_plans_round_trip_and_follow_the_editor():
    plan = _span_plan("replaceme", [(3, 5), (1, 2)])
    assert plan.spans == ((1, 2), (3, 5)) and plan.layer_map == (0, 2, 5)
    assert plan.pruned_blocks == plan.unstored_blocks == plan.removed_blocks == (1, 3, 4)
    obj = json.loads(plan.to_json())
    assert obj["format_version"] == 4 and obj["spans"] == [[1, 2], [3, 5]]
    assert Plan.from_json(plan.to_json()) == plan
    # editing one block recomputes the spans as the maximal runs of the pruned blocks
    assert plan.drop(2).spans == ((1, 5),) and plan.keep(4).spans == ((1, 2), (3, 4))
    assert plan.with_method("drop").layer_map == (0, 2, 5) and plan.with_method("drop").spans is None
    s = _span_plan("streamline", [(0, 3)])
    assert s.layer_map == (0, 3, 4, 5) and s.removed_blocks == (1, 2) and s.unstored_blocks == (0, 1, 2)
    assert runs({5, 1, 2, 4}) == [(1, 3), (4, 6)]


@pytest.mark.parametrize("spans, fragment", [
    ([(2, 4), (3, 5)], "overlaps"),
    ([(4, 7)], "out of range"),
    ([(0, 6)], "whole model"),
    ([(0, 2)], "starts at block 0"),  # replaceme only
])
def test_bad_spans_are_refused_with_a_message(spans, fragment):
    obj = json.loads(_span_plan("replaceme", [(1, 2)]).to_json())
    with pytest.raises(ValueError, match=fragment):
        Plan.from_dict({**obj, "spans": [list(s) for s in spans]})


def test_plan_json_refuses_spans_for_other_methods_and_old_formats():
    obj = json.loads(_span_plan("replaceme", [(1, 3)]).to_json())
    with pytest.raises(ValueError, match="spans are only valid with method"):
        Plan.from_dict({**obj, "method": "drop"})
    with pytest.raises(ValueError, match="needs plan format_version 4"):
        Plan.from_dict({**obj, "format_version": 3})
    with pytest.raises(ValueError, match="follows from its spans"):
        Plan.from_dict({**obj, "layer_map": [0, 1, 3, 4, 5]})
    with pytest.raises(ValueError, match="names the spans"):
        Plan.from_dict({**obj, "spans": None})


def test_replaceme_build_equals_the_fitted_model_and_stores_a_plain_drop(base, calib, tmp_path):
    plan = _span_plan("replaceme", [(2, 4)])
    assert needs_calibration(plan)
    report = {}
    model = build(base, plan, calibration=calib, report=report)
    reference = replaceme(base, [(2, 4)], calib, ridge_scale=RIDGE_SCALE)
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, reference(calib).logits, rtol=0, atol=0)
        # the base is unchanged and the map did something (below a plain drop's error on its fit data)
        assert report["spans"][0]["error_vs_drop"] < 1
    drop = apply_plan(base, plan.with_method("drop"))
    assert measure_params(model).stored == measure_params(drop).stored == estimate_params(plan, base).stored
    save_compact(model, plan, None, tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "c").model(calib).logits, model(calib).logits)
    save_merged(model, plan, None, tmp_path / "m")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert plain.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(plain(calib).logits, model(calib).logits, rtol=1e-5, atol=1e-5)


def test_streamline_build_trains_its_span_block_and_reloads(base, calib, tmp_path):
    plan = _span_plan("streamline", [(1, 4)])
    before = {n: p.clone() for n, p in base.named_parameters()}
    report = {}
    model = build(base, plan, calibration=calib, fit_steps=5, report=report)
    fit = report["spans"][0]
    assert fit["span"] == [1, 4] and fit["r2"] >= fit["r2_start"] - 1e-6
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # the base is never trained
    trainable = trainable_parameters(model)
    assert trainable and all(".layers.1." in n for n, _ in trainable)  # only the span's block
    counts = measure_params(model)
    assert counts == estimate_params(plan, base)
    save_compact(model, plan, None, tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "c").model(calib).logits, model(calib).logits)


def test_ridge_pulls_the_map_toward_the_identity(base, calib):
    """A huge ridge gives T = I (the plain drop), never T = 0; no ridge gives least squares."""
    from flexigpt.replaceme import fit_span

    free, tight = fit_span(base, (2, 4), calib), fit_span(base, (2, 4), calib, ridge_scale=1e9)
    eye = torch.eye(free.transform.shape[0], dtype=torch.float64)
    assert torch.allclose(tight.transform, eye, atol=1e-6) and tight.error_vs_drop == pytest.approx(1.0, abs=1e-5)
    assert free.error_vs_drop <= tight.error_vs_drop
    with pytest.raises(ValueError, match=r"ridge_scale must be a finite number >= 0, got -1"):
        fit_span(base, (2, 4), calib, ridge_scale=-1.0)


def test_lowest_spans_skip_block_zero_for_replaceme():
    row = [0.01, 0.2, 0.05, 0.3, 0.4]  # spans of 2 blocks in a 6-block model start at 0..4
    assert lowest_spans(row, 2, 6) == [(2, 4)]
    assert lowest_spans(row, 2, 6, allow_first=True) == [(0, 2)]
    with pytest.raises(ValueError, match="do not fit"):
        lowest_spans(row, 2, 6, count=3)
