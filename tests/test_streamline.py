"""LLM-Streamline: one trained block per span, on cached activations of the original (tiny models)."""
from __future__ import annotations

import pytest
import torch

from flexigpt.arch import get_blocks, set_blocks
from flexigpt.streamline import streamline
from flexigpt.surgery import structural_copy


def _ids(n=8, t=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def _r2(pred, target):
    pred, target = pred.double().flatten(0, 1), target.double().flatten(0, 1)
    sst = ((target - target.mean(0)) ** 2).sum()
    return float(1 - ((pred - target) ** 2).sum() / sst)


def test_training_raises_r2_and_leaves_the_base_untouched(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    seen = []
    result = streamline(tiny_model, [(2, 4)], _ids(), steps=60, lr=1e-3,
                        progress=lambda f, m: seen.append((f, m)))
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(get_blocks(tiny_model)) == 6 and tiny_model.config.num_hidden_layers == 6
    fit, = result.fits
    assert fit.span == (2, 4) and len(fit.losses) == 60
    assert fit.r2 > fit.r2_start + 0.05
    assert fit.r2 > fit.r2_drop
    assert fit.losses[-1] < fit.losses[0]
    assert seen[-1][0] == 1.0 and all(0.0 <= f <= 1.0 for f, _ in seen)
    new = result.model
    assert new.config.num_hidden_layers == 5
    assert [b.self_attn.layer_idx for b in get_blocks(new)] == list(range(5))
    # the replacement owns its tensors; the kept blocks share the base's
    base_ptrs = {p.data_ptr() for p in tiny_model.parameters()}
    assert not any(p.data_ptr() in base_ptrs for p in get_blocks(new)[2].parameters())
    assert all(p.data_ptr() in base_ptrs for p in get_blocks(new)[3].parameters())


def test_reported_r2_is_the_cut_models_own(tiny_model):
    ids = _ids()
    result = streamline(tiny_model, [(1, 4)], ids, steps=20, lr=1e-3)
    orig, cut = _hidden(tiny_model, ids), _hidden(result.model, ids)
    # slot 1 of the cut model stands in for blocks 1..3: its output is compared with the original's after block 3
    assert _r2(cut[2], orig[4]) == pytest.approx(result.fits[0].r2, abs=1e-4)


def test_untrained_copy_equals_dropping_the_rest_of_the_span(tiny_model):
    ids = _ids(4, 16)
    result = streamline(tiny_model, [(2, 4)], ids, steps=0)
    drop = structural_copy(tiny_model)
    blocks = list(get_blocks(drop))
    set_blocks(drop, blocks[:3] + blocks[4:])
    with torch.no_grad():
        got = result.model(input_ids=ids, use_cache=False).logits
        ref = drop(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert result.fits[0].r2 == pytest.approx(result.fits[0].r2_start)


def test_several_spans_and_block_zero(tiny_model):
    result = streamline(tiny_model, [(3, 5), (0, 2)], _ids(), steps=5, lr=1e-3)
    assert [f.span for f in result.fits] == [(0, 2), (3, 5)]
    assert [b._flexigpt_source for b in get_blocks(result.model)] == [0, 2, 3, 5]
    assert len(result.r2) == 2


def test_opt(tiny_opt_model):
    result = streamline(tiny_opt_model, [(1, 3)], _ids(), steps=30, lr=1e-3)
    assert len(get_blocks(result.model)) == 3
    assert result.fits[0].r2 > result.fits[0].r2_start


@pytest.mark.parametrize("kwargs, words", [
    ({"spans": [(1, 3), (2, 4)]}, "overlaps"),
    ({"spans": [(0, 6)]}, "whole model"),
    ({"spans": [(5, 8)]}, "out of range"),
    ({"steps": -1}, "steps"),
    ({"lr": 0.0}, "lr"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_input_is_refused(kwargs, words, tiny_model):
    args = {"spans": [(1, 3)], **kwargs}
    with pytest.raises(ValueError, match=words):
        streamline(tiny_model, args.pop("spans"), _ids(2, 8), **args)
