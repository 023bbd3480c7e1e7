"""Which kept block, plus a rank-r correction, best reproduces a pruned block's output on real inputs?

The function-space share error of rebuilding pruned block i from donor j is, per linear matrix,
``||(W_i - W_j - L_r) X_i|| / ||W_i X_i||`` with ``X_i`` the inputs block i receives in the original
model and ``L_r`` the best rank-r correction for them (``flexigpt.whiten``); the same with no donor
(``W_j = 0``) is the baseline every donor must beat. The block's value is the mean over its
matrices, like the weight-space ``relative`` metric. Rows are the pruned candidates, columns the
candidate donors; the matrix is not symmetric.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from flexigpt.activations import MomentCollector
from flexigpt.whiten import DAMP, whitened_residuals, whitener

__all__ = ["FUNCTION_METRIC", "FunctionShare", "function_share_error"]

FUNCTION_METRIC = "function"  # its name in analysis.json and as a donor metric


def _jsonable(t: torch.Tensor) -> list:
    """Nested lists with NaN -> None (JSON has no NaN)."""
    return [_jsonable(x) for x in t] if t.ndim > 1 else [None if not math.isfinite(v) else v for v in t.tolist()]


@dataclass(frozen=True)
class FunctionShare:
    """Function-space share error; NaN where not computed.

    Attributes:
        ranks, matrices, rows, cols: as computed (rows: pruned candidates, cols: donor candidates).
        relative: ``{r: (L, L)}`` mean over matrices of the relative residual of ``(i, j)``.
        per_matrix: ``{r: {name: (L, L)}}``.
        no_donor: ``{r: (L,)}`` mean over matrices of the relative residual with no donor.
        no_donor_per_matrix: ``{r: {name: (L,)}}``.
        damp: the damping of each input moment; tokens: calibration tokens behind the moments.
    """

    ranks: tuple[int, ...]
    matrices: tuple[str, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    relative: dict[int, torch.Tensor]
    per_matrix: dict[int, dict[str, torch.Tensor]]
    no_donor: dict[int, torch.Tensor]
    no_donor_per_matrix: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    damp: float = DAMP
    tokens: int = 0

    def json_fields(self) -> dict:
        """The ``share_error`` fields of ``analysis.json``: ``function`` ``{r: L x L}`` (rows: pruned
        block, columns: donor), ``no_donor`` ``{"function": {r: [L]}, "per_matrix": ...}`` and
        ``function_settings``."""
        ranks, names = self.ranks, self.matrices
        return {
            FUNCTION_METRIC: {str(r): _jsonable(self.relative[r]) for r in ranks},
            "no_donor": {
                FUNCTION_METRIC: {str(r): _jsonable(self.no_donor[r]) for r in ranks},
                "per_matrix": {FUNCTION_METRIC: {str(r): {n: _jsonable(self.no_donor_per_matrix[r][n]) for n in names}
                                                 for r in ranks}},
            },
            "function_settings": {"damp": self.damp, "tokens": self.tokens, "rows": list(self.rows),
                                  "cols": list(self.cols),
                                  "value": "mean over matrices of ||(W_i - W_j - L_r) X_i|| / ||W_i X_i||"},
        }

    def per_matrix_json(self) -> dict:
        """``{r: {name: L x L}}`` for ``share_error.per_matrix.function``."""
        return {str(r): {n: _jsonable(self.per_matrix[r][n]) for n in self.matrices} for r in self.ranks}

    def no_donor_flags(self, donors: Mapping[int, int], rank: int, *, compare: bool = True) -> dict:
        """``suggested`` (``"none"`` where no donor beats a fit of the block alone), ``no_donor_better``
        (both errors per flagged block) and, if any, ``no_donor_note``. ``compare=False`` (a
        weight-space suggestion) keeps every donor."""
        suggested, better = {}, {}
        for i, j in donors.items():
            with_donor, alone = float(self.relative[rank][i, j]), float(self.no_donor[rank][i])
            if compare and math.isfinite(with_donor) and math.isfinite(alone) and alone <= with_donor:
                suggested[str(i)] = "none"
                better[str(i)] = {"donor": j, "donor_error": with_donor, "no_donor_error": alone}
            else:
                suggested[str(i)] = j
        out = {"suggested": suggested, "no_donor_better": better}
        if better:
            out["no_donor_note"] = (
                f"{len(better)} of {len(donors)} pruned blocks ({', '.join(sorted(better, key=int))}) are reproduced "
                f"better on real inputs by a rank-{rank} fit of the block alone than by their best donor plus that "
                "fit: a slot without a donor (or a plain drop) is the better choice there.")
        return out


class _Whiteners:
    """``S`` per (block, matrix), factored once per shared input and dropped after its last use."""

    def __init__(self, source: MomentCollector | Mapping[int, Mapping[str, torch.Tensor]], rows: Sequence[int],
                 matrices: Sequence[str], damp: float):
        self.source, self.damp = source, damp
        self.cache: dict[tuple[int, object], torch.Tensor] = {}
        self.left: dict[tuple[int, object], int] = {}
        for b in rows:
            for name in matrices:
                key = (b, self._key(b, name))
                self.left[key] = self.left.get(key, 0) + 1

    def _key(self, block: int, name: str) -> object:
        if isinstance(self.source, MomentCollector):
            for key, names in self.source.groups(block).items():
                if name in names:
                    return key
            raise ValueError(f"no input moment for {name!r} of block {block}")
        per = self.source.get(block)
        if per is None or name not in per:
            raise ValueError(f"no input moment for {name!r} of block {block}")
        return id(per[name])

    def get(self, block: int, name: str) -> torch.Tensor:
        key = (block, self._key(block, name))
        s = self.cache.get(key)
        if s is None:
            c = self.source.moment(block, name) if isinstance(self.source, MomentCollector) else self.source[block][name]
            s = self.cache[key] = whitener(c, damp=self.damp).float()
        self.left[key] -= 1
        if self.left[key] == 0:  # its last matrix: free the factor (and the collector's accumulator)
            del self.cache[key]
            if isinstance(self.source, MomentCollector):
                self.source.release(block, key[1])
        return s


def function_share_error(
    weights: Mapping[str, torch.Tensor],
    moments: MomentCollector | Mapping[int, Mapping[str, torch.Tensor]],
    rows: Sequence[int],
    ranks: Sequence[int],
    *,
    cols: Sequence[int] | None = None,
    damp: float = DAMP,
    workers: int | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> FunctionShare:
    """Function-space share error of every row x column pair, plus the no-donor error of each row.

    Args:
        weights: ``{name: (L, d_out, d_in)}`` (``flexigpt.sharing.block_weights``).
        moments: a ``MomentCollector`` that saw the calibration pass (its accumulators are freed
            as they are used), or ``{block: {name: C}}`` from ``linear_input_moments``.
        rows: pruned candidates (each needs its moments).
        ranks: ranks r.
        cols: donor candidates (default: every block); a row's own block is never its donor.
        damp: damping of each input moment.
        workers: threads for the residual kernels.
        progress: ``progress(fraction, message)``.
    """
    names = tuple(weights)
    L = int(next(iter(weights.values())).shape[0])
    rows = tuple(sorted(set(int(i) for i in rows)))
    cols = tuple(range(L)) if cols is None else tuple(sorted(set(int(j) for j in cols)))
    bad = [b for b in rows + cols if not 0 <= b < L]
    if bad or not rows:
        raise ValueError(f"rows {list(rows)} must be non-empty and rows/cols within 0..{L - 1}")
    ranks = tuple(int(r) for r in ranks)
    pairs = [(i, j) for i in rows for j in cols if j != i] + [(i, None) for i in rows]
    tokens = moments.tokens if isinstance(moments, MomentCollector) else 0
    source = _Whiteners(moments, rows, names, damp)
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=torch.float64)  # noqa: E731
    per_matrix = {r: {n: nan(L, L) for n in names} for r in ranks}
    none_pm = {r: {n: nan(L) for n in names} for r in ranks}
    cost = {n: math.prod(weights[n].shape[-2:]) * min(weights[n].shape[-2:]) for n in names}
    total, done = sum(cost.values()) * len(pairs), 0.0
    ii = torch.tensor([p[0] for p in pairs if p[1] is not None], dtype=torch.long)
    jj = torch.tensor([p[1] for p in pairs if p[1] is not None], dtype=torch.long)
    donor = torch.tensor([p[1] is not None for p in pairs])
    for name in names:
        def tick(k: int, name: str = name) -> None:
            nonlocal done
            done += k * cost[name]
            if progress is not None:
                progress(min(done / total, 1.0), f"function-space share error: {name}")

        res = whitened_residuals(weights[name], lambda i, name=name: source.get(i, name), pairs, ranks,
                                 workers=workers, progress=tick)
        for ridx, r in enumerate(ranks):
            per_matrix[r][name][ii, jj] = res.relative[ridx][donor]
            none_pm[r][name][torch.tensor(rows)] = res.relative[ridx][~donor]
    return FunctionShare(
        ranks=ranks, matrices=names, rows=rows, cols=cols,
        relative={r: torch.stack([per_matrix[r][n] for n in names]).mean(0) for r in ranks}, per_matrix=per_matrix,
        no_donor={r: torch.stack([none_pm[r][n] for n in names]).mean(0) for r in ranks},
        no_donor_per_matrix=none_pm, damp=float(damp), tokens=int(tokens),
    )
