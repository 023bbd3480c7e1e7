"""Which sub-layers should the self-speculative draft skip? Chosen by measured speed, cached per model.

1. The model greedily continues a few calibration prompts; one pass over each sequence records
   how much every attention and MLP sub-layer changes the residual stream (the relative norm of
   its output).
2. Candidates: for several first skipped blocks ``f`` (blocks before ``f`` are shared by draft and
   verify), the least-changing sub-layers at or after ``f``, in nested sets of several sizes; each
   drafts the calibration continuations teacher-forced from the hidden state at ``f``.
3. ``flexigpt.draft_cost.replay`` prices every candidate with every draft head size, draft
   length and threshold on this machine's measured step costs; the best skip sets are refined
   by adding or removing one sub-layer.
4. The best few are timed for real against plain greedy decoding; the fastest is kept, in memory
   and on disk under ``cache_dir() / "drafts"``, keyed by ``flexigpt.models.fingerprint``.
"""
from __future__ import annotations

import json
import logging
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flexigpt.atomic import write_text
from flexigpt.draft_cost import StepCosts, measure_costs, replay
from flexigpt.inference import fast_view, inference_form, int8_available
from flexigpt.runner import BlockRunner
from flexigpt.self_speculative import DraftConfig, SpeculativeResult, head_for, self_speculative_generate

log = logging.getLogger(__name__)

__all__ = ["CALIBRATION_PROMPTS", "DraftChoice", "SelfDraft", "choose_draft", "greedy_tokens", "self_draft"]

CALIBRATION_PROMPTS = (
    "Explain how a rainbow forms.",
    "What are three tips for staying healthy?",
    "Write a short story about a robot who learns to paint.",
    "How does a bicycle stay upright?",
)
_SEARCH_VERSION = 1
_VOCABS = (4096, 8192, 16384, 0)
_LENGTHS = (3, 5, 8)
_THRESHOLDS = (0.1, 0.3, 0.5)
_TARGETS = (0.6, 0.8)


@dataclass(frozen=True)
class DraftChoice:
    """The chosen draft and what was measured when it was chosen."""

    config: DraftConfig
    plain_tokens_per_s: float
    draft_tokens_per_s: float
    acceptance: float
    source: str  # "searched", "disk", "memory"
    search_seconds: float
    candidates: list = field(default_factory=list)
    extra_bytes: int = 0  # memory of the draft's own weights (a lower-precision copy, head rows)

    @property
    def speedup(self) -> float:
        return self.draft_tokens_per_s / self.plain_tokens_per_s if self.plain_tokens_per_s else 0.0

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "plain_tokens_per_s": self.plain_tokens_per_s,
                "draft_tokens_per_s": self.draft_tokens_per_s, "acceptance": self.acceptance,
                "speedup": self.speedup, "source": self.source, "search_seconds": self.search_seconds,
                "candidates": self.candidates, "extra_bytes": self.extra_bytes}


@torch.no_grad()
def greedy_tokens(runner: BlockRunner, ids: torch.Tensor, new_tokens: int, eos: set[int] | None = None) -> list[int]:
    """Plain greedy decoding through the block runner: the new token ids (``eos`` ends it)."""
    eos = eos or set()
    cache = runner.new_cache(ids.shape[1] + new_tokens + 1)
    n = runner.num_layers
    logits = runner.logits(runner.run(runner.embed(ids), 0, n, cache, 0)[:, -1:])
    out: list[int] = []
    pos = ids.shape[1]
    while True:
        tok = int(logits[-1].argmax())
        out.append(tok)
        if len(out) >= new_tokens or tok in eos:
            return out
        logits = runner.logits(runner.run(runner.embed(torch.tensor([[tok]], device=runner.device)), 0, n, cache, pos))
        pos += 1


def _prompt_ids(tokenizer: Any, text: str, device) -> torch.Tensor:
    from flexigpt.chat import build_prompt  # on first use: keeps this module's import light

    return torch.tensor([build_prompt(tokenizer, text).ids], dtype=torch.long, device=device)


@dataclass
class _Calibration:
    prompts: list[torch.Tensor]
    truths: list[list[int]]  # greedy continuation per prompt
    hidden: list[list[torch.Tensor]]  # per sequence, the input hidden state of every block (1, T, H)
    scores: dict  # ("attn" | "mlp", block) -> mean relative output norm over the continuation


@torch.no_grad()
def _calibrate(runner: BlockRunner, prompts: list[torch.Tensor], new_tokens: int) -> _Calibration:
    n = runner.num_layers
    truths, hidden = [], []
    sums: dict[tuple[str, int], float] = {}
    for ids in prompts:
        cont = greedy_tokens(runner, ids, new_tokens)
        seq = torch.cat([ids, torch.tensor([cont], device=ids.device)], dim=1)
        cache = runner.new_cache(seq.shape[1])
        h = runner.embed(seq)
        keep = []
        p = ids.shape[1]
        for i in range(n):
            keep.append(h)
            mid = runner.run(h, i, i + 1, cache, 0, skip_mlp={i})
            out = runner.run(mid, i, i + 1, cache, 0, skip_attn={i})
            a, m = (mid - h)[0, p:], (out - mid)[0, p:]
            sums[("attn", i)] = sums.get(("attn", i), 0.0) + float((a.norm(dim=-1) / h[0, p:].norm(dim=-1)).mean())
            sums[("mlp", i)] = sums.get(("mlp", i), 0.0) + float((m.norm(dim=-1) / mid[0, p:].norm(dim=-1)).mean())
            h = out
        truths.append([int(t) for t in cont])
        hidden.append(keep)
    return _Calibration(prompts, truths, hidden, {k: v / len(prompts) for k, v in sums.items()})


@torch.no_grad()
def _draft_logits(runner: BlockRunner, drafter: BlockRunner, cal: _Calibration, skip_attn: set[int],
                  skip_mlp: set[int]) -> list[torch.Tensor]:
    """Teacher-forced draft logits at every continuation position but the last: ``(L - 1, V)``."""
    f = min(skip_attn | skip_mlp, default=0) if drafter is runner else 0
    out = []
    for ids, keep in zip(cal.prompts, cal.hidden):
        h = keep[f]
        cache = runner.new_cache(h.shape[1])
        h = drafter.run(h, f, runner.num_layers, cache, 0, skip_attn=skip_attn, skip_mlp=skip_mlp)
        p = ids.shape[1]
        out.append(runner.logits(h[:, p:-1]).float())
    return out


def _predictions(logits: list[torch.Tensor], cal: _Calibration, vocab: int) -> list[tuple[list[int], list[float], list[int]]]:
    preds = []
    for lg, ids, truth in zip(logits, cal.prompts, cal.truths):
        if 0 < vocab < lg.shape[1]:
            keep = torch.zeros(lg.shape[1], dtype=torch.bool, device=lg.device)
            keep[:vocab] = True
            keep[ids[0]] = True  # the draft head always carries the prompt's own tokens
            lg = lg.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(lg, -1)
        conf, guess = probs.max(-1)
        preds.append((guess.tolist(), conf.tolist(), truth))
    return preds


def _candidates(cal: _Calibration, n: int, shares=(0.2, 0.35, 0.5, 0.65)) -> list[tuple[frozenset, frozenset]]:
    ranked = sorted(cal.scores, key=cal.scores.get)
    found = []
    for f in sorted({max(1, n // 6), n // 4, n // 3, n // 2, (2 * n) // 3}):
        pool = [k for k in ranked if k[1] >= f]
        for share in shares:
            chosen = pool[: max(1, round(share * len(pool)))]
            pair = (frozenset(i for kind, i in chosen if kind == "attn"), frozenset(i for kind, i in chosen if kind == "mlp"))
            if pair not in found:
                found.append(pair)
    return found


def _best_setting(costs: StepCosts, logits, cal, skips, vocab_size: int, precision: str,
                  draft_costs: StepCosts | None) -> tuple[float, DraftConfig, dict]:
    best = (0.0, None, {})
    for rows in _VOCABS:
        preds = _predictions(logits, cal, rows)
        for k in _LENGTHS:
            for thr in _THRESHOLDS:
                for target in _TARGETS:
                    config = DraftConfig(tuple(skips[0]), tuple(skips[1]), rows, precision, k, thr, target)
                    r = replay(costs, config, preds, vocab_size, draft_costs)
                    if r["speedup"] > best[0]:
                        best = (r["speedup"], config, r)
    return best


class _Views:
    """The runners of one model: itself, its fast view (verify passes) and the drafts built so far."""

    def __init__(self, model: nn.Module):
        self.version = _version(model)
        self.runner = BlockRunner(model)
        self.verifier = BlockRunner(fast_view(model))
        self.drafts: dict[str, BlockRunner] = {}
        self.choice: DraftChoice | None = None

    def drafter(self, model: nn.Module, precision: str) -> BlockRunner:
        if precision == "float32":
            return self.runner
        if precision not in self.drafts:
            self.drafts[precision] = BlockRunner(inference_form(model, precision))
        return self.drafts[precision]


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _version(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (training, loading)."""
    return tuple((id(p), p._version) for p in model.parameters())


def _views(model: nn.Module) -> _Views:
    views = _VIEWS.get(model)
    if views is None or views.version != _version(model):
        views = _Views(model)
        _VIEWS[model] = views
    return views


def _cache_file(model: nn.Module) -> Path:
    from flexigpt.models import cache_dir, fingerprint  # on first use: keeps this module's import light

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    key = f"{fingerprint(model)}-{dtype}-{torch.get_num_threads()}t-v{_SEARCH_VERSION}"
    return cache_dir() / "drafts" / f"{key}.json"


def _measure(views: _Views, drafter: BlockRunner | None, prompts: list[torch.Tensor], new_tokens: int,
             config: DraftConfig | None) -> tuple[float, float]:
    runner = views.runner
    tokens, seconds, drafted, accepted = 0, 0.0, 0, 0
    for ids in prompts:
        if config is None:
            start = time.perf_counter()
            tokens += len(greedy_tokens(runner, ids, new_tokens))
            seconds += time.perf_counter() - start
        else:
            r = self_speculative_generate(runner, config, ids, new_tokens, draft_runner=drafter,
                                          verify_runner=views.verifier)
            tokens, seconds = tokens + r.new_tokens, seconds + r.seconds
            drafted, accepted = drafted + r.drafted, accepted + r.accepted
    return tokens / seconds, accepted / drafted if drafted else 0.0


@dataclass
class SelfDraft:
    """A model ready for self-speculative decoding: its runners and its chosen draft."""

    runner: BlockRunner
    verify_runner: BlockRunner
    draft_runner: BlockRunner
    choice: DraftChoice

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None, *,
                 max_draft: int | None = None) -> SpeculativeResult:
        """Greedy decoding, identical to plain greedy, drafted by the chosen draft (``max_draft``: its length)."""
        config = self.choice.config if max_draft is None else replace(self.choice.config, max_draft=max_draft)
        return self_speculative_generate(self.runner, config, input_ids, max_new_tokens, eos_token_id=eos_token_id,
                                         draft_runner=self.draft_runner, verify_runner=self.verify_runner)


def self_draft(model: nn.Module, tokenizer: Any, **options: Any) -> SelfDraft:
    """``model`` ready for self-speculative decoding; the draft comes from ``choose_draft(model, tokenizer, **options)``."""
    choice = choose_draft(model, tokenizer, **options)
    views = _views(model)
    return SelfDraft(views.runner, views.verifier, views.drafter(model, choice.config.precision), choice)


@torch.no_grad()
def choose_draft(model: nn.Module, tokenizer: Any, *, prompts: tuple[str, ...] = CALIBRATION_PROMPTS,
                 new_tokens: int = 40, finalists: int = 3, precisions: tuple[str, ...] | None = None,
                 use_cache: bool = True) -> DraftChoice:
    """The self-speculative draft of ``model`` that decodes fastest on this machine (see module docstring).

    Args:
        model: a causal LM the block runner supports (``flexigpt.runner.runner_support``).
        tokenizer: renders the calibration prompts with the chat template.
        prompts: calibration chat prompts.
        new_tokens: greedy tokens per calibration prompt.
        finalists: candidates timed for real.
        precisions: draft weight precisions searched (default: float32, float16 and, where the
            kernel exists, int8).
        use_cache: reuse a choice from memory or disk, and store a new one.

    Raises:
        ValueError: the model is not supported, or bad arguments.
    """
    if not prompts or isinstance(prompts, str):
        raise ValueError(f"prompts must be a non-empty tuple of strings, got {prompts!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 8 <= new_tokens <= 512:
        raise ValueError(f"new_tokens must be an integer in 8..512, got {new_tokens!r}")
    if precisions is None:
        precisions = ("float32", "float16") + (("int8",) if int8_available() else ())
    bad = [p for p in precisions if p not in ("float32", "float16", "int8")]
    if bad or not precisions:
        raise ValueError(f"precisions must be a non-empty subset of float32, float16, int8; got {precisions!r}")
    views = _views(model)
    if use_cache and views.choice is not None:
        return replace(views.choice, source="memory")
    was_training = model.training
    model.eval()
    try:
        path = _cache_file(model) if use_cache else None
        choice = _read_cache(path, views.runner.num_layers) if path is not None else None
        if choice is None:
            choice = _search(views, model, tokenizer, prompts, new_tokens, finalists, precisions)
            if path is not None:
                write_text(path, json.dumps(choice.to_dict(), indent=1))
    finally:
        model.train(was_training)
    for precision in list(views.drafts):  # keep only the draft copy the choice uses
        if precision != choice.config.precision:
            del views.drafts[precision]
    if use_cache:
        views.choice = choice
    return choice


def _read_cache(path: Path, num_layers: int) -> DraftChoice | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        choice = DraftChoice(DraftConfig.from_dict(data["config"]), data["plain_tokens_per_s"], data["draft_tokens_per_s"],
                             data["acceptance"], "disk", data["search_seconds"], data.get("candidates", []),
                             data.get("extra_bytes", 0))
        choice.config.check(num_layers)
        return choice
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        log.warning("ignoring the unreadable draft cache %s (%s)", path, err)
        return None


def _search(views: _Views, model, tokenizer, prompts, new_tokens: int, finalists: int, precisions) -> DraftChoice:
    start = time.perf_counter()
    runner = views.runner
    ids = [_prompt_ids(tokenizer, p, runner.device) for p in prompts]
    cal = _calibrate(runner, ids, new_tokens)
    costs = measure_costs(views.verifier, max_tokens=max(_LENGTHS) + 1, precisions=precisions)
    vocab_size = runner.weight.shape[0]
    n = runner.num_layers
    scored: dict[tuple, tuple[float, DraftConfig, dict]] = {}
    draft_costs = {p: measure_costs(views.drafter(model, p), blocks_only=True) for p in precisions if p != "float32"}

    def score(precision, skips):
        key = (precision, skips)
        if key not in scored and (skips[0] or skips[1] or precision != "float32"):
            drafter = views.drafter(model, precision)
            logits = _draft_logits(runner, drafter, cal, set(skips[0]), set(skips[1]))
            scored[key] = _best_setting(costs, logits, cal, skips, vocab_size, precision, draft_costs.get(precision))
        return scored.get(key, (0.0, None, {}))[0]

    for precision in precisions:
        if precision != "float32":
            score(precision, (frozenset(), frozenset()))
        for skips in _candidates(cal, n, (0.2, 0.35, 0.5, 0.65) if precision == "float32" else (0.1, 0.2)):
            score(precision, skips)
    for _ in range(3):  # refine the best: add or remove one sub-layer
        best_key = max(scored, key=lambda k: scored[k][0])
        precision, best = best_key
        low = min(best[0] | best[1], default=0) - 1
        ranked = sorted((k for k in cal.scores if k[1] >= low), key=cal.scores.get)
        outside = [k for k in ranked if k[1] not in (best[0] if k[0] == "attn" else best[1])][:3]
        inside = [k for k in reversed(ranked) if k[1] in (best[0] if k[0] == "attn" else best[1])][:3]
        before = scored[best_key][0]
        for kind, i in outside + inside:
            sets = [set(best[0]), set(best[1])]
            sets[kind == "mlp"] ^= {i}
            score(precision, (frozenset(sets[0]), frozenset(sets[1])))
        if max(v[0] for v in scored.values()) <= before:
            break
    ranked = sorted(scored.values(), key=lambda v: -v[0])[:finalists]
    measure_ids = ids[: max(2, len(ids) // 2)]
    plain_tps, _ = _measure(views, None, measure_ids, new_tokens, None)
    timed = []
    for predicted, config, _r in ranked:
        tps, acc = _measure(views, views.drafter(model, config.precision), measure_ids, new_tokens, config)
        plain_again, _ = _measure(views, None, measure_ids[:1], new_tokens, None)  # interleaved: noise hits both
        plain_tps = (plain_tps + plain_again) / 2
        timed.append((tps, acc, config, predicted))
    tps, acc, config, _ = max(timed, key=lambda t: t[0])
    notes = {"calibration_prompts": len(ids), "new_tokens": new_tokens, "candidates_scored": len(scored),
             "step_costs": costs.to_dict()}
    config = DraftConfig.from_dict({**config.to_dict(), "notes": notes})
    table = [{"precision": c.precision, "skip_attn": list(c.skip_attn), "skip_mlp": list(c.skip_mlp),
              "draft_vocab": c.draft_vocab, "max_draft": c.max_draft, "predicted_speedup": round(p, 3),
              "tokens_per_s": round(t, 2), "acceptance": round(a, 3)} for t, a, c, p in timed]
    extra = 0
    if config.precision != "float32":
        extra = views.drafter(model, config.precision).model._flexigpt_inference["extra_bytes"]
    extra += head_for(runner, config).bytes
    seconds = time.perf_counter() - start
    log.info("draft search: %d candidates scored, %d timed, best %.2f tokens/s vs plain %.2f (%.1f s)",
             len(scored), len(timed), tps, plain_tps, seconds)
    return DraftChoice(config, plain_tps, tps, acc, "searched", seconds, table, extra)
