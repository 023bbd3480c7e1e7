"""What do span methods share? Plans that cut contiguous runs of blocks (``Plan.spans``), each run
replaced as one: by a linear map (``replaceme``) or by one trained block (``streamline``).

``spans`` lists ``(start, end)`` runs of 0-based block ids, end exclusive; ``layer_map`` is then
fixed by them (``SpanMethod.layout``). In the plan editor a span method reads its pruned set as
runs: pruning or keeping one block recomputes the spans as the maximal contiguous runs of the
pruned blocks (so pruning 12 next to a span 13..15 makes one span 12..15).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar

from flexigpt.methods.base import Method
from flexigpt.spans import check_spans, runs, span_blocks

__all__ = ["SpanMethod", "parse_spans"]


def parse_spans(text: str) -> list[tuple[int, int]]:
    """``"12:17,20:23"`` -> ``[(12, 17), (20, 23)]`` (``start:end``, 0-based, end exclusive)."""
    out = []
    for part in filter(None, (t.strip() for t in str(text).split(","))):
        a, sep, b = part.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ValueError(f"--spans expects START:END pairs of 0-based block ids, end exclusive "
                             f"(e.g. 12:17,20:23), got {text!r}")
        out.append((int(a), int(b)))
    if not out:
        raise ValueError(f"--spans names no span: {text!r}")
    return out


class SpanMethod(Method):
    """A method whose plan names ``spans``; subclasses give ``layout`` and the surgery."""

    uses_spans = True
    format_version = 4
    allow_first: ClassVar[bool] = True  # whether a span may start at block 0

    def layout(self, num_blocks: int, spans) -> tuple[int, ...]:
        """The ``layer_map`` that ``spans`` imply (default: the blocks outside every span)."""
        cut = set(span_blocks(spans))
        return tuple(b for b in range(num_blocks) if b not in cut)

    def validate(self, plan) -> None:
        if plan.spans is None:
            raise ValueError(f"a {self.name} plan names the spans it replaces (spans: [[start, end], ...]), got none")
        spans = check_spans([list(s) for s in plan.spans], plan.num_blocks, allow_first=self.allow_first)
        if tuple(plan.spans) != tuple(spans):
            raise ValueError(f"spans must be listed in increasing order, got {[list(s) for s in plan.spans]}")
        expected = self.layout(plan.num_blocks, spans)
        if tuple(plan.layer_map) != expected:
            raise ValueError(f"a {self.name} layer_map follows from its spans {[list(s) for s in spans]}: expected "
                             f"{list(expected)}, got {list(plan.layer_map)}")

    def pruned_blocks(self, plan) -> tuple[int, ...]:
        return span_blocks(plan.spans or ())

    def unstored_blocks(self, plan) -> tuple[int, ...]:
        return self.pruned_blocks(plan)

    def short_name(self, plan) -> str:
        shown = ", ".join(f"{s}-{e - 1}" for s, e in plan.spans or ())
        return f"{self.name} {shown}"

    def from_pruned(self, plan, pruned, *, donors=None, group_size=None):
        spans = tuple(runs(pruned))
        if not spans:
            raise ValueError(f"a {self.name} plan cuts at least one span of blocks; none is pruned")
        return dataclasses.replace(plan, method=self.name, layer_map=self.layout(plan.num_blocks, spans),
                                   sources=None, extend=None, spans=spans)

    def with_spans(self, plan, spans):
        """``plan`` as this method with exactly ``spans`` cut (validated, with a message)."""
        spans = tuple(check_spans([list(s) for s in spans], plan.num_blocks, allow_first=self.allow_first))
        return dataclasses.replace(plan, method=self.name, layer_map=self.layout(plan.num_blocks, spans),
                                   sources=None, extend=None, spans=spans)

    def needs_calibration(self, plan, fit_steps: int = 0) -> bool:
        return True

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        if "--spans" not in parser._option_string_actions:  # shared by every span method
            parser.add_argument("--spans", default=None,
                                help="replaceme/streamline: the spans to cut, START:END pairs of 0-based block ids, "
                                     "end exclusive, e.g. 12:17,20:23 (default: the lowest angular-distance span "
                                     "of round(ratio x blocks) blocks)")

    def apply_cli_options(self, plan, args: argparse.Namespace) -> Any:
        spans = getattr(args, "spans", None)
        return plan if not spans else self.with_spans(plan, parse_spans(spans))
