"""Does the pruned model still answer like the original? Chat fidelity: score, agreement, degeneration.

On a set of short prompts with answer keys (the built-in ``builtin-v1`` set ships in
``flexigpt/corpora/chat_prompts.json``; ``load_prompts`` reads a JSONL file instead), every prompt
is answered greedily through the chat template (``flexigpt.greedy``), then:

* **score**: the share of prompts whose reply contains one of its keys. A key matches
  case-insensitively and not inside a longer word or number (key ``4`` matches "2 + 2 = 4." but
  not "14"; key ``yes`` matches "Yes!" but not "yesterday").
* **agreement**: against a reference (the original model's replies on the same set and settings),
  the share of reply positions 0..15 at which both replies have the same token, pooled over the
  prompts. Positions are those of the reference reply, its end-of-sequence token counted as
  one position; a position past the end of the evaluated reply counts as a mismatch.
* **degeneration**: the share of replies caught in a repetition loop (``find_loop``): a stretch
  of at least ``LOOP_MIN_REPEATS`` back-to-back copies of one n-gram (1 <= n <= ``LOOP_MAX_N``
  tokens; the last copy may be cut short) that spans at least ``LOOP_MIN_SPAN`` tokens and
  either runs to the end of the reply or covers at least half of it.

Every number is reported with its protocol: the prompt set's name, size and sha256, the max new
tokens, greedy decoding.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from flexigpt.greedy import GreedyReply, cached_greedy_replies, greedy_replies, reply_text
from flexigpt.prompt_sets import PromptItem, PromptSet, builtin_prompts, load_prompts

log = logging.getLogger(__name__)

__all__ = ["AGREEMENT_TOKENS", "FidelityReport", "FidelityRow", "Loop", "PromptItem", "PromptSet", "builtin_prompts",
           "chat_fidelity", "contains_key", "find_loop", "is_degenerate", "load_prompts", "token_agreement"]

AGREEMENT_TOKENS = 16
LOOP_MAX_N = 8
LOOP_MIN_REPEATS = 3
LOOP_MIN_SPAN = 12
LOOP_MIN_COVER = 0.5
DEFAULT_MAX_NEW_TOKENS = 48
_END = -1  # the end-of-sequence position in agreement, distinct from every token id


def contains_key(reply: str, keys: Sequence[str]) -> bool:
    """Whether ``reply`` contains one of ``keys``: case-insensitive, not inside a longer word or number."""
    low = reply.lower()
    for key in keys:
        if re.search(r"(?<![0-9a-z])" + re.escape(key.lower().strip()) + r"(?![0-9a-z])", low):
            return True
    return False


@dataclass(frozen=True)
class Loop:
    """A repetition loop: ``repeats`` copies of an ``n``-token unit from ``start``, ``span`` tokens long."""

    start: int
    n: int
    span: int
    at_end: bool

    @property
    def repeats(self) -> float:
        return self.span / self.n


def find_loop(tokens: Sequence[Any], *, max_n: int = LOOP_MAX_N, min_repeats: int = LOOP_MIN_REPEATS,
              min_span: int = LOOP_MIN_SPAN, min_cover: float = LOOP_MIN_COVER) -> Loop | None:
    """The first repetition loop in ``tokens`` (any comparable items: token ids, words, characters).

    A stretch ``tokens[a:b]`` with period ``n`` (``tokens[k] == tokens[k + n]`` for a <= k < b - n)
    is a loop when ``b - a >= max(min_repeats * n, min_span)`` and it either reaches the end
    (``b == len(tokens)``) or covers at least ``min_cover`` of the sequence. The smallest such
    ``n`` is returned (ties: the earliest stretch); ``None`` when there is none.
    """
    seq = list(tokens)
    size = len(seq)
    for n in range(1, max_n + 1):
        need = max(min_repeats * n, min_span)
        k = 0
        while k < size - n:
            if seq[k] != seq[k + n]:
                k += 1
                continue
            a = k
            while k < size - n and seq[k] == seq[k + n]:
                k += 1
            span = k + n - a  # the stretch [a, k + n) has period n
            at_end = k + n == size
            if span >= need and (at_end or span >= min_cover * size):
                return Loop(start=a, n=n, span=span, at_end=at_end)
    return None


def is_degenerate(tokens: Sequence[Any]) -> bool:
    """Whether a reply's tokens fall into a repetition loop (``find_loop`` with the defaults)."""
    return find_loop(tokens) is not None


def _positions(tokens: Sequence[int], ended: bool, first: int) -> list[int]:
    return (list(tokens) + ([_END] if ended else []))[:first]


def token_agreement(tokens: Sequence[int], ended: bool, ref_tokens: Sequence[int], ref_ended: bool,
                    first: int = AGREEMENT_TOKENS) -> tuple[int, int]:
    """``(matches, compared)`` over the reference reply's first ``first`` positions (see module doc)."""
    ref = _positions(ref_tokens, ref_ended, first)
    own = _positions(tokens, ended, first)
    return sum(1 for i, t in enumerate(ref) if i < len(own) and own[i] == t), len(ref)


@dataclass(frozen=True)
class FidelityRow:
    """One prompt: the reply, whether it passed and degenerated, its agreement with the reference."""

    prompt: str
    keys: tuple[str, ...]
    kind: str
    reply: str
    tokens: tuple[int, ...]
    ended: bool
    passed: bool
    degenerate: bool
    agreement: float | None = None


@dataclass
class FidelityReport:
    """The three numbers, their protocol and the per-prompt rows."""

    score: float
    agreement: float | None
    degeneration: float
    protocol: dict[str, Any]
    rows: list[FidelityRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.rows)

    @property
    def degenerate(self) -> int:
        return sum(r.degenerate for r in self.rows)

    def regressions(self, reference: FidelityReport) -> list[tuple[FidelityRow, FidelityRow]]:
        """``(row, reference_row)`` for prompts this model fails and the reference passes."""
        _check_same_set(self.protocol, reference.protocol)
        return [(r, o) for r, o in zip(self.rows, reference.rows) if o.passed and not r.passed]

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (passed, prompts)}`` in the set's order (prompts without a kind count as ``other``):
        which kinds of question a pruned model lost, e.g. facts against instructions."""
        out: dict[str, list[int]] = {}
        for r in self.rows:
            n = out.setdefault(r.kind or "other", [0, 0])
            n[0] += int(r.passed)
            n[1] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    def kinds_line(self, reference: FidelityReport | None = None) -> str:
        """One line, answered per kind, with the reference's count beside each (same prompt set)."""
        mine = self.by_kind()
        ref = None
        if reference is not None:
            _check_same_set(self.protocol, reference.protocol)
            ref = reference.by_kind()
        parts = [f"{k} {p}/{n}" + (f" (reference {ref[k][0]}/{n})" if ref and k in ref else "")
                 for k, (p, n) in mine.items()]
        return "answered by kind: " + ", ".join(parts)

    def summary(self) -> str:
        """Three lines: the numbers, then the protocol."""
        n = len(self.rows)
        agree = (f"agreement {self.agreement:.3f} (first {self.protocol['agreement_tokens']} reply tokens equal to "
                 f"the reference's)" if self.agreement is not None else "agreement n/a (no reference)")
        p = self.protocol
        return (f"chat fidelity: score {self.score:.3f} ({self.passed}/{n} prompts answered with a key), {agree}, "
                f"degeneration {self.degeneration:.3f} ({self.degenerate}/{n} replies loop)\n"
                f"protocol: prompt set {p['prompt_set']!r}, {p['size']} prompts, sha256 {p['sha256'][:16]}, "
                f"max new tokens {p['max_new_tokens']}, greedy")

    def to_dict(self, rows: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"score": self.score, "agreement": self.agreement, "degeneration": self.degeneration,
                               "passed": self.passed, "degenerate": self.degenerate, "protocol": dict(self.protocol),
                               "seconds": round(self.seconds, 2),
                               "by_kind": {k: {"passed": p, "prompts": n} for k, (p, n) in self.by_kind().items()}}
        if rows:
            out["rows"] = [{**asdict(r), "keys": list(r.keys), "tokens": list(r.tokens)} for r in self.rows]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FidelityReport:
        try:
            rows = [FidelityRow(**{**r, "keys": tuple(r["keys"]), "tokens": tuple(r["tokens"])}) for r in data["rows"]]
            return cls(score=float(data["score"]), agreement=data["agreement"], degeneration=float(data["degeneration"]),
                       protocol=dict(data["protocol"]), rows=rows, seconds=float(data.get("seconds", 0.0)))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a chat-fidelity report with rows ({type(err).__name__}: {err})") from err


def _check_same_set(protocol: dict[str, Any], ref: dict[str, Any]) -> None:
    for key in ("sha256", "max_new_tokens"):
        if protocol.get(key) != ref.get(key):
            raise ValueError(f"the reference was measured with {key} {ref.get(key)!r}, this run with "
                             f"{protocol.get(key)!r}; measure both on the same prompt set and max new tokens")


def _reference_rows(reference: Any, protocol: dict[str, Any], size: int) -> list[tuple[tuple[int, ...], bool]]:
    if isinstance(reference, FidelityReport):
        _check_same_set(protocol, reference.protocol)
        return [(r.tokens, r.ended) for r in reference.rows]
    if isinstance(reference, Sequence) and len(reference) == size and all(isinstance(r, GreedyReply) for r in reference):
        return [(r.tokens, r.ended) for r in reference]
    raise ValueError(f"reference must be a FidelityReport of the original (same prompt set) or a list of {size} "
                     f"GreedyReply, got {type(reference).__name__}")


def chat_fidelity(
    model: nn.Module,
    tokenizer: Any,
    *,
    prompts: PromptSet | str | Path | None = None,
    reference: FidelityReport | Sequence[GreedyReply] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 64,
    cache: bool = False,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
) -> FidelityReport:
    """Answer every prompt greedily and score the replies.

    Args:
        model: the model to measure (original or pruned).
        tokenizer: its tokenizer (the chat template is used when it has one).
        prompts: a ``PromptSet``, a JSONL path, or ``None`` for the built-in set.
        reference: the original model's report on the same set and ``max_new_tokens`` (from this
            function; keep it, it is computed once); ``None``: no agreement.
        max_new_tokens: reply length limit (>= 16, the agreement window).
        batch_size: prompts decoded together.
        cache: reuse (or write) this model's replies in the disk cache (worth it for an original
            that is measured again and again; see ``flexigpt.greedy.cached_greedy_replies``).
        progress: log progress per batch.
        callback: ``callback(done, total)`` after every batch (e.g. a progress bar).

    Raises:
        ValueError: a bad prompt file, ``max_new_tokens`` below 16, or a reference from another set.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < AGREEMENT_TOKENS:
        raise ValueError(f"max_new_tokens must be an integer >= {AGREEMENT_TOKENS} (the agreement window), "
                         f"got {max_new_tokens!r}")
    pset = prompts if isinstance(prompts, PromptSet) else (builtin_prompts() if prompts is None else load_prompts(prompts))
    protocol = {**pset.protocol(), "max_new_tokens": max_new_tokens, "greedy": True,
                "agreement_tokens": AGREEMENT_TOKENS, "key_match": "case-insensitive, whole word or number",
                "loop_rule": f"{LOOP_MIN_REPEATS}+ back-to-back copies of a 1..{LOOP_MAX_N}-token n-gram spanning "
                             f">= {LOOP_MIN_SPAN} tokens, reaching the end or covering >= {LOOP_MIN_COVER:.0%} of the reply"}
    ref = _reference_rows(reference, protocol, len(pset)) if reference is not None else None

    def tick(done: int, total: int) -> None:
        if progress:
            log.info("chat fidelity: %d/%d prompts", done, total)
        if callback is not None:
            callback(done, total)

    start = time.perf_counter()
    texts = [item.prompt for item in pset.items]
    if cache:
        replies = cached_greedy_replies(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        callback=tick).replies
    else:
        replies = greedy_replies(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 callback=tick)
    rows, matched, compared = [], 0, 0
    for i, (item, rep) in enumerate(zip(pset.items, replies)):
        text = reply_text(tokenizer, rep.tokens)
        agree = None
        if ref is not None:
            m, c = token_agreement(rep.tokens, rep.ended, *ref[i])
            matched, compared = matched + m, compared + c
            agree = m / c if c else 1.0
        rows.append(FidelityRow(prompt=item.prompt, keys=item.keys, kind=item.kind, reply=text, tokens=rep.tokens,
                                ended=rep.ended, passed=contains_key(text, item.keys),
                                degenerate=is_degenerate(rep.tokens), agreement=agree))
    n = len(rows)
    report = FidelityReport(
        score=sum(r.passed for r in rows) / n,
        agreement=(matched / compared if compared else 1.0) if ref is not None else None,
        degeneration=sum(r.degenerate for r in rows) / n,
        protocol=protocol, rows=rows, seconds=time.perf_counter() - start)
    log.info("%s", report.summary().replace("\n", "; "))
    return report

