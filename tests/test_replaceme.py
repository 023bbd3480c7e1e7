"""ReplaceMe: least-squares span maps, folding, multi-span cuts and span checks (tiny models)."""
from __future__ import annotations

import pytest
import torch

from flexigpt.arch import arch_of, get_blocks, set_blocks
from flexigpt.replaceme import (check_spans, fit_span, fit_transform, fold_transform_, lowest_distance_spans,
                                replaceme)
from flexigpt.scoring import score_blocks
from flexigpt.surgery import structural_copy


def _ids(n=8, t=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _make_identity(model, i):
    spec = arch_of(model)
    block = get_blocks(model)[i]
    with torch.no_grad():
        for path in spec.out_linears:
            linear = block.get_submodule(path)
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _activations(model, ids, span):
    """M, h_s, h_e from plain hooks and output_hidden_states (independent of the library's capture)."""
    s, e = span
    spec = arch_of(model)
    got = {}
    down = get_blocks(model)[s - 1].get_submodule(spec.out_linears[1])
    handle = down.register_forward_hook(lambda m, a, out: got.__setitem__("m", out))
    try:
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()
    d = model.config.hidden_size
    return (got["m"].reshape(-1, d).double(), hs[s].reshape(-1, d).double(), hs[e].reshape(-1, d).double())


def test_fitted_map_equals_lstsq(tiny_model):
    ids = _ids()
    span = (2, 4)
    t = fit_transform(tiny_model, span, ids, batch_size=3)  # batches of uneven size still sum every token
    m, h_s, h_e = _activations(tiny_model, ids, span)
    ref = torch.linalg.lstsq(m, h_e - h_s + m).solution
    assert t.dtype == torch.float64 and t.shape == (64, 64)
    torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-6)


def test_ridge_matches_closed_form(tiny_model):
    ids = _ids()
    m, h_s, h_e = _activations(tiny_model, ids, (1, 3))
    y = h_e - h_s + m
    eye = torch.eye(64, dtype=torch.float64)  # the ridge pulls T toward the identity (the plain drop)
    ref = torch.linalg.solve(m.T @ m + 5.0 * eye, m.T @ y + 5.0 * eye)
    torch.testing.assert_close(fit_transform(tiny_model, (1, 3), ids, ridge=5.0), ref, rtol=1e-7, atol=1e-8)


def test_error_vs_drop_below_one(tiny_model):
    fit = fit_span(tiny_model, (2, 5), _ids())
    assert fit.tokens == 8 * 32
    assert 0.0 <= fit.error_vs_drop < 1.0


@pytest.mark.parametrize("which", ["llama", "opt"])
def test_fold_equals_explicit_map(which, tiny_model, tiny_opt_model):
    model = tiny_model if which == "llama" else tiny_opt_model
    spec = arch_of(model)
    ids = _ids(4, 16)
    t = torch.randn(64, 64, dtype=torch.float64) / 8 + torch.eye(64, dtype=torch.float64)
    explicit = structural_copy(model)
    down = get_blocks(explicit)[1].get_submodule(spec.out_linears[1])
    down.register_forward_hook(lambda m, a, out: (out.double() @ t).to(out.dtype))
    folded = structural_copy(model)
    before = get_blocks(model)[1].get_submodule(spec.out_linears[1]).weight.clone()
    fold_transform_(get_blocks(folded)[1], t)  # spec found from the block's layout
    torch.testing.assert_close(_logits(folded, ids), _logits(explicit, ids), rtol=1e-4, atol=1e-4)
    # new tensors: the base the copy shares its other weights with is untouched
    assert torch.equal(get_blocks(model)[1].get_submodule(spec.out_linears[1]).weight, before)


def test_replaceme_equals_explicit_map_and_cut(tiny_model):
    ids = _ids()
    span = (2, 4)
    t = fit_transform(tiny_model, span, ids)
    explicit = structural_copy(tiny_model)
    down = get_blocks(explicit)[1].mlp.down_proj
    down.register_forward_hook(lambda m, a, out: (out.double() @ t).float())
    blocks = list(get_blocks(explicit))
    set_blocks(explicit, blocks[:2] + blocks[4:])
    new = replaceme(tiny_model, [span], ids)
    torch.testing.assert_close(_logits(new, ids), _logits(explicit, ids), rtol=1e-4, atol=1e-4)
    assert new.config.num_hidden_layers == 4 and len(get_blocks(new)) == 4
    assert [b.self_attn.layer_idx for b in get_blocks(new)] == [0, 1, 2, 3]
    assert [f.span for f in new.replaceme_fits] == [span]


def test_replaceme_leaves_base_untouched_and_stores_a_plain_drop(tiny_model):
    ids = _ids()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    new = replaceme(tiny_model, [(3, 5)], ids)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_model.config.num_hidden_layers == 6 and len(get_blocks(tiny_model)) == 6
    # same parameters as dropping blocks 3 and 4; only block 2's down projection has new values
    drop = structural_copy(tiny_model)
    blocks = list(get_blocks(drop))
    set_blocks(drop, blocks[:3] + blocks[5:])
    assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in drop.state_dict().items()}
    changed = [k for k, v in new.state_dict().items() if not torch.equal(v, drop.state_dict()[k])]
    assert changed == ["model.layers.2.mlp.down_proj.weight"]


def test_identity_span_gives_the_identity_map(tiny_model):
    for i in (2, 3):
        _make_identity(tiny_model, i)
    ids = _ids()
    t = fit_transform(tiny_model, (2, 4), ids)
    torch.testing.assert_close(t, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-6)
    new = replaceme(tiny_model, [(2, 4)], ids)
    torch.testing.assert_close(_logits(new, ids), _logits(tiny_model, ids), rtol=1e-4, atol=1e-4)


def test_several_spans_are_fitted_on_the_cut_model(tiny_model):
    ids = _ids()
    both = replaceme(tiny_model, [(3, 5), (1, 2)], ids)  # any order: fitted in ascending order
    step = replaceme(replaceme(tiny_model, [(1, 2)], ids), [(2, 4)], ids)  # (3, 5) is (2, 4) once block 1 is cut
    assert both.config.num_hidden_layers == 3
    assert [b._flexigpt_source for b in get_blocks(both)] == [0, 2, 5]
    assert [f.span for f in both.replaceme_fits] == [(1, 2), (3, 5)]
    torch.testing.assert_close(_logits(both, ids), _logits(step, ids), rtol=1e-4, atol=1e-4)


def test_opt_bias_is_folded(tiny_opt_model):
    ids = _ids(8, 32)
    new = replaceme(tiny_opt_model, [(1, 3)], ids)
    fc2 = get_blocks(new)[0].fc2
    base_fc2 = get_blocks(tiny_opt_model)[0].fc2
    t = new.replaceme_fits[0].transform
    torch.testing.assert_close(fc2.bias.double(), base_fc2.bias.double() @ t, rtol=1e-5, atol=1e-6)
    assert len(get_blocks(new)) == 2


def test_merged_result_is_a_plain_checkpoint(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = _ids()
    new = replaceme(tiny_model, [(2, 4)], ids)
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(loaded, ids), _logits(new, ids), rtol=0, atol=0)


@pytest.mark.parametrize("spans, words", [
    ([(1, 3), (2, 4)], "overlaps"),
    ([(4, 7)], "out of range"),
    ([(3, 3)], "out of range or empty"),
    ([(-1, 2)], "out of range"),
    ([(0, 6)], "whole model"),
    ([(0, 2)], "block 0"),
    ([(2, 7)], "out of range"),
    ([[1, 2, 3]], "pair"),
    ([(1.0, 2)], "pair"),
    ([], "non-empty"),
])
def test_bad_spans_are_refused(spans, words, tiny_model):
    with pytest.raises(ValueError, match=words):
        check_spans(spans, 6)
    with pytest.raises(ValueError, match=words):
        replaceme(tiny_model, spans, _ids(2, 8))


def test_check_spans_messages_name_span_and_range():
    with pytest.raises(ValueError, match=r"span \[4, 7\).*1 <= start < end <= 6"):
        check_spans([(4, 7)], 6)
    with pytest.raises(ValueError, match=r"span \[2, 4\) overlaps span \[1, 3\)"):
        check_spans([(2, 4), (1, 3)], 6)
    assert check_spans([[3, 5], (1, 2)], 6) == [(1, 2), (3, 5)]
    assert check_spans([(0, 2)], 6, allow_first=True) == [(0, 2)]
    with pytest.raises(ValueError, match="remove all 6 blocks"):
        check_spans([(0, 3), (3, 6)], 6, allow_first=True)


def test_bad_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match="ridge"):
        fit_transform(tiny_model, (1, 2), _ids(2, 8), ridge=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        replaceme(tiny_model, [(1, 2)], _ids(2, 8), batch_size=0)
    with pytest.raises(ValueError, match="windows"):
        replaceme(tiny_model, [(1, 2)], torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        fold_transform_(get_blocks(tiny_model)[0], torch.eye(3))


def test_lowest_distance_spans(tiny_model):
    for i in (3, 4):
        _make_identity(tiny_model, i)
    ids = _ids(4, 16)
    scores = score_blocks(tiny_model, ids)
    assert lowest_distance_spans(scores, 2) == [(3, 5)]
    assert lowest_distance_spans(tiny_model, 2, windows=ids) == [(3, 5)]
    two = lowest_distance_spans(scores.angular_distance, 1, 2)
    assert two == [(3, 4), (4, 5)]
    payload = {"angular_distance": {"values": scores.angular_rows()}}
    assert lowest_distance_spans(payload, 2) == [(3, 5)]
    spans = lowest_distance_spans(scores, 2, 2)
    assert len(spans) == 2 and (3, 5) in spans and all(s >= 1 for s, _ in spans)
    with pytest.raises(ValueError, match="span length 6"):
        lowest_distance_spans(scores, 6)
    with pytest.raises(ValueError, match="do not fit"):
        lowest_distance_spans(scores, 2, 3)
