"""Iterative block selection (SLEB): greedy removals, exact perplexities, disk cache (tiny models)."""
from __future__ import annotations

import pytest
import torch

from flexigpt import evaluate
from flexigpt.arch import arch_of, get_blocks, set_blocks
from flexigpt.scoring import ppl_drop
from flexigpt.selection import MAX_TOKENS, SelectionResult, iterative_selection
from flexigpt.surgery import structural_copy


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))


def _ids(n=4, t=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _make_identity(model, i):
    block = get_blocks(model)[i]
    with torch.no_grad():
        for path in arch_of(model).out_linears:
            linear = block.get_submodule(path)
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def _own_text(model, n=4, t=16):
    """Sharpen the LM head and decode the model's own greedy text: then every block that computes
    something raises the perplexity when removed, and only a block that computes nothing does not."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    prompt = _ids(n, 2)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=t - 2,
                          min_new_tokens=t - 2, do_sample=False, pad_token_id=1)


def _without(model, removed):
    cut = structural_copy(model)
    blocks = list(get_blocks(cut))
    set_blocks(cut, [b for i, b in enumerate(blocks) if i not in set(removed)])
    return cut


def test_identity_block_is_removed_first(tiny_model):
    _make_identity(tiny_model, 4)
    result = iterative_selection(tiny_model, _own_text(tiny_model), 1, cache=False)
    assert result.order == (4,)
    assert result.ppl[0] == pytest.approx(result.base_ppl, rel=1e-5)


def test_perplexities_are_those_of_the_cut_models(tiny_model):
    ids = _ids()
    result = iterative_selection(tiny_model, ids, 3, batch_size=3, cache=False)
    assert len(result.order) == len(set(result.order)) == 3
    assert result.tokens == 4 * 15
    assert result.base_ppl == pytest.approx(evaluate.perplexity(tiny_model, ids).ppl, rel=1e-4)
    for n in range(1, 4):
        cut = _without(tiny_model, result.order[:n])
        assert result.ppl[n - 1] == pytest.approx(evaluate.perplexity(cut, ids).ppl, rel=1e-4)
    # the model itself is untouched
    assert len(get_blocks(tiny_model)) == 6
    assert [b.self_attn.layer_idx for b in get_blocks(tiny_model)] == list(range(6))


def test_each_round_is_the_best_single_removal(tiny_model):
    ids = _ids()
    result = iterative_selection(tiny_model, ids, 2, shortlist=0, cache=False)  # exact SLEB
    first = ppl_drop(tiny_model, ids)
    assert result.order[0] == min(range(6), key=lambda i: (first.ppl[i], i))
    cut = _without(tiny_model, result.order[:1])
    rest = [i for i in range(6) if i != result.order[0]]
    second = {b: evaluate.perplexity(_without(tiny_model, [result.order[0], b]), ids).ppl for b in rest}
    assert result.order[1] == min(second, key=lambda b: (second[b], b))
    assert len(get_blocks(cut)) == 5


def test_screening_finishes_the_best_screened_blocks(tiny_model):
    """Round one of the screened search: every block is tried on the first two windows, the three
    best of those are measured on all four, and the best of the three is removed."""
    ids = _ids()
    result = iterative_selection(tiny_model, ids, 1, shortlist=3, screen_windows=2, cache=False)
    screened = {b: evaluate.perplexity(_without(tiny_model, [b]), ids[:2]).ppl for b in range(6)}
    short = sorted(screened, key=lambda b: (screened[b], b))[:3]
    full = {b: evaluate.perplexity(_without(tiny_model, [b]), ids).ppl for b in short}
    assert result.order[0] == min(full, key=lambda b: (full[b], b))
    assert result.ppl[0] == pytest.approx(full[result.order[0]], rel=1e-4)


@pytest.mark.parametrize("screen_windows", [1, 2, 3])
def test_a_shortlist_of_every_block_is_exact_sleb(tiny_model, screen_windows):
    ids = _ids()
    exact = iterative_selection(tiny_model, ids, 4, shortlist=0, cache=False)
    wide = iterative_selection(tiny_model, ids, 4, shortlist=6, screen_windows=screen_windows, cache=False)
    assert wide.order == exact.order
    assert wide.ppl == pytest.approx(exact.ppl, rel=1e-5)
    # as many screening windows as windows: no screening at all
    assert iterative_selection(tiny_model, ids, 2, shortlist=1, screen_windows=4, cache=False).order == exact.order[:2]


def test_screened_and_exact_orders_are_cached_apart(tiny_model):
    ids = _ids()
    iterative_selection(tiny_model, ids, 2, shortlist=0)
    assert not iterative_selection(tiny_model, ids, 2, shortlist=1, screen_windows=1).cached
    assert iterative_selection(tiny_model, ids, 2, shortlist=0).cached
    assert not iterative_selection(tiny_model, ids, 2, shortlist=2, screen_windows=1).cached


def test_opt(tiny_opt_model):
    _make_identity(tiny_opt_model, 2)
    ids = _own_text(tiny_opt_model)
    result = iterative_selection(tiny_opt_model, ids, 2, cache=False)
    assert result.order[0] == 2
    cut = _without(tiny_opt_model, result.order)
    assert result.ppl[1] == pytest.approx(evaluate.perplexity(cut, ids).ppl, rel=1e-4)


def test_cache_serves_prefixes_and_resumes(tiny_model):
    ids = _ids()
    fresh = iterative_selection(tiny_model, ids, 4, cache=False)
    short = iterative_selection(tiny_model, ids, 2)
    assert not short.cached and short.order == fresh.order[:2]
    again = iterative_selection(tiny_model, ids, 1)
    assert again.cached and again.order == fresh.order[:1] and again.ppl == fresh.ppl[:1]
    longer = iterative_selection(tiny_model, ids, 4)  # resumes from the two cached removals
    assert not longer.cached and longer.order == fresh.order
    assert longer.ppl == pytest.approx(fresh.ppl, rel=1e-5)
    assert iterative_selection(tiny_model, ids, 3).cached
    other = iterative_selection(tiny_model, _ids(seed=1), 1)  # other windows: another cache entry
    assert not other.cached
    assert SelectionResult.from_dict(longer.to_dict()).order == longer.order


def test_callback_and_bar(tiny_model):
    seen = []
    iterative_selection(tiny_model, _ids(2, 8), 2, callback=lambda f, m: seen.append((f, m)), progress=True,
                        cache=False)
    assert len(seen) == 6 + 5 + 1  # one per candidate, then "done" (two windows: no screening)
    assert seen[-1][0] == 1.0 and all(0 < f <= 1.0 for f, _ in seen)


@pytest.mark.parametrize("n", [0, 6, -1, 2.0, True])
def test_bad_counts_are_refused(n, tiny_model):
    with pytest.raises(ValueError, match=r"outside 1\.\.5"):
        iterative_selection(tiny_model, _ids(2, 8), n, cache=False)


def test_bad_windows_are_refused(tiny_model):
    with pytest.raises(ValueError, match=str(MAX_TOKENS)):
        iterative_selection(tiny_model, torch.zeros(2, MAX_TOKENS, dtype=torch.long), 1, cache=False)
    with pytest.raises(ValueError, match="windows"):
        iterative_selection(tiny_model, torch.zeros(4, dtype=torch.long), 1, cache=False)
    with pytest.raises(ValueError, match="batch_size"):
        iterative_selection(tiny_model, _ids(), 1, batch_size=0, cache=False)
    with pytest.raises(ValueError, match="shortlist must be an integer >= 0, got -1"):
        iterative_selection(tiny_model, _ids(), 1, shortlist=-1, cache=False)
    with pytest.raises(ValueError, match="screen_windows must be an integer >= 1, got 0"):
        iterative_selection(tiny_model, _ids(), 1, screen_windows=0, cache=False)
