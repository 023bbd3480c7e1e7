"""How do I factor a weight delta, and how much of it does a rank-r correction leave behind?

Pure tensor math shared by donor matching (``flexigpt.sharing``) and adapter initialisation.
The central quantity is FlexiGPT's share error: rebuilding block i's matrix from donor j's matrix
plus the best rank-r correction leaves the residual

    e(i, j) = ||D - SVD_r(D)||_F = sqrt(sum_{k>r} sigma_k(D)^2),   D = W_i - W_j,

so only the singular values of D are needed, and every rank comes from one decomposition.
``e(i, j) = e(j, i)``, so each unordered pair is decomposed once.

Why this is fast and still exact (measured on a 2-core CPU, the embedded SmolLM2, 435 pairs x
7 matrices): ``svdvals`` of each D costs about 110 s and a float64 Gram + ``eigvalsh`` about 47 s.
Here the Gram of D is built on the smaller side from cross products, ``G_ij = G_i + G_j - C_ij - C_ij^T``
with ``C_ij = W_i^T W_j`` computed for all donors j of one block i by a single large matrix product,
and its eigenvalues come from float32 ``eigvalsh`` run on two worker threads. float32 is exact to
well below 1e-4 relative as long as the residual keeps a sizeable share of ||D||^2 (different
blocks' weights are nearly orthogonal, so it keeps about 80%); pairs where it does not (near
copies: cancellation in ``G_ij`` or in the tail sum) are recomputed in float64 from D itself.
The residual is ``trace(G_ij) - sum of the top r eigenvalues``: with the residual at about 80% of
the trace there is no cancellation, and where it is below 5% the float64 redo takes over.

The literal paper variant compares rank-r reconstructions ``W^_i - W^_j`` (rank <= 2r) and keeps
``sqrt(sum_{k=r+1..2r} sigma_k^2)``; it is computed from each block's top-r factors and the
cross products ``U_i^T U_j``, ``V_i^T V_j`` only (2r x 2r problems).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Sequence

import torch

try:  # optional: a faster partial eigensolver (SciPy is installed with scikit-learn / lm-eval)
    from scipy.linalg import lapack as _lapack
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover - the torch route is used instead
    _lapack = None
    _threadpool_limits = None

__all__ = [
    "svd_factor",
    "residual_from_svdvals",
    "pair_residuals",
    "paper_residuals",
    "top_factors",
]

# Below this share of ||D||^2 left in the residual (or of ||W_i||^2 + ||W_j||^2 left in ||D||^2),
# float32 loses digits to cancellation and the pair is redone in float64.
_FP64_SHARE = 0.05


def svd_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factorisation of a weight delta, all singular values on the output side.

    Args:
        delta: ``(d_out, d_in)`` matrix (e.g. ``W_pruned - W_donor``).
        rank: number of singular triplets kept, ``1 <= rank <= min(d_out, d_in)``.

    Returns:
        ``(A, B)`` with ``A = (U S)[:, :r]`` of shape ``(d_out, r)`` and ``B = V[:, :r]^T`` of shape
        ``(r, d_in)``, so ``A @ B`` is the truncated SVD (PEFT: ``lora_B = A``, ``lora_A = B``).
        Computed in float32 and returned in ``delta``'s dtype.
    """
    limit = min(delta.shape[-2:])
    if not 1 <= rank <= limit:
        raise ValueError(f"rank {rank} is outside 1..{limit} for a {tuple(delta.shape)} matrix")
    u, s, vh = torch.linalg.svd(delta.detach().float(), full_matrices=False)
    a = u[:, :rank] * s[:rank]
    return a.to(delta.dtype), vh[:rank].to(delta.dtype)


def residual_from_svdvals(sigma: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Reference route: ``sqrt(sum_{k>r} sigma_k^2)`` from singular values sorted descending.

    Args:
        sigma: ``(..., n)`` singular values (``torch.linalg.svdvals`` order).
        ranks: the ranks r.

    Returns:
        ``(len(ranks), ...)`` residuals in float64.
    """
    sq = sigma.double() ** 2
    return torch.stack([sq[..., r:].sum(-1).sqrt() for r in ranks])


def _oriented(w: torch.Tensor) -> torch.Tensor:
    """``(L, m, n)`` with ``m >= n``: the Gram ``W^T W`` is then the small ``n x n`` side."""
    return w if w.shape[-2] >= w.shape[-1] else w.transpose(-2, -1)


def _top_eigvalsh(g: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest eigenvalues (ascending) of each symmetric float32 matrix in ``g``.

    SciPy's LAPACK ``ssyevr`` with an index range skips the eigenvalues we do not need and ran 1.5x
    faster than ``torch.linalg.eigvalsh`` on 576 x 576 Gram matrices (one thread each, measured);
    without SciPy, the full torch route gives the same numbers.
    """
    n = g.shape[-1]
    if _lapack is None or k >= n:
        return torch.linalg.eigvalsh(g)[..., n - k :]
    out = []
    for x in g.numpy():
        # x.T is the same symmetric matrix in Fortran order, so no copy is made.
        w, _, m, _, info = _lapack.ssyevr(x.T, compute_v=0, range="I", il=n - k + 1, iu=n, lower=1)
        if info != 0 or m != k:  # LAPACK did not converge: the full torch route for this one
            out.append(torch.linalg.eigvalsh(torch.from_numpy(x.copy()))[n - k :])
        else:
            out.append(torch.from_numpy(w[:k].copy()))
    return torch.stack(out)


def _tail_sums(eig_ascending: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """``(R, P)`` sums of the smallest ``n - r`` eigenvalues (clamped at 0) in float64."""
    ev = eig_ascending.double().clamp_min(0)
    n = ev.shape[-1]
    return torch.stack([ev[:, : max(n - r, 0)].sum(-1) for r in ranks])


def _parallel_map(fn: Callable, items: Sequence, workers: int) -> list:
    """``[fn(x) for x in items]`` on ``workers`` threads, each running single-threaded torch.

    Why not torch's own threads: LAPACK's tridiagonal reduction of a 576 x 576 matrix is bound by
    memory traffic and barely speeds up with more BLAS threads, and on a busy machine OpenMP barriers
    made a batched ``eigvalsh`` ten times slower (measured). Independent items on separate threads
    scale on 2 cores and overlap the matrix products with the eigenvalue steps. ``torch.set_num_threads``
    is process-wide, so it is restored afterwards.
    """
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    previous = torch.get_num_threads()
    # Limit SciPy's BLAS before torch's: restoring in reverse order gives both their original values.
    limits = _threadpool_limits(1, user_api="blas") if _threadpool_limits is not None else None
    torch.set_num_threads(1)
    try:
        with cf.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))
    finally:
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(previous)


def pair_residuals(
    weights: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    ranks: Sequence[int],
    *,
    workers: int | None = None,
    chunk: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact share-error residuals ``||D - SVD_r(D)||_F`` of ``D = W_i - W_j`` for unordered pairs.

    Args:
        weights: ``(L, d_out, d_in)`` one matrix type stacked over blocks.
        pairs: ``(i, j)`` block pairs; each is decomposed once (the residual is symmetric).
        ranks: ranks r, each ``1 <= r <= min(d_out, d_in)``.
        workers: threads (default: ``torch.get_num_threads()``).
        chunk: pairs per work item (same first block i, one matrix product for all of them).
        progress: called with the number of pairs just finished.

    Returns:
        ``(residual, delta_norm)``: ``(len(ranks), P)`` residuals and ``(P,)`` values of ``||D||_F``, float64.
    """
    w = _oriented(weights.detach().float()).contiguous()  # (L, m, n), m >= n
    L, m, n = w.shape
    bad = [r for r in ranks if not 1 <= r <= n]
    if bad:
        raise ValueError(f"rank {bad[0]} is outside 1..{n} for {tuple(weights.shape[-2:])} matrices")
    workers = workers or torch.get_num_threads()
    rmax = max(ranks)
    sq = (w.double() ** 2).sum((-2, -1))  # (L,) ||W_i||^2
    grams = w.transpose(-2, -1) @ w  # (L, n, n)
    wcat = w.permute(1, 0, 2).reshape(m, L * n)  # (m, L*n): block j's columns are j*n:(j+1)*n
    by_first: dict[int, list[int]] = {}
    for idx, (i, j) in enumerate(pairs):
        by_first.setdefault(int(i), []).append(idx)
    items = [(i, idxs[s : s + chunk]) for i, idxs in by_first.items() for s in range(0, len(idxs), chunk)]
    res = torch.zeros(len(ranks), len(pairs), dtype=torch.float64)
    dnorm2 = torch.zeros(len(pairs), dtype=torch.float64)
    lock = threading.Lock()

    def work(item: tuple[int, list[int]]) -> None:
        i, part = item
        js = [int(pairs[k][1]) for k in part]
        contiguous = js == list(range(js[0], js[0] + len(js)))
        cols = wcat[:, js[0] * n : (js[-1] + 1) * n] if contiguous else w[js].permute(1, 0, 2).reshape(m, -1)
        cross = (w[i].T @ cols).view(n, len(js), n).transpose(0, 1)  # (J, n, n): C_ij = W_i^T W_j
        g = grams[i] + grams[js] - cross - cross.transpose(-2, -1)
        dn2 = torch.diagonal(g, dim1=-2, dim2=-1).double().sum(-1)  # trace of G_ij = ||D||^2
        top = _top_eigvalsh(g, rmax).double().clamp_min(0)  # ascending, (J, rmax)
        tails = torch.stack([(dn2 - top[:, rmax - r :].sum(-1)).clamp_min(0) for r in ranks])
        # float64 redo where cancellation can bite: near-copies, or residuals tiny next to ||D||^2.
        risky = (dn2 < _FP64_SHARE * (sq[i] + sq[js])) | (tails.min(0).values < _FP64_SHARE * dn2)
        for k in risky.nonzero().flatten().tolist():
            d = w[i].double() - w[js[k]].double()
            dn2[k] = (d**2).sum()
            tails[:, k] = _tail_sums(torch.linalg.eigvalsh(d.T @ d)[None], ranks)[:, 0]
        res[:, part] = tails.sqrt()
        dnorm2[part] = dn2
        if progress is not None:
            with lock:
                progress(len(part))

    _parallel_map(work, items, workers)
    return res, dnorm2.clamp_min(0).sqrt()


def top_factors(weights: torch.Tensor, rank: int, *, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of every block's matrix, in the orientation of ``_oriented``.

    Args:
        weights: ``(L, d_out, d_in)``.
        rank: r.

    Returns:
        ``(U, S, V)`` with shapes ``(L, m, r)``, ``(L, r)``, ``(L, n, r)`` where ``(m, n)`` is the
        matrix shape with ``m >= n``; float64 ``S``, float32 ``U``/``V``.
    """
    w = _oriented(weights.detach().float())
    # float32 eigenpairs of the small-side Gram: the top-r directions of trained weights are well
    # separated from the bulk, and the variant only needs them to float32 accuracy.
    n = w.shape[-1]

    def top(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (n, n) -> ascending (rank,), (n, rank)
        g = x.T @ x
        if _lapack is not None and rank < n:
            vals, vecs, m, _, info = _lapack.ssyevr(g.numpy().T, compute_v=1, range="I", il=n - rank + 1, iu=n, lower=1)
            if info == 0 and m == rank:
                return torch.from_numpy(vals[:rank].copy()), torch.from_numpy(vecs[:, :rank].copy())
        vals, vecs = torch.linalg.eigh(g)
        return vals[n - rank :], vecs[:, n - rank :]

    parts = _parallel_map(top, list(w), workers or torch.get_num_threads())
    evals = torch.stack([p[0] for p in parts])
    evecs = torch.stack([p[1] for p in parts])  # ascending order along the last axis
    v = evecs.flip(-1)  # (L, n, r)
    s = evals.flip(-1).double().clamp_min(0).sqrt()  # (L, r)
    u = (w @ v) / s.float().clamp_min(1e-30)[:, None, :]
    return u, s, v


def paper_residuals(
    weights: torch.Tensor, pairs: Sequence[tuple[int, int]], ranks: Sequence[int], *, workers: int | None = None
) -> torch.Tensor:
    """The literal paper variant: residual of the best rank-r approximation of ``W^_i - W^_j``.

    ``W^ = U_r S_r V_r^T`` is each block's own rank-r reconstruction, so ``W^_i - W^_j = A B^T`` with
    ``A = [U_i S_i, -U_j S_j]`` and ``B = [V_i, V_j]`` (rank <= 2r). Its squared singular values are
    the eigenvalues of ``Kb^{1/2} Ka Kb^{1/2}`` with ``Ka = A^T A`` and ``Kb = B^T B`` (2r x 2r), which
    need only the cross products ``U_i^T U_j`` and ``V_i^T V_j``. The residual is
    ``sqrt(sum_{k=r+1..2r} sigma_k^2)``.

    Returns:
        ``(len(ranks), P)`` float64 residuals.
    """
    out = torch.zeros(len(ranks), len(pairs), dtype=torch.float64)
    if not pairs:
        return out
    n = min(weights.shape[-2:])
    bad = [r for r in ranks if not 1 <= r <= n]
    if bad:
        raise ValueError(f"rank {bad[0]} is outside 1..{n} for {tuple(weights.shape[-2:])} matrices")
    u_all, s_all, v_all = top_factors(weights, max(ranks), workers=workers)
    ii = torch.tensor([int(p[0]) for p in pairs])
    jj = torch.tensor([int(p[1]) for p in pairs])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny (2r x 2r) problems: threading only adds barrier waits
    try:
        for ridx, r in enumerate(ranks):
            out[ridx] = _paper_rank(u_all, s_all, v_all, ii, jj, r)
    finally:
        torch.set_num_threads(previous)
    return out


def _paper_rank(u_all, s_all, v_all, ii, jj, r: int) -> torch.Tensor:
    """Paper-variant residuals of all pairs ``(ii, jj)`` at one rank (see ``paper_residuals``)."""
    u, s, v = u_all[..., :r].double(), s_all[:, :r], v_all[..., :r].double()
    uu = u[ii].transpose(-2, -1) @ u[jj]  # (P, r, r)
    vv = v[ii].transpose(-2, -1) @ v[jj]
    si, sj = s[ii], s[jj]
    eye = torch.eye(r, dtype=torch.float64).expand(len(ii), r, r)
    ka = torch.cat(
        [
            torch.cat([torch.diag_embed(si**2), -si[:, :, None] * uu * sj[:, None, :]], -1),
            torch.cat([-(si[:, :, None] * uu * sj[:, None, :]).transpose(-2, -1), torch.diag_embed(sj**2)], -1),
        ],
        -2,
    )
    kb = torch.cat([torch.cat([eye, vv], -1), torch.cat([vv.transpose(-2, -1), eye], -1)], -2)
    lam, q = torch.linalg.eigh(kb)
    half = (q * lam.clamp_min(0).sqrt()[:, None, :]) @ q.transpose(-2, -1)  # Kb^{1/2}
    ev = torch.linalg.eigvalsh(half @ ka @ half).clamp_min(0)  # ascending, 2r values
    return ev[:, :r].sum(-1).sqrt()  # the r smallest of the 2r = sigma_{r+1..2r}^2
