"""Which blocks to drop when they interact? Iterative selection by calibration perplexity (SLEB).

One-shot scores (Block Influence, remove-one perplexity) rate every block against the full model.
SLEB removes blocks one at a time instead: in each round it removes the block whose removal raises
the calibration perplexity least, then re-measures every remaining block on the cut model, so a
block that only looked redundant next to a neighbour that is now gone is not removed as well.

Cost. A round needs one perplexity per remaining block, but the blocks before a candidate are
unchanged by its removal: the state entering every block of the current model is cached, and a
candidate at position ``k`` of ``n`` blocks runs only the ``n - k - 1`` blocks after it plus the
LM head. A round therefore costs about ``n / 2`` forward passes of blocks plus ``n`` LM heads
(on the embedded SmolLM2 the 49k-token head weighs about 8 blocks, so the first round is about 18
forward passes' worth, later rounds less), and one more partial pass refreshes the cached states
after the removal. Use few windows (8 x 128 tokens is enough to rank blocks).

Screening (the default) cuts that cost about threefold. Every remaining block is first tried on
the first ``screen_windows`` windows only; the ``shortlist`` blocks whose removal hurts those
windows least are then finished on the other windows (their screening NLL is reused), and the
round removes the best of them by the NLL over all windows. When the shortlist holds the block
that exact SLEB would remove, the result is the same. On the embedded SmolLM2 (8 x 128 tokens,
2 screening windows, shortlist 3) the removal order equals exact SLEB's for all nine removals,
measured offline from every candidate's per-window NLL in each round (bench/RESULTS.md). A
shortlist of 0 evaluates every block on every window (exact SLEB, the paper's procedure).

Results are cached on disk under ``cache_dir()/selection``, keyed by the model fingerprint and the
calibration windows (their protocol and a hash of the token ids). Selection is greedy and
deterministic, so one cache entry serves every ``n_remove`` up to the longest order computed; a
longer request resumes from the cached order.

Paper: SLEB (Song et al., ICML 2024), https://arxiv.org/abs/2402.09025
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from flexigpt.arch import get_blocks
from flexigpt.atomic import write_text
from flexigpt.models import cache_dir, fingerprint
from flexigpt.residual_states import block_states, head_nll, run_block, window_ids

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "MAX_TOKENS", "SCREEN_WINDOWS", "SHORTLIST", "SelectionResult", "iterative_selection"]

FORMAT_VERSION = 1
SCREEN_WINDOWS = 2  # windows every candidate is tried on before the shortlist
SHORTLIST = 3  # candidates per round finished on all windows; 0 = exact SLEB
MAX_TOKENS = 16384  # every block's input state is kept: 16k tokens x 30 blocks x 576 floats is about 1.1 GB


@dataclass(frozen=True)
class SelectionResult:
    """Blocks in the order SLEB removes them, with the calibration perplexity after each removal.

    Attributes:
        order: base block ids (0-based), first removed first.
        ppl: calibration perplexity of the model with ``order[:i + 1]`` removed.
        base_ppl: calibration perplexity of the full model.
        tokens: predicted tokens per perplexity.
        seconds: compute time (of the run that filled the cache, when loaded from it).
        cached: loaded from the on-disk cache.
    """

    order: tuple[int, ...]
    ppl: tuple[float, ...]
    base_ppl: float
    tokens: int
    seconds: float
    cached: bool = False

    def removed(self, n: int | None = None) -> list[int]:
        """The first ``n`` (default all) removed blocks, sorted by id."""
        return sorted(self.order[: len(self.order) if n is None else n])

    def scores(self, num_blocks: int) -> list[float]:
        """Per-block scores, low = removable, for ``plan_from_scores``: a removed block scores its place
        in the removal order, a block never removed ``num_blocks`` or more (in id order)."""
        place = {b: i for i, b in enumerate(self.order)}
        return [float(place.get(b, num_blocks + b)) for b in range(num_blocks)]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "order": list(self.order), "ppl": list(self.ppl),
                "base_ppl": self.base_ppl, "tokens": self.tokens, "seconds": self.seconds, "cached": self.cached}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "SelectionResult":
        if obj.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"selection format_version {obj.get('format_version')!r} is not supported; "
                             f"expected {FORMAT_VERSION}")
        return cls(order=tuple(int(b) for b in obj["order"]), ppl=tuple(float(p) for p in obj["ppl"]),
                   base_ppl=float(obj["base_ppl"]), tokens=int(obj["tokens"]), seconds=float(obj["seconds"]),
                   cached=bool(obj.get("cached", False)))


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(min(nll / tokens, 700.0))


def _cache_path(model: nn.Module, windows: Any, ids: torch.Tensor, screen: tuple[int, int] | None) -> Path:
    protocol = windows.protocol() if hasattr(windows, "protocol") else {"windows": list(ids.shape)}
    key = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint(model), "protocol": protocol,
           "ids": hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()}
    if screen is not None:  # exact SLEB keeps the key it always had
        key["screen"] = list(screen)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "selection" / f"{digest}.json"


def _load(path: Path) -> SelectionResult | None:
    if not path.is_file():
        return None
    try:
        return SelectionResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged entry is recomputed, never trusted
        log.warning("ignoring unreadable selection cache %s (%s)", path, err)
        return None


class _Stack:
    """The current block list and the cached state entering each of its blocks, per batch."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int, removed: tuple[int, ...],
                 screen: int = 0):
        self.model, self.blocks = model, get_blocks(model)
        L = len(self.blocks)
        # with screening, the first batch is the screening windows, so a candidate can be tried on them alone
        head = [ids[:screen]] if screen else []
        self.batches = head + [ids[i : i + batch_size] for i in range(screen, ids.shape[0], batch_size)]
        self.kwargs: list[dict[int, dict]] = []
        inputs: list[dict[int, torch.Tensor]] = []
        self.base_nll = 0.0
        for batch in self.batches:
            st = block_states(model, batch, inputs=range(L), outputs=(L - 1,))
            self.kwargs.append(st.kwargs)
            inputs.append(st.inputs)
            self.base_nll += head_nll(model, st.outputs[L - 1], batch)
        self.alive = [b for b in range(L) if b not in set(removed)]
        if removed:  # resuming a cached order: the states of the cut model, from the embedding output on
            self.states: list[list[torch.Tensor]] = [[] for _ in self.alive]  # states[k][batch]
            self._refresh(0, [x[0] for x in inputs])
        else:
            self.states = [[x[k] for x in inputs] for k in range(L)]

    def _run(self, start: int, entering: list[torch.Tensor], keep: bool, batches: range | None = None) -> float:
        """Run ``alive[start:]`` from ``entering`` (per batch); return the NLL summed over ``batches`` (all)."""
        total = 0.0
        for b in batches if batches is not None else range(len(self.batches)):
            batch, h = self.batches[b], entering[b]
            for k in range(start, len(self.alive)):
                if keep:
                    self.states[k][b] = h
                block = self.alive[k]
                h = run_block(self.blocks[block], h, self.kwargs[b][block])
            total += head_nll(self.model, h, batch)
        return total

    def _refresh(self, start: int, entering: list[torch.Tensor]) -> float:
        for k in range(start, len(self.alive)):
            self.states[k] = [None] * len(self.batches)
        return self._run(start, entering, keep=True)

    def nll_without(self, k: int, batches: range | None = None) -> float:
        """Summed NLL over ``batches`` (all) with the block at position ``k`` removed (only the blocks
        after it run)."""
        return self._run(k + 1, self.states[k], keep=False, batches=batches)

    def remove(self, k: int) -> float:
        """Remove position ``k`` and refresh the states after it; returns the new summed NLL."""
        entering = self.states[k]
        del self.alive[k], self.states[k]
        return self._run(k, entering, keep=True) if k < len(self.alive) else self._head(entering)

    def _head(self, hidden: list[torch.Tensor]) -> float:
        return sum(head_nll(self.model, h, batch) for batch, h in zip(self.batches, hidden))


def _check_count(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@torch.no_grad()
def iterative_selection(
    model: nn.Module,
    windows: Any,
    n_remove: int,
    *,
    batch_size: int = 8,
    shortlist: int = SHORTLIST,
    screen_windows: int = SCREEN_WINDOWS,
    progress: bool = False,
    callback: Callable[[float, str], None] | None = None,
    cache: bool = True,
) -> SelectionResult:
    """Remove ``n_remove`` blocks one at a time, each the one whose removal hurts calibration perplexity least.

    The model is not modified (blocks are skipped by running the cached stack, never removed).

    Args:
        model: a supported ``*ForCausalLM``.
        windows: calibration windows (train split; ``flexigpt.data.Windows`` or an ``(N, T)`` id
            tensor), at most ``MAX_TOKENS`` tokens; 8 x 128 is a good size.
        n_remove: blocks to remove, ``1..L-1``.
        batch_size: windows per block call.
        shortlist: candidates per round finished on every window after screening (module
            docstring); ``0`` tries every block on every window (exact SLEB).
        screen_windows: the first windows every candidate is tried on; with as many windows as
            there are (or more) there is no screening.
        progress: show a tqdm bar.
        callback: ``callback(fraction, message)`` after every candidate.
        cache: read and write the on-disk cache.

    Returns:
        SelectionResult with exactly ``n_remove`` entries; ``ppl`` is always over all windows.

    Raises:
        ValueError: ``n_remove``, ``batch_size``, ``shortlist``, ``screen_windows`` or the windows
            out of range.
    """
    L = len(get_blocks(model))
    if not isinstance(n_remove, int) or isinstance(n_remove, bool) or not 1 <= n_remove <= L - 1:
        raise ValueError(f"n_remove {n_remove!r} is outside 1..{L - 1} (a model keeps at least one of {L} blocks)")
    _check_count("batch_size", batch_size, 1)
    _check_count("shortlist", shortlist, 0)
    _check_count("screen_windows", screen_windows, 1)
    ids = window_ids(windows)
    if ids.numel() > MAX_TOKENS:
        raise ValueError(f"{ids.shape[0]} x {ids.shape[1]} = {ids.numel()} calibration tokens is over the "
                         f"{MAX_TOKENS} that iterative selection keeps per block; use fewer or shorter windows")
    screen = screen_windows if shortlist and screen_windows < ids.shape[0] else 0
    report = callback or (lambda fraction, message: None)
    path = _cache_path(model, windows, ids, (screen, shortlist) if screen else None) if cache else None
    known = _load(path) if path is not None else None
    if known is not None and len(known.order) >= n_remove:
        report(1.0, "loaded from cache")
        return SelectionResult(order=known.order[:n_remove], ppl=known.ppl[:n_remove], base_ppl=known.base_ppl,
                               tokens=known.tokens, seconds=known.seconds, cached=True)
    start_time = time.perf_counter()
    order = list(known.order) if known is not None else []
    ppl = list(known.ppl) if known is not None else []
    was_training = model.training
    model.eval()
    try:
        stack = _Stack(model, ids, batch_size, tuple(order), screen=screen)
        first, rest = (range(1), range(1, len(stack.batches))) if screen else (None, None)
        tokens = int(ids.shape[0] * (ids.shape[1] - 1))
        per_round = (lambda n: n + min(shortlist, n)) if screen else (lambda n: n)
        work = sum(per_round(len(stack.alive) - r) for r in range(n_remove - len(order)))
        done = 0
        bar = tqdm(total=work, desc="Iterative selection", disable=not progress)

        def tick(message: str) -> None:
            nonlocal done
            done += 1
            bar.update(1)
            report(done / work, message)

        while len(order) < n_remove:
            round_name = f"round {len(order) + 1}/{n_remove}"
            candidates = range(len(stack.alive))
            nll = {}
            for k in candidates:
                nll[k] = stack.nll_without(k, first)
                tick(f"{round_name}: {'screened' if screen else 'tried'} block {stack.alive[k]}")
            if screen:
                short = sorted(candidates, key=lambda k: (nll[k], k))[:shortlist]
                for k in short:  # the screening NLL plus the other windows' NLL
                    nll[k] += stack.nll_without(k, rest)
                    tick(f"{round_name}: finished block {stack.alive[k]}")
                nll = {k: nll[k] for k in short}
            best_k = min(nll, key=lambda k: (nll[k], k))
            block = stack.alive[best_k]
            removed_nll = stack.remove(best_k)
            order.append(block)
            ppl.append(_ppl(removed_nll, tokens))
            log.info("iterative selection: removed block %d, calibration ppl %.3f", block, ppl[-1])
        bar.close()
    finally:
        model.train(was_training)
    seconds = (known.seconds if known is not None else 0.0) + time.perf_counter() - start_time
    result = SelectionResult(order=tuple(order), ppl=tuple(ppl), base_ppl=_ppl(stack.base_nll, tokens),
                             tokens=tokens, seconds=seconds)
    if path is not None:
        write_text(path, json.dumps(result.to_dict(), allow_nan=False))
    report(1.0, "iterative selection done")
    return result
