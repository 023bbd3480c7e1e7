"""Which kept block replaces each dropped slot? Donor matching from a share-error matrix.

A *donor* is the kept base block whose weight tensors a replacement slot reuses. FlexiGPT picks,
for every pruned block i, the kept block j whose weights plus a rank-r correction best
reproduce block i's weights (the share error; see ``flexigpt.lowrank`` for the exact residual).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch

__all__ = ["choose_donors", "degeneracy_warning"]


def choose_donors(error: Sequence[Sequence[float]] | torch.Tensor, pruned: Iterable[int]) -> dict[int, int]:
    """For each pruned block, the kept block with the smallest share error.

    Args:
        error: ``(L, L)`` matrix; ``error[i][j]`` is the cost of rebuilding block ``i`` from donor ``j``.
            Non-finite entries (NaN/inf, e.g. the diagonal) are never chosen.
        pruned: block ids to replace (0-based).

    Returns:
        ``{pruned_block: donor_block}``; donors are always kept blocks. Ties go to the nearest
        block in depth, then the lower id.

    Raises:
        ValueError: when a pruned id is out of range or every block is pruned.
    """
    err = torch.as_tensor(error, dtype=torch.float64)
    if err.ndim != 2 or err.shape[0] != err.shape[1]:
        raise ValueError(f"share-error matrix must be square (L, L), got shape {tuple(err.shape)}")
    n = err.shape[0]
    pruned_set = sorted(set(int(i) for i in pruned))
    bad = [i for i in pruned_set if not 0 <= i < n]
    if bad:
        raise ValueError(f"pruned blocks {bad} are out of range 0..{n - 1}")
    kept = [j for j in range(n) if j not in pruned_set]
    if not kept:
        raise ValueError(f"all {n} blocks are pruned; at least one block must be kept as a donor")
    donors: dict[int, int] = {}
    for i in pruned_set:
        best: tuple[float, int, int] | None = None
        for j in kept:
            value = float(err[i, j])
            if value != value or value in (float("inf"), float("-inf")):
                continue
            key = (round(value, 12), abs(i - j), j)
            if best is None or key < best:
                best = key
        donors[i] = best[2] if best is not None else min(kept, key=lambda j: (abs(i - j), j))
    return donors


def degeneracy_warning(donors: dict[int, int], threshold: float = 0.5) -> str | None:
    """A warning when most pruned blocks picked the same donor (the degenerate solution the
    paper's low-rank metric is meant to avoid), else ``None``."""
    if len(donors) < 3:
        return None
    donor, count = Counter(donors.values()).most_common(1)[0]
    if count / len(donors) > threshold:
        return (
            f"{count} of {len(donors)} pruned blocks picked the same donor (block {donor}); the share error "
            "may be dominated by one low-rank block. Compare the relative or paper-variant metric, or pick donors by hand."
        )
    return None
