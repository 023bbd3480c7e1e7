"""Can the model draft for itself? Exact self-speculative greedy decoding.

The draft is the model itself with some attention and MLP sub-layers skipped, optionally with
its block weights in a lower precision (a float16 or int8 copy, ``flexigpt.inference``), and
optionally with a head over only the first ``draft_vocab`` vocabulary rows (byte-level BPE
numbers its tokens roughly from the most frequent merges down, so the first rows cover most of
a reply; the prompt's own tokens and the end-of-sequence tokens are always added). The draft
proposes tokens while its top-1 probability stays above an adaptive threshold; the full model
checks them all in one pass and keeps the longest prefix it agrees with plus one token of its
own, so the output is the full model's greedy output.

One KV cache serves both. The blocks before the first skipped sub-layer (of a float32 draft)
are the same network in draft and full model: every token passes through them once, one token
at a time, and the verify pass starts from the hidden state the draft left there. In the later
blocks the draft attends to the full model's keys and values of every confirmed token and
appends its own for the tokens it drafts; the cache is cut back by index before the verify pass
writes the full model's (``flexigpt.runner.KVCache``).

Threshold rule (Draft & Verify, Zhang et al. 2023, https://arxiv.org/abs/2309.08168): after
each verification, an exponential average of the acceptance rate is compared with a target; the
threshold rises when the draft is accepted less often than the target and falls otherwise.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from flexigpt.runner import BlockRunner

log = logging.getLogger(__name__)

__all__ = ["AdaptiveThreshold", "DraftConfig", "DraftHead", "SpeculativeResult", "head_for", "self_speculative_generate"]


@dataclass(frozen=True)
class SpeculativeResult:
    """Generated ids (prompt included) and how the draft fared."""

    sequences: torch.Tensor  # (1, prompt + new)
    new_tokens: int
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens the full model agreed with
    target_calls: int  # full-model (verify) passes after the prefill
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class DraftConfig:
    """Which sub-layers the draft skips, its head, and its stopping rule.

    Attributes:
        skip_attn: blocks whose attention sub-layer the draft skips.
        skip_mlp: blocks whose MLP sub-layer the draft skips.
        draft_vocab: vocabulary rows of the draft head (0: all rows).
        precision: the draft's block weights: ``float32`` (the model's own), ``float16`` or ``int8``
            (a copy, ``flexigpt.inference.inference_form``; then no block is shared with the verify).
        max_draft: most tokens drafted per round.
        threshold: starting top-1 probability below which drafting stops.
        target_acceptance: acceptance rate the adaptive threshold steers towards.
    """

    skip_attn: tuple[int, ...] = ()
    skip_mlp: tuple[int, ...] = ()
    draft_vocab: int = 0
    precision: str = "float32"
    max_draft: int = 6
    threshold: float = 0.4
    target_acceptance: float = 0.8
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "skip_attn", tuple(sorted({int(i) for i in self.skip_attn})))
        object.__setattr__(self, "skip_mlp", tuple(sorted({int(i) for i in self.skip_mlp})))
        if self.precision not in ("float32", "float16", "int8"):
            raise ValueError(f"precision must be 'float32', 'float16' or 'int8', got {self.precision!r}")
        if not self.skip_attn and not self.skip_mlp and self.precision == "float32":
            raise ValueError("a float32 draft must skip at least one sub-layer (skip_attn and skip_mlp are both empty)")
        if isinstance(self.max_draft, bool) or not isinstance(self.max_draft, int) or not 1 <= self.max_draft <= 32:
            raise ValueError(f"max_draft must be an integer in 1..32, got {self.max_draft!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold!r}")
        if not 0.0 < self.target_acceptance < 1.0:
            raise ValueError(f"target_acceptance must be in (0, 1), got {self.target_acceptance!r}")
        if not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be an integer >= 0, got {self.draft_vocab!r}")

    @property
    def first_skipped(self) -> int:
        """The first block with a skipped sub-layer (the block count's worth when none is skipped)."""
        return min(self.skip_attn + self.skip_mlp, default=1 << 30)

    def check(self, num_layers: int) -> None:
        """Raises ValueError when a skipped block index is outside ``0 .. num_layers - 1``."""
        bad = sorted(i for i in self.skip_attn + self.skip_mlp if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"skipped blocks {bad} are out of range 0..{num_layers - 1}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["skip_attn"], out["skip_mlp"] = list(self.skip_attn), list(self.skip_mlp)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DraftConfig:
        keys = ("skip_attn", "skip_mlp", "draft_vocab", "precision", "max_draft", "threshold", "target_acceptance",
                "notes")
        return cls(**{k: data[k] for k in keys if k in data})


class AdaptiveThreshold:
    """The confidence threshold below which the draft stops, steered by the acceptance rate.

    Args:
        threshold: the starting threshold.
        target: the acceptance rate to steer towards.
        step: how far one round moves the threshold; smooth: weight of the old acceptance average.
    """

    def __init__(self, threshold: float, target: float, *, step: float = 0.05, smooth: float = 0.5,
                 low: float = 0.0, high: float = 0.95):
        self.value, self.target, self.step, self.smooth = float(threshold), float(target), step, smooth
        self.low, self.high = low, high
        self.rate = float(target)

    def update(self, drafted: int, accepted: int) -> None:
        """Record one verification: ``accepted`` of ``drafted`` draft tokens kept."""
        if drafted == 0:  # the draft stopped at once: nothing learnt about acceptance; be a little bolder
            self.value = max(self.low, self.value - self.step / 2)
            return
        self.rate = self.smooth * self.rate + (1 - self.smooth) * accepted / drafted
        move = self.step if self.rate < self.target else -self.step
        self.value = min(self.high, max(self.low, self.value + move))


class DraftHead:
    """The draft's LM head: the first ``vocab`` rows (all when 0) stored in the draft's precision,
    plus, per prompt, the rows of the prompt's own tokens beyond them (float32).

    Built once per model and draft (``head_for``); ``bind`` adds a prompt's extra rows.
    """

    def __init__(self, weight: torch.Tensor, vocab: int, precision: str):
        # imported on first use: keeps importing this module light
        from flexigpt.inference import LowPrecisionLinear

        total = weight.shape[0]
        self.weight, self.total = weight, total
        self.vocab = vocab if 0 < vocab < total else total
        base = weight[: self.vocab]
        self.base = (lambda h: F.linear(h, base)) if precision == "float32" else LowPrecisionLinear(base, None, precision)
        self.bytes = 0 if precision == "float32" else sum(
            t.numel() * t.element_size() for t in self.base.buffers() if t is not None)

    def bind(self, extra: Iterable[int]):
        """``(head, ids)``: ``head(h) -> logits`` over the draft's rows, ``ids[i]`` the token of
        column ``i`` (``None``: column ``i`` is token ``i``)."""
        more = sorted({int(t) for t in extra if self.vocab <= int(t) < self.total})
        if not more:
            return self.base, None
        index = torch.tensor(more, dtype=torch.long, device=self.weight.device)
        rows = self.weight.index_select(0, index)
        ids = torch.cat([torch.arange(self.vocab, device=self.weight.device), index])
        return (lambda h: torch.cat([self.base(h).to(h.dtype), F.linear(h, rows)], dim=-1)), ids


def head_for(runner: BlockRunner, config: DraftConfig) -> DraftHead:
    """The draft head of ``config`` for ``runner``'s model, built once and kept on the runner."""
    heads = runner.__dict__.setdefault("_draft_heads", {})
    key = (config.draft_vocab, config.precision)
    if key not in heads:
        heads[key] = DraftHead(runner.weight, config.draft_vocab, config.precision)
    return heads[key]


def _eos_set(eos: int | Iterable[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


@torch.no_grad()
def self_speculative_generate(runner: BlockRunner, config: DraftConfig, input_ids: torch.Tensor, max_new_tokens: int,
                              *, eos_token_id: int | Iterable[int] | None = None,
                              draft_runner: BlockRunner | None = None,
                              verify_runner: BlockRunner | None = None, static_cache: bool = True) -> SpeculativeResult:
    """Greedy decoding of ``runner``'s model with its own sub-network drafting (see module docstring).

    Args:
        runner: drives the full model (``flexigpt.runner.BlockRunner``).
        config: the draft (skipped sub-layers, precision, head rows, stopping rule).
        input_ids: ``(1, T)`` prompt.
        max_new_tokens: tokens to generate at most.
        eos_token_id: stop after this token (or any of these tokens).
        draft_runner: drives the draft's blocks when they differ from the full model's (a lower
            precision copy, ``flexigpt.inference.inference_form``); default: ``runner``.
        verify_runner: drives the verify pass over several tokens (``flexigpt.inference.fast_view``
            of the same model: the same weights, a faster kernel for a few rows); default: ``runner``.
        static_cache: preallocated KV cache cut back by index (else concatenating).

    Returns:
        SpeculativeResult; its sequence equals plain greedy decoding's.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"speculative decoding takes one prompt of shape (1, T), got {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    n_layers = runner.num_layers
    config.check(n_layers)
    drafter, verifier = draft_runner or runner, verify_runner or runner
    for name, other in (("draft", drafter), ("verify", verifier)):
        if other.num_layers != n_layers:
            raise ValueError(f"the {name} runner has {other.num_layers} blocks, the model {n_layers}")
    if config.precision != "float32" and drafter is runner:
        raise ValueError(f"a {config.precision} draft needs its draft_runner (flexigpt.inference.inference_form)")
    eos = _eos_set(eos_token_id)
    start_time = time.perf_counter()
    # blocks before f are the same network in draft and full model: shared, computed once
    f = config.first_skipped if config.precision == "float32" else 0
    skip_a, skip_m = frozenset(config.skip_attn), frozenset(config.skip_mlp)
    rest = range(f, n_layers)
    ids = input_ids.to(runner.device)
    prompt = [int(t) for t in ids[0]]
    head, row_ids = head_for(runner, config).bind(list(prompt) + sorted(eos))
    cache = runner.new_cache(len(prompt) + max_new_tokens + config.max_draft + 2, static_cache)
    policy = AdaptiveThreshold(config.threshold, config.target_acceptance)
    logits = runner.logits(runner.run(runner.embed(ids), 0, n_layers, cache, 0)[:, -1:])
    seq = list(prompt)
    nxt, pos = int(logits[-1].argmax()), len(prompt)  # pos: position of the token `nxt`
    drafted = accepted = calls = 0
    while True:
        seq.append(nxt)
        produced = len(seq) - len(prompt)
        if produced >= max_new_tokens or nxt in eos:
            break
        budget = min(config.max_draft, max_new_tokens - produced - 1)
        proposals: list[int] = []
        fed: list[torch.Tensor] = []  # hidden state at block f of every token the verify checks
        token, p = nxt, pos
        while True:
            h = runner.run(runner.embed(torch.tensor([[token]], device=runner.device)), 0, f, cache, p)
            fed.append(h)
            if len(proposals) >= budget:  # the last proposal only needs the shared blocks
                break
            # the draft writes its own keys/values after the confirmed ones; the verify overwrites them
            out = drafter.run(h, f, n_layers, cache, p, skip_attn=skip_a, skip_mlp=skip_m)
            probs = torch.softmax(runner.logits(out, head=head)[-1].float(), -1)
            top, arg = probs.max(-1)
            if float(top) < policy.value:
                break
            token = int(row_ids[arg]) if row_ids is not None else int(arg)
            proposals.append(token)
            p += 1
        cache.crop(pos, rest)
        verify = verifier.run(torch.cat(fed, dim=1), f, n_layers, cache, pos)
        predicted = verifier.logits(verify).argmax(-1).tolist()  # (j + 1,)
        calls += 1
        m = 0
        while m < len(proposals) and proposals[m] == predicted[m]:
            m += 1
        drafted += len(proposals)
        accepted += m
        policy.update(len(proposals), m)
        hit = next((i for i, t in enumerate(proposals[:m]) if t in eos), None)
        if hit is not None:
            seq.extend(proposals[: hit + 1])
            break
        seq.extend(proposals[:m])
        nxt = predicted[m]
        pos += m + 1
        cache.crop(pos)
    seq = seq[: len(prompt) + max_new_tokens]
    out_ids = torch.tensor([seq], dtype=input_ids.dtype)
    return SpeculativeResult(out_ids, len(seq) - len(prompt), drafted, accepted, calls, time.perf_counter() - start_time)
