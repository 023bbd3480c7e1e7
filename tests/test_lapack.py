"""The GIL-free Gram and partial eigensolver agree with torch, on the native and the fallback route."""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import torch

from flexigpt import lapack
from flexigpt.lowrank import pair_residuals, residual_from_svdvals

ROUTES = [pytest.param(True, id="native"), pytest.param(False, id="torch")]


def _sym(g: np.ndarray) -> np.ndarray:
    """The full matrix from the triangle ``gram`` writes (C-order lower = column-major upper)."""
    low = np.tril(g)
    return low + low.T - np.diag(np.diag(low))


@pytest.fixture(autouse=True)
def _native_available():
    assert lapack.NATIVE, "SciPy's Cython BLAS/LAPACK should be reachable in the pinned environment"


@pytest.mark.parametrize("native", ROUTES)
def test_gram_equals_dt_d(native):
    d = np.random.default_rng(0).standard_normal((40, 17)).astype(np.float32)
    ref = d.astype(np.float64).T @ d
    assert np.allclose(_sym(lapack.gram(d, native=native)), ref, rtol=1e-5, atol=1e-4)
    out = np.full((17, 17), np.nan, dtype=np.float32)
    assert lapack.gram(d, out=out, native=native) is out
    assert np.allclose(_sym(out), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("native", ROUTES)
def test_top_eigh_values_and_vectors(native):
    d = np.random.default_rng(1).standard_normal((30, 12)).astype(np.float32)
    ref_vals, ref_vecs = np.linalg.eigh(d.astype(np.float64).T @ d)
    vals = lapack.top_eigh(lapack.gram(d, native=native), 4, native=native)
    assert np.allclose(vals, ref_vals[-4:], rtol=1e-5)
    vals, vecs = lapack.top_eigh(lapack.gram(d, native=native), 4, vectors=True, native=native)
    assert vecs.shape == (12, 4)
    assert np.allclose(vals, ref_vals[-4:], rtol=1e-5)
    # eigenvectors up to sign
    assert np.allclose(np.abs((vecs.T @ ref_vecs[:, -4:]).diagonal()), 1.0, atol=1e-4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="float32"):
        lapack.gram(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="C-contiguous"):
        lapack.gram(np.zeros((3, 4), dtype=np.float32).T)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 2\)"):
        lapack.gram(np.zeros((3, 2), dtype=np.float32), out=np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="k=5 must be in 1..4"):
        lapack.top_eigh(np.eye(4, dtype=np.float32), 5)


def test_parallel_calls_give_the_serial_results():
    rng = np.random.default_rng(2)
    mats = [rng.standard_normal((64, 48)).astype(np.float32) for _ in range(8)]

    def run(d):
        return lapack.top_eigh(lapack.gram(d), 6)

    serial = [run(d) for d in mats]
    with lapack.blas_single_thread(), cf.ThreadPoolExecutor(2) as pool:
        parallel = list(pool.map(run, mats))
    for a, b in zip(serial, parallel):
        assert np.array_equal(a, b)


def test_residuals_agree_on_both_routes(monkeypatch):
    w = torch.randn(4, 20, 12, generator=torch.Generator().manual_seed(4))
    pairs = [(0, 1), (1, 3), (2, 0)]
    native, _ = pair_residuals(w, pairs, (2, 6))
    monkeypatch.setattr(lapack, "NATIVE", False)
    fallback, _ = pair_residuals(w, pairs, (2, 6))
    d = torch.stack([w[i].double() - w[j].double() for i, j in pairs])
    ref = residual_from_svdvals(torch.linalg.svdvals(d), (2, 6))
    assert torch.allclose(native, ref, rtol=1e-5)
    assert torch.allclose(fallback, ref, rtol=1e-5)


@pytest.mark.slow
def test_embedded_model_residuals_equal_float64_svdvals(smollm):
    """The exactness target on real weights: every matrix shape of SmolLM2, within 1e-4 relative."""
    from flexigpt.sharing import block_weights

    weights = block_weights(smollm.model)
    pairs = [(3, 4), (12, 25), (0, 29)]
    for name in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        w = weights[name]
        res, dnorm = pair_residuals(w, pairs, (8, 32))
        d = torch.stack([w[i].double() - w[j].double() for i, j in pairs])
        ref = residual_from_svdvals(torch.linalg.svdvals(d), (8, 32))
        assert float(((res - ref).abs() / ref).max()) < 1e-4, name
        assert torch.allclose(dnorm, d.pow(2).sum((-2, -1)).sqrt(), rtol=1e-5), name


def test_a_solver_failure_falls_back_to_float64(monkeypatch):
    w = torch.randn(3, 14, 10, generator=torch.Generator().manual_seed(5))
    pairs = [(0, 1), (1, 2)]
    good, _ = pair_residuals(w, pairs, (3,))

    def fail(*args, **kwargs):
        raise np.linalg.LinAlgError("ssyevr did not converge (info=1, found 0 of 3)")

    monkeypatch.setattr(lapack, "top_eigh", fail)
    again, _ = pair_residuals(w, pairs, (3,))
    assert torch.allclose(good, again, rtol=1e-5)
