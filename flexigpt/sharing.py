"""Which kept block replaces each dropped slot? Donor matching from a share-error matrix.

A *donor* is the kept base block whose weight tensors a replacement slot reuses. FlexiGPT picks,
for every pruned block i, the kept block j whose weights plus a rank-r correction best
reproduce block i's weights (the share error; see ``flexigpt.lowrank`` for the exact residual).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from flexigpt import lowrank
from flexigpt.arch import arch_of, block_linears, get_blocks
from flexigpt.plan.donors import choose_donors  # the one home of the donor rules; re-exported here

__all__ = [
    "DONOR_METRICS",
    "ShareError",
    "block_weights",
    "choose_donors",
    "degeneracy_warning",
    "max_rank",
    "share_error",
]

DONOR_METRICS = ("relative", "absolute", "paper")


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


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every block's linear weights stacked per matrix: ``{name: (L, d_out, d_in)}`` (float32 copies)."""
    spec = arch_of(model)
    blocks = get_blocks(model)
    lin = [block_linears(b, spec) for b in blocks]
    return {name: torch.stack([m[name].weight.detach().float().cpu() for m in lin]) for name in spec.matrix_names}


def max_rank(weights: dict[str, torch.Tensor]) -> int:
    """Largest valid share-error rank: the smallest matrix dimension over all matrix types."""
    return min(min(w.shape[-2:]) for w in weights.values())


@dataclass(frozen=True)
class ShareError:
    """Share-error matrices; ``[i, j]`` = cost of rebuilding block i from donor j (NaN: not computed).

    Attributes:
        ranks: the ranks r.
        matrices: matrix names in arch order.
        pairs: ``"all"`` or ``"subset"`` (pruned rows x kept columns).
        rows, cols: candidate pruned blocks and candidate donors.
        absolute: ``{r: (L, L)}`` sum over matrices of ``||D - SVD_r(D)||_F``.
        relative: ``{r: (L, L)}`` mean over matrices of that error divided by ``||W_i||_F``.
        per_matrix_absolute, per_matrix_relative: ``{r: {name: (L, L)}}``.
        paper: ``{r: (L, L)}`` the literal paper variant (rank-r reconstructions), summed; empty if skipped.
        weight_norms: ``{name: (L,)}`` ``||W_i||_F``.
        seconds: wall time of the computation.
    """

    ranks: tuple[int, ...]
    matrices: tuple[str, ...]
    pairs: Literal["all", "subset"]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    absolute: dict[int, torch.Tensor]
    relative: dict[int, torch.Tensor]
    per_matrix_absolute: dict[int, dict[str, torch.Tensor]]
    per_matrix_relative: dict[int, dict[str, torch.Tensor]]
    paper: dict[int, torch.Tensor] = field(default_factory=dict)
    weight_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def metric(self, name: str, rank: int) -> torch.Tensor:
        """The ``(L, L)`` matrix of donor metric ``name`` (``relative``, ``absolute``, ``paper``) at ``rank``."""
        if name not in DONOR_METRICS:
            raise ValueError(f"unknown donor metric {name!r}; valid: {', '.join(DONOR_METRICS)}")
        table = {"relative": self.relative, "absolute": self.absolute, "paper": self.paper}[name]
        if rank not in table:
            have = ", ".join(str(r) for r in sorted(table)) or "none"
            raise ValueError(f"rank {rank} was not computed for metric {name!r}; computed ranks: {have}")
        return table[rank]


def share_error(
    model_or_weights: nn.Module | dict[str, torch.Tensor],
    ranks: Sequence[int] = (8, 32),
    *,
    pruned: Iterable[int] | None = None,
    paper: bool = True,
    workers: int | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> ShareError:
    """Exact share-error matrices for all block pairs, or for pruned rows x kept columns.

    Args:
        model_or_weights: a supported model, or ``block_weights(model)``.
        ranks: ranks r, each in ``1..max_rank`` (the smallest matrix dimension).
        pruned: candidate pruned blocks; ``None`` = all pairs. With a set, only pruned x kept is computed.
        paper: also compute the literal paper variant.
        workers: threads for the eigenvalue step.
        progress: ``progress(fraction, message)``.

    Raises:
        ValueError: a rank out of range, or a pruned id out of range / all blocks pruned.
    """
    start = time.perf_counter()
    weights = block_weights(model_or_weights) if isinstance(model_or_weights, nn.Module) else model_or_weights
    names = tuple(weights)
    L = int(next(iter(weights.values())).shape[0])
    limit = max_rank(weights)
    ranks = tuple(int(r) for r in ranks)
    if not ranks:
        raise ValueError("ranks must name at least one rank")
    for r in ranks:
        if not 1 <= r <= limit:
            raise ValueError(f"rank {r} is outside 1..{limit} (the smallest matrix dimension)")
    if pruned is None:
        rows, cols, mode = tuple(range(L)), tuple(range(L)), "all"
        pairs = [(i, j) for i in range(L) for j in range(i + 1, L)]
    else:
        rows = tuple(sorted(set(int(i) for i in pruned)))
        bad = [i for i in rows if not 0 <= i < L]
        if bad:
            raise ValueError(f"pruned blocks {bad} are out of range 0..{L - 1}")
        cols = tuple(j for j in range(L) if j not in rows)
        if not rows or not cols:
            raise ValueError(f"pruned set {list(rows)} must be non-empty and leave at least one of {L} blocks kept")
        mode = "subset"
        pairs = [(i, j) for i in rows for j in cols]
    nan = lambda: torch.full((L, L), float("nan"), dtype=torch.float64)  # noqa: E731
    norms = {n: weights[n].double().pow(2).sum((-2, -1)).sqrt() for n in names}
    pm_abs = {r: {n: nan() for n in names} for r in ranks}
    pm_rel = {r: {n: nan() for n in names} for r in ranks}
    paper_sum = {r: torch.zeros(L, L, dtype=torch.float64) for r in ranks} if paper else {}
    ii = torch.tensor([p[0] for p in pairs])
    jj = torch.tensor([p[1] for p in pairs])
    # Work, in units of matrix-pairs weighted by Gram size, for an honest progress fraction.
    cost = {n: min(weights[n].shape[-2:]) ** 2 * max(weights[n].shape[-2:]) for n in names}
    total = sum(cost.values()) * max(len(pairs), 1)
    done = 0.0
    for name in names:
        def tick(k: int, name: str = name) -> None:
            nonlocal done
            done += k * cost[name]
            if progress is not None:
                progress(min(done / total, 1.0), f"share error: {name}")

        res, _ = lowrank.pair_residuals(weights[name], pairs, ranks, workers=workers, progress=tick)
        for ridx, r in enumerate(ranks):
            for target, (a, b) in ((pm_abs[r][name], (ii, jj)), (pm_abs[r][name], (jj, ii))):
                target[a, b] = res[ridx]
            pm_rel[r][name] = pm_abs[r][name] / norms[name][:, None]
        if paper:
            pres = lowrank.paper_residuals(weights[name], pairs, ranks, workers=workers)
            for ridx, r in enumerate(ranks):
                paper_sum[r][ii, jj] += pres[ridx]
                if mode == "all":
                    paper_sum[r][jj, ii] += pres[ridx]
    keep = torch.zeros(L, L, dtype=torch.bool)
    keep[ii, jj] = True
    if mode == "all":
        keep[jj, ii] = True
    absolute, relative = {}, {}
    for r in ranks:
        for n in names:
            pm_abs[r][n][~keep] = float("nan")
            pm_rel[r][n][~keep] = float("nan")
        absolute[r] = torch.stack([pm_abs[r][n] for n in names]).sum(0)
        relative[r] = torch.stack([pm_rel[r][n] for n in names]).mean(0)
        if paper:
            paper_sum[r][~keep] = float("nan")
    return ShareError(
        ranks=ranks, matrices=names, pairs=mode, rows=rows, cols=cols, absolute=absolute, relative=relative,
        per_matrix_absolute=pm_abs, per_matrix_relative=pm_rel, paper=paper_sum,
        weight_norms={n: v.float() for n, v in norms.items()}, seconds=time.perf_counter() - start,
    )
