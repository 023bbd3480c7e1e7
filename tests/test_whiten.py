"""Whitened low-rank fits: the least-squares optimum on real inputs, exact residuals, slot init."""
from __future__ import annotations

import pytest
import torch

from flexigpt.whiten import whitened_factors, whitened_fit, whitened_residuals, whitener


def _problem(d_out=12, d_in=8, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d_in, dtype=torch.float64)  # anisotropic inputs, as activations are
    x = torch.randn(d_in, n, generator=g, dtype=torch.float64) * scales[:, None]
    delta = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return delta, x, x @ x.T / n


@pytest.mark.parametrize("shape", [(12, 8), (6, 8)])
def test_factors_are_the_least_squares_optimum(shape):
    delta, x, C = _problem(*shape)
    r = 3
    B, A = whitened_factors(delta, C, r, damp=0.0)
    assert B.shape == (shape[0], r) and A.shape == (r, shape[1])
    fit = (B.double() @ A.double())
    err = torch.linalg.matrix_norm((delta - fit) @ x)
    # brute force: the best rank-r approximation of delta X, mapped back through X^+ (X has full row rank)
    u, s, vh = torch.linalg.svd(delta @ x, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    assert float(err) == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-5)
    ls = torch.linalg.lstsq(x.T, best.T).solution.T  # L with L X = best
    assert torch.allclose(fit, ls, rtol=1e-4, atol=1e-4 * float(ls.abs().max()))
    # and no rank-r matrix near it does better
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        pb = 1e-2 * torch.randn(B.shape, generator=g, dtype=torch.float64)
        pa = 1e-2 * torch.randn(A.shape, generator=g, dtype=torch.float64)
        other = (B.double() + pb) @ (A.double() + pa)
        assert float(torch.linalg.matrix_norm((delta - other) @ x)) >= float(err) * (1 - 1e-9)


def test_damped_fit_is_the_optimum_on_augmented_inputs():
    delta, x, C = _problem()
    damp, r, n = 0.05, 2, x.shape[1]
    lam = damp * float(torch.diagonal(C).mean())
    aug = torch.cat([x, (lam * n) ** 0.5 * torch.eye(x.shape[0], dtype=torch.float64)], 1)
    B, A = whitened_factors(delta, C, r, damp=damp)
    err = float(torch.linalg.matrix_norm((delta - B.double() @ A.double()) @ aug))
    s = torch.linalg.svdvals(delta @ aug)
    assert err == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-5)


def test_whitener_and_its_validation():
    _, _, C = _problem()
    s = whitener(C, damp=0.1)
    lam = 0.1 * float(torch.diagonal(C).mean())
    assert torch.allclose(s @ s.T, C + lam * torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert torch.equal(s, s.tril())
    assert torch.equal(whitener(torch.zeros(3, 3)), torch.eye(3, dtype=torch.float64))  # a dead input
    singular = torch.ones(4, 4, dtype=torch.float64)  # rank 1: damping makes it positive definite
    assert torch.isfinite(whitener(singular)).all()
    for bad, match in [(1.5, "damp 1.5 is outside 0..1"), (-0.1, "damp -0.1")]:
        with pytest.raises(ValueError, match=match):
            whitener(C, damp=bad)
    with pytest.raises(ValueError, match="square"):
        whitener(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="rank 9 is outside 1..8"):
        whitened_factors(torch.zeros(12, 8), C, 9)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (16, 16)])
def test_residuals_equal_the_explicit_formula(shape):
    g = torch.Generator().manual_seed(1)
    L, (d_out, d_in) = 4, shape
    w = torch.randn(L, d_out, d_in, generator=g)
    whiteners = {}
    for i in range(L):
        x = torch.randn(d_in, 50, generator=g, dtype=torch.float64) * torch.logspace(0, -1, d_in, dtype=torch.float64)[:, None]
        whiteners[i] = whitener(x @ x.T / 50)
    pairs = [(0, 1), (1, 0), (2, 3), (3, None), (0, None)]
    ranks = (1, 4, min(shape))
    got = whitened_residuals(w, whiteners, pairs, ranks, workers=2)
    for k, (i, j) in enumerate(pairs):
        d = w[i].double() - (0 if j is None else w[j].double())
        s = torch.linalg.svdvals(d @ whiteners[i])
        ref = float(torch.linalg.matrix_norm(w[i].double() @ whiteners[i]))
        assert float(got.reference[k]) == pytest.approx(ref, rel=1e-5)
        for ridx, r in enumerate(ranks):
            tail = float(s[r:].pow(2).sum().sqrt())
            assert float(got.absolute[ridx, k]) == pytest.approx(tail, rel=1e-4, abs=1e-4 * ref)
            assert float(got.relative[ridx, k]) == pytest.approx(tail / ref, rel=1e-4, abs=1e-4)
    # not symmetric: block i's own inputs weigh the delta
    assert float(got.absolute[0, 0]) != pytest.approx(float(got.absolute[0, 1]), rel=1e-3)
    # lazily built whiteners: a function is called once per pruned block
    calls = []
    again = whitened_residuals(w, lambda i: calls.append(i) or whiteners[i], pairs, ranks, workers=1)
    assert calls == [0, 1, 2, 3] and torch.allclose(again.absolute, got.absolute, rtol=1e-5)


def test_near_copy_is_redone_in_float64():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 16, 12, generator=g)
    w[1] = w[0] + 1e-3 * torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)
    s = whitener(torch.eye(12, dtype=torch.float64) + 0.1)
    got = whitened_residuals(w, {0: s}, [(0, 1)], (1, 2))
    ref = torch.linalg.svdvals((w[0].double() - w[1].double()) @ s)
    assert float(got.absolute[0, 0]) == pytest.approx(float(ref[1:].pow(2).sum().sqrt()), rel=1e-3)
    assert float(got.absolute[1, 0]) < 1e-6


def test_residual_validation():
    w = torch.randn(3, 8, 6)
    s = {0: torch.eye(6)}
    with pytest.raises(ValueError, match="rank 7 is outside 1..6"):
        whitened_residuals(w, s, [(0, 1)], (7,))
    with pytest.raises(ValueError, match=r"pair \(0, 5\) is out of range 0..2"):
        whitened_residuals(w, s, [(0, 5)], (2,))
    with pytest.raises(ValueError, match=r"expected \(6, 6\)"):
        whitened_residuals(w, {0: torch.eye(5)}, [(0, 1)], (2,))


def test_fit_reports_residual_and_total():
    delta, x, C = _problem()
    s = whitener(C, damp=0.0)
    B, A, residual, total = whitened_fit(delta, s, 8)  # full rank: nothing left
    assert residual == pytest.approx(0.0, abs=1e-8 * total)
    assert torch.allclose(B @ A, delta, atol=1e-8)


def _linear_inputs(model, block_id):
    """Every linear's inputs of one block in one plain pass: {name: (N, d_in) float64}."""
    from flexigpt.arch import arch_of, get_blocks, get_submodule

    spec = arch_of(model)
    seen, handles = {}, []
    for name in spec.matrix_names:
        def hook(module, args, name=name):
            seen[name] = args[0].detach().double().reshape(-1, args[0].shape[-1])
        handles.append(get_submodule(get_blocks(model)[block_id], spec.path_of(name)).register_forward_pre_hook(hook))
    return seen, handles


def test_slot_init_writes_the_whitened_factors(tiny_model):
    from flexigpt.activations import linear_input_moments
    from flexigpt.adapters import base_linear
    from flexigpt.arch import arch_of, get_blocks, get_submodule
    from flexigpt.plan import AdapterSpec, Plan
    from flexigpt.slot_init import slot_factors, whitened_slot_init
    from flexigpt.surgery import apply_plan

    spec = arch_of(tiny_model)
    ids = torch.randint(0, 128, (8, 32))
    built = apply_plan(tiny_model, Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=4)))
    moments = linear_input_moments(tiny_model, ids, blocks=[2, 4])
    report = whitened_slot_init(built, tiny_model, moments, damp=0.0)
    assert sorted(report) == [2, 4] and set(report[2]) == set(spec.matrix_names)
    assert all(0 < v < 2 for per in report.values() for v in per.values())  # random blocks: about sqrt(2)
    seen, handles = _linear_inputs(tiny_model, 2)
    with torch.no_grad():
        tiny_model(input_ids=ids)
    for h in handles:
        h.remove()
    slot, pruned, donor = get_blocks(built)[2], get_blocks(tiny_model)[2], get_blocks(tiny_model)[1]
    for name in spec.matrix_names:
        layer = get_submodule(slot, spec.path_of(name))
        layer = getattr(layer, "inner", layer)
        B, A = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double()
        w_p = base_linear(get_submodule(pruned, spec.path_of(name))).weight.detach().double()
        w_d = base_linear(get_submodule(donor, spec.path_of(name))).weight.detach().double()
        x = seen[name]
        # the slot's linear on the pruned block's own inputs, against the pruned block's linear
        rel = torch.linalg.matrix_norm((w_d + B @ A - w_p) @ x.T) / torch.linalg.matrix_norm(w_p @ x.T)
        assert float(rel) == pytest.approx(report[2][name], rel=1e-3)
        svd = torch.linalg.svdvals((w_p - w_d) @ x.T)  # no rank-4 correction does better on these inputs
        assert float(rel) == pytest.approx(float(svd[4:].pow(2).sum().sqrt() / torch.linalg.matrix_norm(w_p @ x.T)),
                                           rel=1e-3)
    # fewer components than the LoRA's rank: the rest of B starts at zero
    whitened_slot_init(built, tiny_model, moments, rank_by_matrix={"q_proj": 2})
    q = get_submodule(get_blocks(built)[4], spec.path_of("q_proj"))
    assert torch.count_nonzero(q.lora_B["default"].weight[:, 2:]) == 0
    assert torch.count_nonzero(q.lora_B["default"].weight[:, :2]) > 0
    # no donor: at full rank the factors alone reproduce the pruned block
    full = slot_factors(pruned, None, moments[2], {"o_proj": 64, "k_proj": 32}, spec, damp=0.0)
    for name, (B, A) in full.items():
        w_p = base_linear(get_submodule(pruned, spec.path_of(name))).weight
        assert torch.allclose(B @ A, w_p, atol=1e-4)
    with pytest.raises(ValueError, match="rank 5 for q_proj is outside 1..4"):
        whitened_slot_init(built, tiny_model, moments, rank_by_matrix={"q_proj": 5})
    with pytest.raises(ValueError, match=r"missing pruned blocks \[4\]"):
        whitened_slot_init(built, tiny_model, {2: moments[2]})


def test_slot_init_from_windows_on_opt(tiny_opt_model):
    from flexigpt.plan import AdapterSpec, Plan
    from flexigpt.slot_init import whitened_slot_init
    from flexigpt.surgery import apply_plan

    built = apply_plan(tiny_opt_model, Plan("opt", 4, (0, 0, 2, 3), adapter=AdapterSpec(rank=4)))
    ids = torch.randint(0, 128, (4, 16))
    before = built(input_ids=ids).logits
    report = whitened_slot_init(built, tiny_opt_model, ids)
    assert list(report) == [1] and set(report[1]) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert torch.isfinite(built(input_ids=ids).logits).all() and not torch.equal(before, built(input_ids=ids).logits)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("right", [True, False])
def test_lower_product_reads_only_the_lower_triangle(native, right):
    import numpy as np

    from flexigpt import lapack

    rng = np.random.default_rng(0)
    b = rng.standard_normal((7, 5)).astype(np.float32)
    k = 5 if right else 7
    s = rng.standard_normal((k, k)).astype(np.float32)  # the upper triangle must be ignored
    low = np.tril(s).astype(np.float64)
    ref = b @ low if right else low.T @ b
    out = lapack.lower_product(b.copy(), s, right=right, native=native)
    assert np.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="s must have shape"):
        lapack.lower_product(b.copy(), np.ascontiguousarray(s[:3, :3]), right=right)
