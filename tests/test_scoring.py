"""Block scores: BI, span angular distance, similarity, remove-one perplexity (tiny models)."""
from __future__ import annotations

import math

import pytest
import torch

from flexigpt.arch import get_blocks
from flexigpt.scoring import BlockScores, ppl_drop, score_blocks


def _ids(n=4, t=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _make_identity(model, i):
    block = get_blocks(model)[i]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_identity_block_scores_zero_and_is_pruned_first(tiny_model):
    _make_identity(tiny_model, 3)
    s = score_blocks(tiny_model, _ids())
    assert isinstance(s, BlockScores)
    assert s.block_influence.shape == (6,)
    assert abs(float(s.block_influence[3])) < 1e-5
    assert s.prune_order()[0] == 3
    assert float(s.angular_distance[0, 3]) < 2e-3  # acos near 1 is steep; still tiny
    assert float(s.similarity[2, 3]) == pytest.approx(1.0, abs=1e-5)  # output of block 3 == output of block 2


def test_shapes_spans_and_consistency(tiny_model):
    s = score_blocks(tiny_model, _ids(), max_span=3)
    L = 6
    assert s.angular_distance.shape == (3, L)
    assert [len(r) for r in s.angular_rows()] == [6, 5, 4]
    assert torch.isnan(s.angular_distance[2, 4:]).all()
    assert s.similarity.shape == (L, L)
    assert torch.allclose(s.similarity, s.similarity.T, atol=1e-6)
    assert torch.allclose(torch.diagonal(s.similarity), torch.ones(L), atol=1e-5)
    assert s.tokens == 4 * 16
    assert ((s.angular_distance[~torch.isnan(s.angular_distance)] >= 0) & (s.angular_distance[~torch.isnan(s.angular_distance)] <= 1)).all()
    frame = s.to_frame()
    assert list(frame["block"]) == list(range(L)) and sorted(frame["prune_rank"]) == list(range(L))


def test_matches_a_plain_hook_reference(tiny_model):
    ids = _ids(n=2, t=12)
    seen = {}
    blocks = get_blocks(tiny_model)
    hs = [b.register_forward_hook(lambda m, a, k, o, i=i: seen.__setitem__(i, (k.get("hidden_states", a[0] if a else None), o)), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        tiny_model(input_ids=ids)
    for h in hs:
        h.remove()
    ref = torch.stack([1 - torch.nn.functional.cosine_similarity(seen[i][0], seen[i][1], dim=-1).mean() for i in range(6)])
    s = score_blocks(tiny_model, ids, batch_size=1)
    assert torch.allclose(s.block_influence, ref, atol=1e-5)


def test_padding_does_not_change_scores(tiny_model):
    ids = _ids(n=3, t=10)
    lengths = [10, 6, 8]
    padded = torch.full((3, 14), 1)
    mask = torch.zeros(3, 14, dtype=torch.long)
    for r, n in enumerate(lengths):
        padded[r, :n] = ids[r, :n]
        mask[r, :n] = 1
    ref_tokens = [score_blocks(tiny_model, ids[r : r + 1, :n]) for r, n in enumerate(lengths)]
    total = sum(lengths)
    ref_bi = sum(s.block_influence * s.tokens for s in ref_tokens) / total
    ref_sim = sum(s.similarity * s.tokens for s in ref_tokens) / total
    s = score_blocks(tiny_model, padded, attention_mask=mask)
    assert s.tokens == total
    assert torch.allclose(s.block_influence, ref_bi, atol=1e-5)
    assert torch.allclose(s.similarity, ref_sim, atol=1e-5)
    unmasked = score_blocks(tiny_model, padded)
    assert not torch.allclose(unmasked.block_influence, ref_bi, atol=1e-4)


def test_opt_scores(tiny_opt_model):
    s = score_blocks(tiny_opt_model, _ids(n=2, t=8))
    assert s.block_influence.shape == (4,) and torch.isfinite(s.block_influence).all()


def test_bad_inputs_raise(tiny_model):
    with pytest.raises(ValueError, match="max_span 7"):
        score_blocks(tiny_model, _ids(), max_span=7)
    with pytest.raises(ValueError, match="masks every token"):
        score_blocks(tiny_model, _ids(n=1), attention_mask=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        score_blocks(tiny_model, torch.zeros(5, dtype=torch.long))


def test_ppl_drop_identity_block_costs_nothing_and_model_is_restored(tiny_model):
    _make_identity(tiny_model, 2)
    blocks_before = list(get_blocks(tiny_model))
    ids = _ids(n=2, t=12)
    d = ppl_drop(tiny_model, ids)
    assert d.samples == 2 and d.seq_len == 12 and d.tokens == 2 * 11
    assert len(d.ppl) == 6 and abs(d.nll_increase[2]) < 1e-5
    assert d.ppl[2] == pytest.approx(d.base_ppl, rel=1e-5)
    assert all(math.isfinite(p) for p in d.ppl)
    assert list(get_blocks(tiny_model)) == blocks_before
