"""Exact share-error residuals, the paper variant, and the rank-r factorisation."""
from __future__ import annotations

import pytest
import torch

from flexigpt.lowrank import pair_residuals, paper_residuals, residual_from_svdvals, svd_factor, top_factors


def _stack(L=5, out=24, inp=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, out, inp, generator=g)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (16, 16)])
def test_exact_residual_equals_svdvals_route(shape):
    w = _stack(out=shape[0], inp=shape[1])
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    res, dnorm = pair_residuals(w, pairs, (1, 4, 16), chunk=3)
    d = torch.stack([w[i].double() - w[j].double() for i, j in pairs])
    ref = residual_from_svdvals(torch.linalg.svdvals(d), (1, 4, 16))
    assert torch.allclose(res, ref, rtol=1e-4, atol=1e-6)
    assert torch.allclose(dnorm, d.pow(2).sum((-2, -1)).sqrt(), rtol=1e-5)
    assert torch.all(res[-1].abs() < 1e-3)  # full rank: nothing left


def test_near_copy_is_redone_exactly_in_float64():
    w = _stack(L=2)
    g = torch.Generator().manual_seed(3)
    delta = 1e-3 * torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g)
    w[1] = w[0] + delta
    res, _ = pair_residuals(w, [(0, 1)], (1, 2, 3))
    stored = w[1].double() - w[0].double()  # the float32 weights hold delta up to rounding
    ref = residual_from_svdvals(torch.linalg.svdvals(stored), (1, 2, 3))
    assert torch.allclose(res[:, 0], ref, rtol=1e-4, atol=1e-9)
    assert float(res[2, 0]) < 1e-6  # rank-3 delta: a rank-3 correction leaves nothing


def test_rank_out_of_range_raises():
    with pytest.raises(ValueError, match="rank 17 is outside 1..16"):
        pair_residuals(_stack(), [(0, 1)], (17,))
    with pytest.raises(ValueError, match="rank 0"):
        paper_residuals(_stack(), [(0, 1)], (0,))
    with pytest.raises(ValueError, match="rank 0"):
        svd_factor(torch.randn(4, 3), 0)


def test_paper_variant_matches_dense_reconstructions():
    w = _stack()
    pairs = [(0, 1), (2, 4), (3, 0)]
    got = paper_residuals(w, pairs, (2, 5))
    for k, (i, j) in enumerate(pairs):
        for ridx, r in enumerate((2, 5)):
            def recon(m):
                u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
                return u[:, :r] * s[:r] @ vh[:r]
            sig = torch.linalg.svdvals(recon(w[i]) - recon(w[j]))
            ref = sig[r : 2 * r].pow(2).sum().sqrt()
            assert float(got[ridx, k]) == pytest.approx(float(ref), rel=1e-4)


def test_top_factors_reconstruct():
    w = _stack(L=2)
    u, s, v = top_factors(w, 16)
    assert torch.allclose((u * s.float()[:, None, :]) @ v.transpose(-2, -1), w, atol=1e-4)


def test_svd_factor_full_rank_reconstructs_and_keeps_dtype():
    d = torch.randn(12, 8)
    a, b = svd_factor(d, 8)
    assert a.shape == (12, 8) and b.shape == (8, 8)
    assert torch.allclose(a @ b, d, atol=1e-5)
    a16, b16 = svd_factor(d.half(), 3)
    assert a16.dtype == torch.float16 and b16.dtype == torch.float16
    err = torch.linalg.matrix_norm(d - (svd_factor(d, 3)[0] @ svd_factor(d, 3)[1]))
    assert float(err) == pytest.approx(float(residual_from_svdvals(torch.linalg.svdvals(d), (3,))[0]), rel=1e-4)


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    pair_residuals(_stack(), [(0, 1), (0, 2), (1, 2)], (2,), chunk=1, workers=2)
    paper_residuals(_stack(), [(0, 1), (1, 2)], (2,), workers=2)
    assert torch.get_num_threads() == before
