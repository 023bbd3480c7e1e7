"""Which plan do the scores suggest? Plans proposed from block scores, an analysis, or a list
of blocks to repeat.

``flexigpt.plan.core`` defines the format and validates it; this module only chooses blocks:
the ``round(ratio * L)`` lowest-scored blocks are pruned (FlexiGPT, ShortGPT), removed and the
rest grouped (FoldGPT), or copied (extension). Import them from ``flexigpt.plan``.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
FoldGPT (Liu et al., 2024), https://arxiv.org/abs/2407.00928
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flexigpt.methods import get_method
from flexigpt.plan.core import Plan
from flexigpt.plan.donors import (NO_SHARE_ERROR_RULE, _check_matrix, choose_donors, donor_matrix, no_donor_errors,
                                  prefer_no_donor, suggested_donor)
from flexigpt.plan.specs import AdapterSpec, ExtendSpec, NoteValue
from flexigpt.spans import lowest_spans
from flexigpt.validate import MAX_BLOCKS, MAX_RATIO
from flexigpt.validate import check_float as _float
from flexigpt.validate import check_int as _int

__all__ = ["extend_plan", "foldgpt_plan", "plan_from_analysis", "plan_from_scores", "suggested_donor"]


def plan_from_scores(
    base_model: str,
    block_influence: Sequence[float],
    ratio: float,
    *,
    share_error: Sequence[Sequence[float | None]] | None = None,
    method: str = "flexigpt",
    adapter: AdapterSpec | None = None,
    protect: Iterable[int] = (),
    extend_mode: str = "block",
    group_size: int = 2,
    notes: Mapping[str, NoteValue] | None = None,
    no_donor: Sequence[float | None] | None = None,
) -> Plan:
    """Prune (or, for ``extend``, copy) the ``round(ratio * L)`` lowest-BI blocks.

    Args:
        base_model: model reference stored in the plan.
        block_influence: ``(L,)`` Block Influence scores (low = removable).
        ratio: fraction of blocks in ``[0, 0.9]``.
        share_error: ``(L, L)`` share error (rows pruned, columns donor; ``None`` = not computed);
            donors are its row minima over kept blocks (``flexigpt.sharing.choose_donors``).
            Without it, or for rows with no value, each pruned block takes the nearest kept block.
        method: ``flexigpt``, ``drop``, ``extend`` or ``foldgpt`` (remove, then group the rest).
        adapter: adapter settings (default ``AdapterSpec()``).
        protect: block ids never chosen (e.g. ``(0, L - 1)``).
        extend_mode: layout for ``extend`` (``block`` or ``sequential``).
        group_size: kept blocks per group for ``foldgpt``.
        notes: extra provenance stored in the plan.
        no_donor: ``(L,)`` share error of a slot with no donor, in ``share_error``'s units; a pruned
            block whose value is at or below its best donor's gets no donor (``prefer_no_donor``).
    """
    scores = list(block_influence)
    L = len(scores)
    if L == 0:
        raise ValueError("block_influence is empty")
    for i, v in enumerate(scores):
        _float(v, f"block_influence[{i}]", -1e6, 1e6)
    _float(ratio, "ratio", 0.0, MAX_RATIO)
    target = get_method(method)
    protected = {_int(b, "protected block", 0, L - 1) for b in protect}
    n = int(round(ratio * L))
    candidates = sorted((b for b in range(L) if b not in protected), key=lambda b: (scores[b], b))
    if n > len(candidates) or (method != "extend" and n >= L):
        raise ValueError(f"ratio {ratio} selects {n} of {L} blocks but only {len(candidates)} are unprotected")
    chosen = sorted(candidates[:n])
    meta = {"ratio": float(ratio), "selection": "lowest block influence", **(notes or {})}
    adapter = adapter or AdapterSpec()
    if method == "extend":
        return extend_plan(base_model, L, chosen, extend_mode, adapter=adapter, notes=meta)
    kept = [b for b in range(L) if b not in chosen]
    donors: dict[int, int | None] = {}
    if share_error is not None and chosen and target.chooses_donors:
        _check_matrix(share_error, L)
        donors = choose_donors(share_error, chosen)
        if no_donor is not None and target.allows_no_donor:
            if len(no_donor) != L:
                raise ValueError(f"no-donor errors must list {L} values, got {len(no_donor)}")
            donors = prefer_no_donor(donors, share_error, no_donor)
    start = Plan(base_model, L, tuple(range(L)), "drop", adapter, notes=tuple(sorted(meta.items())))
    return target.from_pruned(start, set(chosen), donors=donors, group_size=group_size)


def plan_from_analysis(analysis: Mapping[str, Any], ratio: float, *, method: str = "flexigpt",
                       adapter: AdapterSpec | None = None, protect: Iterable[int] = (), extend_mode: str = "block",
                       metric: str | None = None, rank: int | None = None, group_size: int = 2,
                       scores: Sequence[float] | None = None, selection: str | None = None,
                       keep_donors: bool = False) -> Plan:
    """A plan from an ``analysis.json`` dict (see the schema in the docs).

    Uses ``block_influence`` for the selection (or ``scores``, low = removable, described by
    ``selection``: e.g. the removal order of iterative selection) and the share-error matrix named
    by ``donor_suggestion`` (its ``metric`` and ``rank``; override with ``metric``/``rank``).
    Where that metric also measured a slot without a donor (``function``), a flexigpt slot whose
    block is reproduced better by its own rank-r fit gets no donor, as the analysis suggests; an
    analysis without any share error gives every flexigpt slot no donor (``NO_SHARE_ERROR_RULE``).
    ``keep_donors=True`` gives every slot its best donor instead (the nearest kept block without a
    share error).
    """
    if not isinstance(analysis, Mapping):
        raise ValueError(f"analysis must be a JSON object, got {type(analysis).__name__}")
    if analysis.get("format_version") != 1:
        raise ValueError(f"unknown analysis format_version {analysis.get('format_version')!r}; expected 1")
    for key in ("model", "num_blocks", "block_influence"):
        if key not in analysis:
            raise ValueError(f"analysis is missing {key!r}")
    L = _int(analysis["num_blocks"], "analysis num_blocks", 1, MAX_BLOCKS)
    bi = analysis["block_influence"]
    if not isinstance(bi, list) or len(bi) != L:
        raise ValueError(f"analysis block_influence must list {L} values, got {bi!r:.200}")
    target = get_method(method)
    if target.uses_spans:
        return _span_plan(analysis, L, bi, ratio, target, adapter or AdapterSpec(), protect)
    metric, rank, matrix = donor_matrix(analysis, metric, rank)
    alone = None if keep_donors or matrix is None else no_donor_errors(analysis, metric, rank)
    donorless = matrix is None and not keep_donors and target.allows_no_donor
    notes = {"analysis_model": analysis["model"], "analysis_fingerprint": analysis.get("fingerprint"),
             "analysis_data": analysis.get("data"), "analysis_samples": analysis.get("samples"),
             "analysis_seq_len": analysis.get("seq_len"),
             "donor_metric": metric if matrix is not None else "none measured" if donorless else "nearest kept block",
             "donor_rank": rank if matrix is not None else None}
    if alone is not None and target.allows_no_donor:
        notes["donor_rule"] = "no donor where the block's own rank-r fit beats its best donor"
    if donorless:
        notes["donor_rule"] = NO_SHARE_ERROR_RULE
    if scores is not None:
        if len(scores) != L:
            raise ValueError(f"selection scores must list {L} values, got {len(scores)}")
        notes["selection"] = selection or "given scores"
    plan = plan_from_scores(str(analysis["model"]), bi if scores is None else scores, ratio, share_error=matrix,
                            method=method, adapter=adapter, protect=protect, extend_mode=extend_mode,
                            group_size=group_size, notes=notes, no_donor=alone)
    if donorless:
        for b in plan.replaced_slots:
            plan = plan.with_donor(b, None)
    return plan


def _span_plan(analysis: Mapping[str, Any], L: int, bi: Sequence[float], ratio: float, target, adapter: AdapterSpec,
               protect: Iterable[int]) -> Plan:
    """A span method's proposal: the one span of ``round(ratio * L)`` blocks with the lowest angular
    distance (the analysis' triangle), as ReplaceMe and LLM-Streamline choose; without that row,
    the lowest-BI blocks grouped into contiguous runs."""
    _float(ratio, "ratio", 0.0, MAX_RATIO)
    n = int(round(ratio * L))
    if n < 1:
        raise ValueError(f"ratio {ratio} cuts no block of {L}; a {target.name} plan cuts at least one span")
    rows = (analysis.get("angular_distance") or {}).get("values") or []
    meta = {"ratio": float(ratio), "analysis_model": analysis["model"], "analysis_data": analysis.get("data"),
            "analysis_samples": analysis.get("samples"), "analysis_seq_len": analysis.get("seq_len")}
    start = Plan(str(analysis["model"]), L, tuple(range(L)), "drop", adapter)
    protected = set(protect)
    if len(rows) >= n:
        row = [None if any(b in protected for b in range(s, s + n)) else v for s, v in enumerate(rows[n - 1])]
        spans = lowest_spans(row, n, L, allow_first=target.allow_first)
        meta["selection"] = f"lowest angular distance span of {n} blocks"
        return target.with_spans(start, spans).with_notes(**meta)
    plan = plan_from_scores(str(analysis["model"]), bi, ratio, method=target.name, adapter=adapter, protect=protect)
    return plan.with_notes(**meta, selection="lowest block influence, as contiguous runs")


def extend_plan(base_model: str, num_blocks: int, blocks: Iterable[int], mode: str = "block", *,
                adapter: AdapterSpec | None = None, notes: Mapping[str, NoteValue] | None = None) -> Plan:
    """An ``extend`` plan.

    ``block`` mode puts a copy right after each chosen block (..., k, k', k+1, ...);
    ``sequential`` mode needs a contiguous span a..b and repeats it once after itself
    (..., a..b, a'..b', b+1, ...).
    """
    L = _int(num_blocks, "num_blocks", 1, MAX_BLOCKS)
    chosen = [_int(b, "extend block", 0, L - 1) for b in blocks]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"extend blocks contain duplicates: {chosen}")
    chosen = sorted(chosen)
    spec = ExtendSpec(mode)  # validates mode
    if mode == "block":
        lm = [x for b in range(L) for x in ((b, b) if b in chosen else (b,))]
    else:
        if chosen and chosen != list(range(chosen[0], chosen[-1] + 1)):
            raise ValueError(f"sequential mode repeats a contiguous span of blocks, got {chosen}")
        end = chosen[-1] + 1 if chosen else L
        lm = list(range(end)) + chosen + list(range(end, L))
    meta = {"extend_blocks": ",".join(map(str, chosen)), **(notes or {})}
    return Plan(base_model, L, tuple(lm), "extend", adapter or AdapterSpec(), extend=spec, notes=tuple(sorted(meta.items())))


def foldgpt_plan(base_model: str, scores: Sequence[float], ratio: float, group_size: int = 2, *,
                 selection: str = "lowest FoldGPT gate", protect: Iterable[int] = (),
                 adapter: AdapterSpec | None = None, notes: Mapping[str, NoteValue] | None = None) -> Plan:
    """A FoldGPT plan: remove the ``round(ratio * L)`` lowest-scored blocks, then split the kept
    blocks into groups of ``group_size`` consecutive kept blocks that run their first member's
    weights, each member with its own pre-norms.

    Args:
        base_model: model reference stored in the plan.
        scores: ``(L,)`` per-block scores, low = removable: FoldGPT gate values
            (``flexigpt.gates.train_gates(...).gates``) or, without trained gates, Block Influence.
        ratio: fraction of blocks removed, in ``[0, 0.9]``.
        group_size: kept blocks per group (1 = no sharing: a plain drop with own, trainable norms).
        selection: what ``scores`` are, recorded in the plan's notes.
        protect: block ids never removed.
        adapter: only ``train_prenorms`` matters for foldgpt (default ``AdapterSpec()``).
        notes: extra provenance stored in the plan.
    """
    return plan_from_scores(base_model, scores, ratio, method="foldgpt", adapter=adapter, protect=protect,
                            group_size=group_size, notes={"selection": selection, **(notes or {})})
