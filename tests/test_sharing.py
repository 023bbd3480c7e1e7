"""Share-error matrices on tiny models and donor matching."""
from __future__ import annotations

import math

import pytest
import torch

from flexigpt.arch import arch_of, block_linears, get_blocks
from flexigpt.sharing import block_weights, choose_donors, degeneracy_warning, max_rank, share_error


def _make_rank1_copy(model, target, donor, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = arch_of(model)
    blocks = get_blocks(model)
    tgt, src = block_linears(blocks[target], spec), block_linears(blocks[donor], spec)
    with torch.no_grad():
        for name, lin in tgt.items():
            out, inp = lin.weight.shape
            delta = 0.05 * torch.randn(out, 1, generator=g) @ torch.randn(1, inp, generator=g)
            lin.weight.copy_(src[name].weight + delta)


def test_rank1_delta_is_matched_to_its_donor(tiny_model):
    _make_rank1_copy(tiny_model, target=4, donor=2)
    se = share_error(tiny_model, (1, 8))
    assert se.pairs == "all" and se.rows == tuple(range(6))
    for r in (1, 8):
        assert float(se.absolute[r][4, 2]) < 1e-4
        assert float(se.absolute[r][2, 4]) < 1e-4  # symmetric in the D form
        assert math.isnan(float(se.absolute[r][3, 3]))  # diagonal not computed
    for metric in ("absolute", "relative", "paper"):
        m = torch.nan_to_num(se.metric(metric, 8), nan=float("inf"))
        assert choose_donors(m, [4]) == {4: 2}, metric
    # per-matrix relative errors average to the aggregated relative matrix
    mean = torch.stack([se.per_matrix_relative[8][n] for n in se.matrices]).mean(0)
    assert torch.allclose(mean[0, 1], se.relative[8][0, 1])


def test_subset_only_fills_pruned_rows_and_kept_columns(tiny_model):
    full = share_error(tiny_model, (4,))
    sub = share_error(tiny_model, (4,), pruned=[1, 3])
    assert sub.pairs == "subset" and sub.rows == (1, 3) and sub.cols == (0, 2, 4, 5)
    for i in range(6):
        for j in range(6):
            v = float(sub.absolute[4][i, j])
            if i in (1, 3) and j in (0, 2, 4, 5):
                assert v == pytest.approx(float(full.absolute[4][i, j]), rel=1e-5)
                assert float(sub.paper[4][i, j]) == pytest.approx(float(full.paper[4][i, j]), rel=1e-5)
            else:
                assert math.isnan(v)


def test_opt_has_six_matrices(tiny_opt_model):
    se = share_error(tiny_opt_model, (2,), paper=False)
    assert len(se.matrices) == 6 and se.paper == {}


def test_bad_settings_raise(tiny_model):
    w = block_weights(tiny_model)
    limit = max_rank(w)  # k/v: 32 x 64 in the tiny GQA model
    assert limit == 32
    with pytest.raises(ValueError, match=f"rank {limit + 1} is outside 1..{limit}"):
        share_error(w, (limit + 1,))
    with pytest.raises(ValueError, match="rank 0"):
        share_error(w, (0,))
    with pytest.raises(ValueError, match=r"pruned blocks \[9\]"):
        share_error(w, (2,), pruned=[9])
    se = share_error(w, (2,), pruned=[0], paper=False)
    with pytest.raises(ValueError, match="unknown donor metric 'cosine'"):
        se.metric("cosine", 2)
    with pytest.raises(ValueError, match="rank 3 was not computed"):
        se.metric("relative", 3)


def test_degeneracy_warning_on_a_single_donor():
    assert degeneracy_warning({1: 0, 2: 0, 3: 0}) is not None
    assert degeneracy_warning({1: 0, 2: 4, 3: 5}) is None
