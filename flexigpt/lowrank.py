"""How do I factor a weight delta, and how much of it does a rank-r correction leave behind?

Pure tensor math shared by donor matching (``flexigpt.sharing``) and adapter initialisation.
The central quantity is FlexiGPT's share error: rebuilding block i's matrix from donor j's matrix
plus the best rank-r correction leaves the residual

    e(i, j) = ||D - SVD_r(D)||_F = sqrt(sum_{k>r} sigma_k(D)^2),   D = W_i - W_j,

so only the singular values of D are needed, and every rank comes from one decomposition.
``e(i, j) = e(j, i)``, so each unordered pair is decomposed once.

Why this is fast and still exact (2-core CPU, the embedded SmolLM2, 435 pairs x 7 matrices):
``svdvals`` of each D costs about 110 s and a float64 Gram + ``eigvalsh`` about 47 s. Here each
pair costs one symmetric product ``G = D^T D`` on the smaller side (BLAS ``ssyrk``, half the flops
of a general product) and the top ``max(ranks)`` eigenvalues of G (LAPACK ``ssyevr`` with an index
range); the residual is ``trace(G) - sum of the top r eigenvalues``. Both kernels run on all cores
at once, one pair per core, with the GIL released (``flexigpt.lapack``). Forming D first (rather
than ``G_i + G_j - W_i^T W_j - W_j^T W_i``) leaves no cancellation in G even for near copies. Float32
is exact to well below 1e-4 relative while the residual keeps a sizeable share of ``||D||^2``
(different blocks' weights are nearly orthogonal, so it keeps about 80%); where it keeps under 5%
(a delta of rank about r), ``trace(G) - top`` would cancel, so the pair is redone in float64 with
every eigenvalue and the tail summed directly; so is any pair where ``ssyevr`` does not converge.

The literal paper variant compares rank-r reconstructions ``W^_i - W^_j`` (rank <= 2r) and keeps
``sqrt(sum_{k=r+1..2r} sigma_k^2)``; it is computed from each block's top-r factors and the
cross products ``U_i^T U_j``, ``V_i^T V_j`` only (2r x 2r problems).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flexigpt import lapack

__all__ = [
    "svd_factor",
    "residual_from_svdvals",
    "pair_residuals",
    "paper_residuals",
    "top_factors",
]

# Below this share of ||D||^2 left in the residual, trace(G) - (top eigenvalues) loses digits to
# cancellation in float32, and the pair is redone in float64.
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


def _check_ranks(ranks: Sequence[int], n: int, shape: Sequence[int]) -> None:
    bad = [r for r in ranks if not 1 <= r <= n]
    if bad:
        raise ValueError(f"rank {bad[0]} is outside 1..{n} for {tuple(shape)} matrices")


def _parallel_map(fn: Callable, items: Sequence, workers: int) -> list:
    """``[fn(x) for x in items]`` on ``workers`` threads, each running single-threaded BLAS.

    Why not BLAS's own threads: LAPACK's tridiagonal reduction of a 576 x 576 matrix is bound by
    memory traffic and barely speeds up with more threads, and on a busy machine OpenMP barriers
    made a batched ``eigvalsh`` ten times slower (measured). Independent problems on separate
    threads scale on 2 cores; ``flexigpt.lapack`` releases the GIL for each kernel.
    """
    if workers <= 1 or len(items) < 2:
        with lapack.blas_single_thread():
            return [fn(x) for x in items]
    with lapack.blas_single_thread(), cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


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
        chunk: pairs per work item (and per progress report).
        progress: called with the number of pairs just finished.

    Returns:
        ``(residual, delta_norm)``: ``(len(ranks), P)`` residuals and ``(P,)`` values of ``||D||_F``, float64.
    """
    wt = _oriented(weights.detach().float()).contiguous()  # (L, m, n), m >= n
    w = wt.numpy()
    L, m, n = w.shape
    _check_ranks(ranks, n, weights.shape[-2:])
    workers = workers or torch.get_num_threads()
    rmax = max(ranks)
    res = np.zeros((len(ranks), len(pairs)), dtype=np.float64)
    dnorm2 = np.zeros(len(pairs), dtype=np.float64)
    lock = threading.Lock()
    local = threading.local()
    step = max(int(chunk), 1)
    items = [list(range(s, min(s + step, len(pairs)))) for s in range(0, len(pairs), step)]

    def work(part: list[int]) -> None:
        if getattr(local, "buffers", None) is None:  # one D and one G buffer per worker thread
            local.buffers = (np.empty((m, n), dtype=np.float32), np.empty((n, n), dtype=np.float32))
        d, g = local.buffers
        for k in part:
            i, j = int(pairs[k][0]), int(pairs[k][1])
            np.subtract(w[i], w[j], out=d)
            lapack.gram(d, out=g)
            dn2 = float(np.diagonal(g).sum(dtype=np.float64))  # trace(G) = ||D||^2
            tails = None
            try:
                top = lapack.top_eigh(g, rmax).astype(np.float64).clip(min=0)  # ascending
                tails = [max(dn2 - float(top[rmax - r :].sum()), 0.0) for r in ranks]
            except np.linalg.LinAlgError:
                pass  # not converged: the float64 route below
            # the float64 route: not converged, or a delta of rank about r (sum the tail directly)
            if tails is None or min(tails) < _FP64_SHARE * dn2:
                dd = wt[i].double() - wt[j].double()
                ev = torch.linalg.eigvalsh(dd.T @ dd).clamp_min(0)
                dn2 = float(dd.pow(2).sum())
                tails = [float(ev[: n - r].sum()) for r in ranks]
            res[:, k] = np.sqrt(tails)
            dnorm2[k] = dn2
        if progress is not None:
            with lock:
                progress(len(part))

    _parallel_map(work, items, workers)
    return torch.from_numpy(res), torch.from_numpy(dnorm2).clamp_min(0).sqrt()


def top_factors(weights: torch.Tensor, rank: int, *, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of every block's matrix, in the orientation of ``_oriented``.

    Args:
        weights: ``(L, d_out, d_in)``.
        rank: r.

    Returns:
        ``(U, S, V)`` with shapes ``(L, m, r)``, ``(L, r)``, ``(L, n, r)`` where ``(m, n)`` is the
        matrix shape with ``m >= n``; float64 ``S``, float32 ``U``/``V``.
    """
    w = _oriented(weights.detach().float()).contiguous()
    n = w.shape[-1]
    _check_ranks([rank], n, weights.shape[-2:])

    # float32 eigenpairs of the small-side Gram: the top-r directions of trained weights are well
    # separated from the bulk, and the variant only needs them to float32 accuracy.
    def top(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (m, n) -> ascending (rank,), (n, rank)
        try:
            return lapack.top_eigh(lapack.gram(x), rank, vectors=True)
        except np.linalg.LinAlgError:  # not converged: torch's full eigh for this block
            return lapack.top_eigh(lapack.gram(x, native=False), rank, vectors=True, native=False)

    parts = _parallel_map(top, list(w.numpy()), workers or torch.get_num_threads())
    evals = torch.from_numpy(np.stack([p[0] for p in parts]))
    v = torch.from_numpy(np.stack([p[1] for p in parts])).flip(-1).contiguous()  # (L, n, r), descending
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
    need only the cross products ``U_i^T U_j`` and ``V_i^T V_j``: all of them come from one product
    of the stacked factors. The residual is ``sqrt(sum_{k=r+1..2r} sigma_k^2)``.

    Returns:
        ``(len(ranks), P)`` float64 residuals.
    """
    out = torch.zeros(len(ranks), len(pairs), dtype=torch.float64)
    if not pairs:
        return out
    _check_ranks(ranks, min(weights.shape[-2:]), weights.shape[-2:])
    workers = workers or torch.get_num_threads()
    rmax = max(ranks)
    u_all, s_all, v_all = top_factors(weights, rmax, workers=workers)
    L = u_all.shape[0]

    def cross(f: torch.Tensor) -> torch.Tensor:  # (L, d, R) -> (L, R, L, R) of f_i^T f_j
        flat = f.double().permute(1, 0, 2).reshape(f.shape[1], L * rmax)
        return (flat.T @ flat).view(L, rmax, L, rmax)

    uu_all, vv_all = cross(u_all), cross(v_all)
    ii = torch.tensor([int(p[0]) for p in pairs])
    jj = torch.tensor([int(p[1]) for p in pairs])
    uu, vv = uu_all[ii, :, jj, :], vv_all[ii, :, jj, :]  # (P, R, R)
    si, sj = s_all[ii], s_all[jj]  # (P, R)
    # Many tiny (2r x 2r) problems: split over the workers, each on one thread.
    bounds = torch.linspace(0, len(pairs), workers + 1).round().long().tolist()
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def run(span: tuple[int, int]) -> None:
        a, b = span
        for ridx, r in enumerate(ranks):
            out[ridx, a:b] = _paper_rank(uu[a:b, :r, :r], vv[a:b, :r, :r], si[a:b, :r], sj[a:b, :r])

    _parallel_map(run, spans, workers)
    return out


def _paper_rank(uu: torch.Tensor, vv: torch.Tensor, si: torch.Tensor, sj: torch.Tensor) -> torch.Tensor:
    """Paper-variant residuals at one rank r from ``U_i^T U_j``, ``V_i^T V_j`` (``(P, r, r)``) and
    the singular values ``S_i``, ``S_j`` (``(P, r)``); see ``paper_residuals``."""
    p, r = si.shape
    eye = torch.eye(r, dtype=torch.float64).expand(p, r, r)
    off = -si[:, :, None] * uu * sj[:, None, :]
    ka = torch.cat(
        [torch.cat([torch.diag_embed(si**2), off], -1), torch.cat([off.transpose(-2, -1), torch.diag_embed(sj**2)], -1)],
        -2,
    )
    kb = torch.cat([torch.cat([eye, vv], -1), torch.cat([vv.transpose(-2, -1), eye], -1)], -2)
    lam, q = torch.linalg.eigh(kb)
    half = (q * lam.clamp_min(0).sqrt()[:, None, :]) @ q.transpose(-2, -1)  # Kb^{1/2}
    ev = torch.linalg.eigvalsh(half @ ka @ half).clamp_min(0)  # ascending, 2r values
    return ev[:, :r].sum(-1).sqrt()  # the r smallest of the 2r = sigma_{r+1..2r}^2
