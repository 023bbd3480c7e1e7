"""How well does a rank-r correction reproduce a block's linear *on real inputs*? Whitened low rank.

What a replacement slot must reproduce is the pruned block's output on the inputs it actually
receives, not its weights. For one linear with calibration inputs ``X`` (``N`` tokens) and input
second moment ``C = X^T X / N``, damped to ``C + lambda I = S S^T`` (Cholesky, ``S`` lower
triangular; ``lambda`` a small fraction ``damp`` of the mean diagonal keeps it positive definite):

    ||(D - L) X||_F^2 / N = ||(D - L) S||_F^2     (up to the damping term),

so the best rank-r ``L`` is ``U_r Sigma_r V_r^T S^{-1}`` from the SVD ``D S = U Sigma V^T``
(as in SVD-LLM), and what it leaves is ``sqrt(sum_{k>r} sigma_k^2)``. Relative to the block's own
output energy ``||W_i S||_F`` this is the function-space share error of rebuilding block i from
donor j (``D = W_i - W_j``, with block i's own ``S``); ``D = W_i`` alone is the *no donor* error,
the baseline any donor must beat. Unlike the weight-space error it is not symmetric in (i, j).

The residuals use the same two GIL-free kernels as the weight-space share error
(``flexigpt.lowrank``): per pair one triangular product ``D S`` (BLAS ``strmm``), the Gram of the
smaller side (``ssyrk``) and its top eigenvalues (``ssyevr``), one pair per core.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from flexigpt import lapack
from flexigpt.lowrank import _FP64_SHARE, _check_ranks, _parallel_map

log = logging.getLogger(__name__)

__all__ = ["DAMP", "WhitenedResiduals", "whitener", "whitened_factors", "whitened_fit", "whitened_residuals"]

DAMP = 1e-2  # lambda = DAMP * mean(diag C): directions the inputs barely visit are not amplified


def whitener(C: torch.Tensor, *, damp: float = DAMP) -> torch.Tensor:
    """The lower-triangular float64 ``S`` with ``S S^T = C + lambda I``.

    Args:
        C: ``(d, d)`` symmetric positive semi-definite second moment.
        damp: ``lambda / mean(diag C)``, in ``[0, 1]``; 0 needs a positive definite ``C``.

    Raises:
        ValueError: ``C`` not square / not finite, or ``damp`` outside ``[0, 1]``.
    """
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0.0 <= float(damp) <= 1.0:
        raise ValueError(f"damp {damp!r} is outside 0..1 (a fraction of the mean input energy)")
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square (d, d) matrix, got shape {tuple(C.shape)}")
    c = C.detach().to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("C has non-finite entries (NaN or inf activations in the calibration pass)")
    c = (c + c.T) / 2
    scale = float(torch.diagonal(c).mean())
    if scale <= 0:  # an input that is always zero: every correction is equally good; use plain weights
        return torch.eye(c.shape[0], dtype=torch.float64)
    lam = float(damp) * scale
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    for attempt in range(6):
        s, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) == 0:
            return s
        lam = max(lam * 10, 1e-10 * scale)  # rounding left C indefinite: damp a little more
        log.debug("Cholesky retry %d with lambda %.3g", attempt + 1, lam)
    raise ValueError("C is not positive semi-definite even after damping")


def _top_right(h: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r right singular vectors ``V_r`` (d_in, r) and values of a float64 matrix, descending."""
    d_out, d_in = h.shape
    if d_in <= d_out:
        evals, vecs = torch.linalg.eigh(h.T @ h)
        return vecs[:, -rank:].flip(-1), evals[-rank:].flip(-1).clamp_min(0).sqrt()
    evals, u = torch.linalg.eigh(h @ h.T)
    u = u[:, -rank:].flip(-1)
    s = evals[-rank:].flip(-1).clamp_min(0).sqrt()
    v = h.T @ u  # = V_r Sigma_r
    keep = s > s.max().clamp_min(1e-300) * 1e-12  # null directions contribute nothing either way
    v = torch.where(keep[None, :], v / s.clamp_min(1e-300)[None, :], torch.zeros_like(v))
    return v, s


def whitened_fit(delta: torch.Tensor, S: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(B, A, residual, total)`` in float64 for a given whitener ``S`` (see ``whitened_factors``):
    ``residual = ||(delta - B A) S||_F`` and ``total = ||delta S||_F``."""
    limit = min(delta.shape)
    if not 1 <= rank <= limit:
        raise ValueError(f"rank {rank} is outside 1..{limit} for a {tuple(delta.shape)} matrix")
    if S.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"whitener shape {tuple(S.shape)} does not match the input size {delta.shape[1]}")
    d = delta.detach().to(torch.float64)
    s = S.to(torch.float64)
    h = d @ s
    v, _ = _top_right(h, rank)
    B = h @ v  # U_r Sigma_r
    A = torch.linalg.solve_triangular(s, v.T, upper=False, left=False)  # V_r^T S^{-1}
    total = float(h.pow(2).sum())
    residual = float((h - B @ v.T).pow(2).sum())
    return B, A, residual**0.5, total**0.5


def whitened_factors(delta: torch.Tensor, C: torch.Tensor, rank: int, *,
                     damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r ``(B, A)`` minimising ``||(delta - B A) X||_F`` for inputs with second moment ``C``.

    Args:
        delta: ``(d_out, d_in)``, e.g. ``W_pruned - W_donor`` (or ``W_pruned`` with no donor).
        C: ``(d_in, d_in)`` input second moment ``X^T X / N``.
        rank: r in ``1..min(d_out, d_in)``.
        damp: damping of ``C`` (see ``whitener``); with ``damp = 0`` the fit is the exact
            least-squares optimum on the calibration inputs.

    Returns:
        ``B = U_r Sigma_r`` ``(d_out, r)`` and ``A = V_r^T S^{-1}`` ``(r, d_in)`` in float32, from
        the SVD ``delta S = U Sigma V^T`` (peft: ``lora_B = B``, ``lora_A = A``, scaling 1).
    """
    B, A, _, _ = whitened_fit(delta, whitener(C, damp=damp), rank)
    return B.float(), A.float()


class WhitenedResiduals(NamedTuple):
    """Function-space residuals of ``whitened_residuals``.

    Attributes:
        relative: ``(len(ranks), P)`` residual divided by ``reference``.
        absolute: ``(len(ranks), P)`` ``sqrt(sum_{k>r} sigma_k^2)`` of ``D S_i``.
        reference: ``(P,)`` ``||W_i S_i||_F``, the pruned block's own output energy.
    """

    relative: torch.Tensor
    absolute: torch.Tensor
    reference: torch.Tensor


def whitened_residuals(
    weights: torch.Tensor,
    whiteners: Mapping[int, torch.Tensor] | Callable[[int], torch.Tensor],
    pairs: Sequence[tuple[int, int | None]],
    ranks: Sequence[int],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> WhitenedResiduals:
    """Function-space share error of rebuilding block i from donor j (``None``: no donor).

    Args:
        weights: ``(L, d_out, d_in)`` one matrix type stacked over blocks.
        whiteners: block id -> lower-triangular ``S_i`` ``(d_in, d_in)`` (``whitener`` of block i's
            input moment), as a mapping or a function; fetched once per distinct i, in order of
            first appearance, so a function may build each on demand and keep nothing.
        pairs: ``(i, j)`` with i the pruned block (its own inputs) and j the donor or ``None``.
        ranks: ranks r, each ``1 <= r <= min(d_out, d_in)``.
        workers: threads (default ``torch.get_num_threads()``).
        progress: called with the number of pairs just finished.

    Returns:
        ``WhitenedResiduals`` (float64).
    """
    d_out, d_in = weights.shape[-2:]
    tall = d_out >= d_in
    n = min(d_out, d_in)
    _check_ranks(ranks, n, weights.shape[-2:])
    w = weights.detach().float()
    w = (w if tall else w.transpose(-2, -1)).contiguous().numpy()  # (L, m, n), m >= n
    L = w.shape[0]
    for i, j in pairs:
        if not 0 <= int(i) < L or (j is not None and not 0 <= int(j) < L):
            raise ValueError(f"pair {(i, j)} is out of range 0..{L - 1}")
    workers = workers or torch.get_num_threads()
    rmax = max(ranks)
    absolute = np.zeros((len(ranks), len(pairs)), dtype=np.float64)
    reference = np.zeros(len(pairs), dtype=np.float64)
    by_row: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(pairs):
        by_row.setdefault(int(i), []).append(k)
    fetch = whiteners if callable(whiteners) else whiteners.__getitem__
    lock = threading.Lock()
    step = max(1, min(8, -(-len(pairs) // (4 * workers))))
    items = [(i, ks[a : a + step]) for i, ks in by_row.items() for a in range(0, len(ks), step)]
    left = {i: -(-len(ks) // step) for i, ks in by_row.items()}
    rows: dict[int, tuple[torch.Tensor, np.ndarray, float]] = {}

    def row(i: int) -> tuple[torch.Tensor, np.ndarray, float]:
        """``(S in float64, S in float32, ||W_i S||^2)``, built by the first work item of row i."""
        with lock:
            if i not in rows:
                s64 = fetch(i).detach().to(torch.float64)
                if s64.shape != (d_in, d_in):
                    raise ValueError(f"whitener of block {i} has shape {tuple(s64.shape)}, expected {(d_in, d_in)}")
                s32 = s64.float().contiguous().numpy()
                own = lapack.lower_product(w[i].copy(), s32, right=tall)
                rows[i] = (s64, s32, float(np.square(own, dtype=np.float64).sum()))
            return rows[i]

    def one(i: int, j: int | None, s64: torch.Tensor, s32: np.ndarray) -> list[float]:
        d = w[i].copy() if j is None else np.subtract(w[i], w[j])
        lapack.lower_product(d, s32, right=tall)  # D S (tall) or (D S)^T, (m, n)
        g = lapack.gram(d)
        total = float(np.diagonal(g).sum(dtype=np.float64))
        tails = None
        try:
            top = lapack.top_eigh(g, rmax).astype(np.float64).clip(min=0)
            tails = [max(total - float(top[rmax - r :].sum()), 0.0) for r in ranks]
        except np.linalg.LinAlgError:
            pass
        if tails is None or min(tails) < _FP64_SHARE * total:  # cancellation or no convergence
            dd = torch.from_numpy(w[i]).double() - (0 if j is None else torch.from_numpy(w[j]).double())
            h = dd @ s64 if tall else s64.T @ dd
            ev = torch.linalg.eigvalsh(h.T @ h).clamp_min(0)
            tails = [float(ev[: n - r].sum()) for r in ranks]
        return tails

    def work(item: tuple[int, list[int]]) -> None:
        i, part = item
        s64, s32, ref = row(i)
        for k in part:
            j = pairs[k][1]
            absolute[:, k] = np.sqrt(one(i, None if j is None else int(j), s64, s32))
            reference[k] = ref
        with lock:
            left[i] -= 1
            if left[i] == 0:  # the row is done: drop its whitener
                rows.pop(i, None)
            if progress is not None:
                progress(len(part))

    # items are taken in order, so only the rows in flight (about one per worker) hold a whitener
    _parallel_map(work, items, workers)
    abs_t = torch.from_numpy(absolute)
    ref_t = torch.from_numpy(np.sqrt(reference))
    return WhitenedResiduals(relative=abs_t / ref_t.clamp_min(1e-300), absolute=abs_t, reference=ref_t)
