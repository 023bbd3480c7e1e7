"""Which contiguous runs of blocks are cut together? Spans: validation, runs of a pruned set, and
the lowest angular-distance spans. Pure Python (no torch), so plan validation stays light.

A *span* ``(start, end)`` is a contiguous run of 0-based block ids, ``end`` exclusive. ReplaceMe
(``flexigpt.replaceme``) replaces a span by one linear map folded into the block before it;
LLM-Streamline (``flexigpt.streamline``) by one trained block.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["Span", "check_spans", "lowest_spans", "runs", "span_blocks"]

Span = tuple[int, int]


def check_spans(spans: Sequence[Sequence[int]], num_blocks: int, *, allow_first: bool = False) -> list[Span]:
    """Validate spans and return them as sorted ``(start, end)`` tuples.

    Args:
        spans: ``[start, end)`` pairs of 0-based block ids.
        num_blocks: blocks in the model.
        allow_first: accept a span starting at block 0 (ReplaceMe needs a block before the span
            and refuses it; a trained replacement block does not).

    Raises:
        ValueError: a malformed, empty, out-of-range or overlapping span, a span at block 0 when
            not allowed, or spans that together remove every block; the message names the span
            and the valid range.
    """
    if not isinstance(num_blocks, int) or num_blocks < 2:
        raise ValueError(f"a model needs at least 2 blocks to cut a span, got num_blocks={num_blocks!r}")
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence) or not spans:
        raise ValueError(f"spans must be a non-empty list of [start, end) pairs, got {spans!r:.200}")
    L, low = num_blocks, 0 if allow_first else 1
    out: list[Span] = []
    for span in spans:
        ok = isinstance(span, Sequence) and not isinstance(span, (str, bytes)) and len(span) == 2 \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        if not ok:
            raise ValueError(f"span {span!r:.80} must be a [start, end) pair of integer block ids")
        start, end = int(span[0]), int(span[1])
        if start == 0 and end >= L:
            raise ValueError(f"span [{start}, {end}) covers the whole model; a span must keep at least one of {L} blocks")
        if not 0 <= start < end <= L:
            raise ValueError(f"span [{start}, {end}) is out of range or empty; valid: {low} <= start < end <= {L}")
        if start < low:
            raise ValueError(f"span [{start}, {end}) starts at block 0, which has no block before it to fold the "
                             f"linear map into; valid starts: 1..{L - 1}")
        out.append((start, end))
    out.sort()
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 < e0:
            raise ValueError(f"span [{s1}, {e1}) overlaps span [{s0}, {e0}); spans must not share a block")
    removed = sum(e - s for s, e in out)
    if removed >= L:
        raise ValueError(f"spans {[list(s) for s in out]} remove all {L} blocks; at most {L - 1} can be removed")
    return out


def runs(blocks: Iterable[int]) -> list[Span]:
    """The maximal contiguous runs of ``blocks`` as sorted spans: ``{3, 4, 7}`` -> ``[(3, 5), (7, 8)]``."""
    out: list[Span] = []
    for b in sorted(set(int(x) for x in blocks)):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


def span_blocks(spans: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """Every block id inside ``spans``, sorted."""
    return tuple(sorted(b for s, e in spans for b in range(int(s), int(e))))


def lowest_spans(distances: Sequence[float | None], length: int, num_blocks: int, count: int = 1, *,
                 allow_first: bool = False) -> list[Span]:
    """The ``count`` non-overlapping spans of ``length`` blocks with the lowest angular distance.

    Args:
        distances: the angular distance of the span of ``length`` blocks starting at each block
            (one row of the analysis' ``angular_distance`` triangle; ``None``/NaN = not measured).
        length: blocks per span.
        num_blocks: blocks in the model.
        count: spans to pick, greedily, lowest first, skipping any that overlap an earlier pick.
        allow_first: allow spans starting at block 0 (not for ReplaceMe).

    Raises:
        ValueError: not enough non-overlapping spans, or a count/length out of range.
    """
    L = num_blocks
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length < L:
        raise ValueError(f"span length {length!r} is outside 1..{L - 1}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    values = [math.nan if v is None else float(v) for v in distances]
    starts = [s for s in range(0 if allow_first else 1, len(values)) if s + length <= L and math.isfinite(values[s])]
    starts.sort(key=lambda s: (values[s], s))
    chosen: list[Span] = []
    for s in starts:
        if all(s + length <= a or b <= s for a, b in chosen):
            chosen.append((s, s + length))
            if len(chosen) == count:
                break
    if len(chosen) < count or count * length >= L:
        raise ValueError(f"{count} non-overlapping span(s) of {length} blocks do not fit in {L} blocks "
                         f"(found {len(chosen)}); lower count or length")
    return sorted(chosen)
