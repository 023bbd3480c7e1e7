"""What would a draft cost, and how fast would it decode? Measured step costs and an exact replay.

``measure_costs`` times the pieces one decoding step is made of on this machine: every block's
attention and MLP sub-layer for one token, the whole stack for a few tokens at once (a verify
pass), the LM head for one and several positions and the draft head for a few row counts.
``replay`` then replays self-speculative decoding of calibration continuations, whose draft
predictions were computed teacher-forced: it runs the same threshold rule as the decoder, so it
knows exactly how many tokens each round drafts and keeps, and prices every round with the
measured costs. The search (``flexigpt.draft_search``) ranks candidate drafts by this
predicted speed before it measures the best few for real.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

from flexigpt.runner import BlockRunner
from flexigpt.self_speculative import AdaptiveThreshold, DraftConfig, DraftHead

log = logging.getLogger(__name__)

__all__ = ["StepCosts", "measure_costs", "replay"]


@dataclass(frozen=True)
class StepCosts:
    """Seconds of the pieces of a decoding step (one token unless a count is given).

    Attributes:
        attn / mlp: per block, its attention / MLP sub-layer (norm included).
        stack_ratio: ``stack_ratio[n - 1]``: a pass over ``n`` tokens relative to one token.
        head: ``head[n - 1]``: the full LM head over ``n`` positions.
        draft_head: ``{(rows, precision): seconds}`` of the draft head (rows 0: all rows).
        overhead: fixed seconds per pass (embedding, argmax, bookkeeping).
    """

    attn: tuple[float, ...]
    mlp: tuple[float, ...]
    stack_ratio: tuple[float, ...]
    head: tuple[float, ...]
    draft_head: dict
    overhead: float

    @property
    def full_step(self) -> float:
        """One plain greedy step: every block, the full head, the fixed overhead."""
        return sum(self.attn) + sum(self.mlp) + self.head[0] + self.overhead

    def blocks(self, lo: int, hi: int, skip_attn=(), skip_mlp=()) -> float:
        """One token through blocks ``lo .. hi - 1`` with the given sub-layers skipped."""
        return (sum(t for i, t in enumerate(self.attn[lo:hi], lo) if i not in skip_attn)
                + sum(t for i, t in enumerate(self.mlp[lo:hi], lo) if i not in skip_mlp))

    def head_cost(self, rows: int, vocab: int, precision: str = "float32") -> float:
        rows = 0 if rows >= vocab else rows
        if (rows, precision) in self.draft_head:
            return self.draft_head[(rows, precision)]
        return self.head[0] if rows == 0 else self.head[0] * rows / vocab

    def to_dict(self) -> dict:
        return {"attn": list(self.attn), "mlp": list(self.mlp), "stack_ratio": list(self.stack_ratio),
                "head": list(self.head), "draft_head": {f"{r}/{p}": v for (r, p), v in self.draft_head.items()},
                "overhead": self.overhead}


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_costs(runner: BlockRunner, *, context: int = 64, max_tokens: int = 9, rows=(0, 4096, 8192, 16384),
                  precisions=("float32",), repeats: int = 5, blocks_only: bool = False) -> StepCosts:
    """Time the pieces of a decoding step on this machine (a second or two on a 135M model).

    Args:
        context: cached positions the timed steps attend to.
        max_tokens: largest verify pass timed (draft length + 1).
        rows: draft-head row counts timed (0: all rows); precisions: their storage precisions.
        repeats: timings per piece (the median is kept).
        blocks_only: time only the sub-layers (for a draft's own block copies).
    """
    n = runner.num_layers
    hidden = runner.embed(torch.randint(0, runner.weight.shape[0], (1, context), device=runner.device))
    cache = runner.new_cache(context + max_tokens + 1)
    runner.run(hidden, 0, n, cache, 0)
    one = hidden[:, -1:] * 1.0
    attn, mlp = [], []
    for i in range(n):
        attn.append(_median_time(lambda: (runner.run(one, i, i + 1, cache, context, skip_mlp={i}), cache.crop(context)),
                                 repeats))
        mlp.append(_median_time(lambda: runner.run(one, i, i + 1, cache, context, skip_attn={i}), repeats))
    if blocks_only:
        return StepCosts(tuple(attn), tuple(mlp), (1.0,), (0.0,), {}, 0.0)
    stack = []
    for k in range(1, max_tokens + 1):
        x = hidden[:, :k] * 1.0
        stack.append(_median_time(lambda: (runner.run(x, 0, n, cache, context), cache.crop(context)), max(2, repeats // 2)))
    head = [_median_time(lambda: runner.logits(hidden[:, :k]), repeats) for k in range(1, max_tokens + 1)]
    vocab = runner.weight.shape[0]
    draft_head = {}
    for precision in precisions:
        for r in rows:
            if r < vocab:
                small = DraftHead(runner.weight, r, precision).base
                draft_head[(int(r), precision)] = _median_time(
                    lambda: torch.softmax(runner.logits(one, head=small)[-1].float(), -1).max(-1), repeats)
    token = torch.tensor([[1]], device=runner.device)
    overhead = _median_time(lambda: (runner.embed(token), runner.rotary_for(one, context), float(one[0, 0, 0])), repeats)
    ratio = tuple(s / stack[0] for s in stack)
    return StepCosts(tuple(attn), tuple(mlp), ratio, tuple(head), draft_head, overhead)


def replay(costs: StepCosts, config: DraftConfig, predictions: list[tuple[list[int], list[float], list[int]]],
           vocab: int, draft_costs: StepCosts | None = None) -> dict:
    """Replay self-speculative decoding of calibration continuations and price it.

    Args:
        costs: measured step costs.
        config: the draft (its threshold rule and length are replayed exactly).
        predictions: per continuation ``(draft_tokens, draft_confidences, target_tokens)``, where
            ``draft_tokens[i]`` is the draft's (teacher-forced) guess of ``target_tokens[i + 1]``.
        vocab: the full vocabulary size.
        draft_costs: sub-layer costs of the draft's own blocks (a lower-precision copy).

    Returns:
        ``{"seconds", "plain_seconds", "speedup", "acceptance", "tokens"}`` (generation only, no prefill).
    """
    n = len(costs.attn)
    f = min(config.first_skipped, n) if config.precision == "float32" else 0
    prefix = costs.blocks(0, f)
    rest_full = costs.blocks(f, n)
    draft_step = (draft_costs or costs).blocks(f, n, set(config.skip_attn), set(config.skip_mlp)) + costs.head_cost(
        config.draft_vocab, vocab, config.precision) + costs.overhead
    seconds = plain = 0.0
    drafted = accepted = tokens = 0
    for guesses, confidence, truth in predictions:
        policy = AdaptiveThreshold(config.threshold, config.target_acceptance)
        length = len(truth)
        plain += (length - 1) * costs.full_step
        i = 0
        while i < length - 1:
            budget = min(config.max_draft, length - 1 - i - 1)
            j = 0
            steps = 0  # draft steps through the draft's own layers
            while j < budget:
                steps += 1
                if confidence[i + j] < policy.value:
                    break
                j += 1
            m = 0
            while m < j and guesses[i + m] == truth[i + m + 1]:
                m += 1
            k = min(j + 1, len(costs.stack_ratio))
            seconds += (j + 1) * (prefix + costs.overhead) + steps * draft_step
            seconds += rest_full * costs.stack_ratio[k - 1] + costs.head[min(j, len(costs.head) - 1)] + costs.overhead
            policy.update(j, m)
            drafted += j
            accepted += m
            i += m + 1
            tokens += m + 1
    return {"seconds": seconds, "plain_seconds": plain, "speedup": plain / seconds if seconds else 0.0,
            "acceptance": accepted / drafted if drafted else 0.0, "tokens": tokens}
