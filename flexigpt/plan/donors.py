"""Which kept block should a pruned block's slot run? The donor rules, in one place.

* ``nearest_kept``: the kept block nearest in depth (ties: the lower id), when nothing better is known;
* ``choose_donors``: the row minima of a share-error matrix over the kept blocks (ties: nearest,
  then lower id; rows without a finite value fall back to ``nearest_kept``);
* ``suggested_donor``: what an ``analysis.json`` suggests for one block pruned by hand;
* ``drop_with_suggestion``: prune one block by hand and give its slot the analysis' choice (the
  CLI's ``--drop`` without ``--donor`` and the app's "auto" donor);
* ``prefer_no_donor``: no donor where a rank-r fit of the block alone reproduces it better on real
  inputs than its best donor plus that fit (the analysis' ``function`` metric measures both).

Pure Python (no torch), so the plan editor can apply them on every edit.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flexigpt.methods.base import nearest_kept

__all__ = ["DONOR_METRICS", "NO_SHARE_ERROR_RULE", "choose_donors", "donor_matrix", "nearest_kept", "no_donor_errors", "prefer_no_donor",
           "drop_with_suggestion", "suggested_donor", "suggests_no_donor"]

DONOR_METRICS = ("relative", "absolute", "paper", "function")


def _value(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def choose_donors(error: Any, pruned: Iterable[int]) -> dict[int, int]:
    """For each pruned block, the kept block with the smallest share error.

    Args:
        error: ``(L, L)`` matrix (nested sequences or a tensor); ``error[i][j]`` is the cost of
            rebuilding block ``i`` from donor ``j``. Non-finite or missing entries are never chosen.
        pruned: block ids to replace (0-based).

    Returns:
        ``{pruned_block: donor_block}``; donors are always kept blocks.

    Raises:
        ValueError: a non-square matrix, a pruned id out of range, or every block pruned.
    """
    rows = error.tolist() if hasattr(error, "tolist") else [list(r) for r in error]
    n = len(rows)
    if any(len(r) != n for r in rows):
        raise ValueError(f"share-error matrix must be square (L, L), got {n} rows of lengths {sorted({len(r) for r in rows})}")
    pruned_set = sorted(set(int(i) for i in pruned))
    bad = [i for i in pruned_set if not 0 <= i < n]
    if bad:
        raise ValueError(f"pruned blocks {bad} are out of range 0..{n - 1}")
    kept = [j for j in range(n) if j not in pruned_set]
    if not kept:
        raise ValueError(f"all {n} blocks are pruned; at least one block must be kept as a donor")
    donors: dict[int, int] = {}
    for i in pruned_set:
        scored = [(round(v, 12), abs(i - j), j) for j in kept if math.isfinite(v := _value(rows[i][j]))]
        donors[i] = min(scored)[2] if scored else nearest_kept(i, kept)
    return donors


def donor_matrix(analysis: Mapping[str, Any], metric: str | None = None, rank: int | None = None):
    """``(metric, rank, matrix)``: the share-error matrix the analysis' ``donor_suggestion`` names
    (``metric``/``rank`` override it); ``matrix`` is ``None`` when the analysis has no share error."""
    suggestion = analysis.get("donor_suggestion") or {}
    se = analysis.get("share_error") or {}
    metric = metric or suggestion.get("metric") or "relative"
    if metric not in DONOR_METRICS:
        raise ValueError(f"share-error metric must be one of {', '.join(map(repr, DONOR_METRICS))}, got {metric!r}")
    rank = rank if rank is not None else suggestion.get("rank")
    matrix = None
    if se and rank is not None:
        matrix = (se.get(metric) or {}).get(str(rank))
    return metric, rank, matrix


def no_donor_errors(analysis: Mapping[str, Any], metric: str, rank: int | None) -> list[Any] | None:
    """Per block, the share error of a slot with no donor (a rank-``rank`` fit of the block alone),
    in the same units as ``metric``'s matrix; ``None`` when the analysis did not measure it (only
    the ``function`` metric does)."""
    if rank is None:
        return None
    table = (((analysis.get("share_error") or {}).get("no_donor") or {}).get(metric) or {}).get(str(rank))
    return list(table) if isinstance(table, list) else None


def prefer_no_donor(donors: Mapping[int, int], error: Sequence[Sequence[Any]],
                    no_donor: Sequence[Any]) -> dict[int, int | None]:
    """``donors`` with ``None`` for every block whose no-donor error is at or below the error with
    its donor (``error[i][donor]``); blocks with a missing value keep their donor."""
    out: dict[int, int | None] = {}
    for i, j in donors.items():
        shared, alone = _value(error[i][j]), _value(no_donor[i]) if i < len(no_donor) else math.nan
        out[i] = None if math.isfinite(shared) and math.isfinite(alone) and alone <= shared else j
    return out


# Measured on the embedded chat model (bench/chat.py, default plan, chat recipe, 100 steps): nine slots
# without donors answered 20 of 73 fidelity prompts with 2 looping replies (20.04 / 150.76); the same
# slots on their nearest kept blocks answered 20 with 10 loops (20.36 / 165.92, `--donors nearest`).
# On the text (bench/quality.py) no donor also beat block 0 for every slot, 21.59 / 148.48 against
# 22.16 / 153.80. So where no share error was measured, a slot gets no donor rather than a guess.
NO_SHARE_ERROR_RULE = "no donor: no share error was measured, and slots without donors won the benchmarks"


def suggested_donor(analysis: Mapping[str, Any] | None, plan, block: int) -> int | None:
    """The donor an analysis suggests when ``block`` is pruned from a flexigpt ``plan`` by hand.

    The kept block (after the edit) with the lowest share error in the matrix of the analysis'
    ``donor_suggestion``, as ``plan_from_analysis`` picks donors; ``None`` when the analysis has no
    share error, describes another depth, or has no value in that block's row (the plan's own
    default, the nearest kept block, then applies).
    """
    if not isinstance(analysis, Mapping) or analysis.get("num_blocks") != plan.num_blocks:
        return None
    matrix = donor_matrix(analysis)[2]
    if not matrix or not 0 <= block < len(matrix) or all(v is None for v in matrix[block]):
        return None
    return choose_donors(matrix, plan.drop(block).pruned_blocks)[block]


def suggests_no_donor(analysis: Mapping[str, Any] | None, plan, block: int) -> bool:
    """Whether an analysis suggests a slot with no donor when ``block`` is pruned by hand from a
    ``plan`` whose method allows one (``allows_no_donor``): its own rank-r fit reproduces it at least as well as the suggested donor
    (``prefer_no_donor``, as ``plan_from_analysis`` decides), or the analysis measured no share
    error at all (then no donor is the measured default: ``NO_SHARE_ERROR_RULE``). False without an
    analysis of this depth, and where a weight-space metric alone was measured."""
    if not plan.method_spec.allows_no_donor or not isinstance(analysis, Mapping) \
            or analysis.get("num_blocks") != plan.num_blocks:
        return False
    metric, rank, matrix = donor_matrix(analysis)
    if matrix is None:
        return True
    alone = no_donor_errors(analysis, metric, rank)
    donor = suggested_donor(analysis, plan, block)
    if alone is None or donor is None or len(alone) != plan.num_blocks:
        return False
    return prefer_no_donor({block: donor}, matrix, alone)[block] is None


def drop_with_suggestion(plan, analysis: Mapping[str, Any] | None, block: int, *, no_donor: bool = True):
    """``plan`` with ``block`` pruned (or still pruned) and its slot given the analysis' choice: no
    donor where ``suggests_no_donor`` (unless ``no_donor`` is False), else ``suggested_donor``; with
    no suggestion, a newly pruned block gets the plan's own default and a pruned one is re-dropped."""
    if no_donor and suggests_no_donor(analysis, plan, block):
        return (plan if block in plan.pruned_blocks else plan.drop(block)).with_donor(block, None)
    donor = suggested_donor(analysis, plan, block)
    if block in plan.pruned_blocks and donor is not None:
        return plan.with_donor(block, donor)
    return plan.drop(block, donor)


def _check_matrix(matrix: Sequence[Sequence[Any]], L: int) -> None:
    if len(matrix) != L or any(len(row) != L for row in matrix):
        raise ValueError(f"share_error must be an {L} x {L} matrix, got {len(matrix)} rows")
