"""Can the model draft for itself? Self-speculative decoding: the public entry points.

``speculative_reply`` decodes a greedy chat reply self-speculatively; the text equals
``flexigpt.chat.reply(..., temperature=0)``. For LLaMA-family models (the embedded model, its
FlexiGPT builds, any original model) the draft is chosen by measured speed on this machine
(``flexigpt.draft_search``: skipped attention/MLP sub-layers, draft weight precision, draft head
rows, draft length and threshold) and decoded by ``flexigpt.self_speculative``, which shares
the blocks before the first skipped one and the KV cache between draft and verify.

The older two-model loop stays for everything else: ``draft_model`` (the model with whole blocks
skipped, every tensor shared), ``draft_for`` (a FlexiGPT build without its replacement slots,
the plain-drop sub-network) and ``speculative_generate``, which also samples: with
``temperature > 0`` the standard acceptance rule (accept with probability min(1, p/q), otherwise
resample from the normalised residual max(0, p - q)) keeps the full model's distribution. It
reports the acceptance rate and keeps the draft length fixed, which transformers' assisted
generation does not.

Paper: FlexiGPT (Smith et al., NAACL 2025) reports about 30 % faster decoding this way,
https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable

import torch
import torch.nn as nn

from flexigpt.arch import get_blocks, set_blocks
from flexigpt.runner import BlockRunner, runner_support
from flexigpt.self_speculative import SpeculativeResult

log = logging.getLogger(__name__)

__all__ = ["SpeculativeResult", "draft_for", "draft_model", "greedy_generate", "speculative_generate", "speculative_reply"]


def draft_model(model: nn.Module, skip_slots: Iterable[int]) -> nn.Module:
    """The model without the slots in ``skip_slots``; every tensor is shared, none copied.

    Each remaining slot becomes its own module object (so its ``layer_idx`` can be renumbered
    without touching ``model``), holding the very same Parameters.
    """
    skip = set(int(s) for s in skip_slots)
    n = len(get_blocks(model))
    bad = sorted(s for s in skip if not 0 <= s < n)
    if bad:
        raise ValueError(f"slots {bad} to skip are out of range 0..{n - 1}")
    if len(skip) >= n:
        raise ValueError(f"cannot skip all {n} slots; the draft needs at least one")
    memo = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    draft = copy.deepcopy(model, memo=memo)
    blocks = [b for i, b in enumerate(get_blocks(draft)) if i not in skip]
    set_blocks(draft, blocks)
    return draft.eval()


def _logits_last(model: nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.logits[0].float()  # (T, V)


def _eos_set(eos: int | Iterable[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _crop(cache, length: int) -> None:
    """Keep the first ``length`` positions of a DynamicCache (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | Iterable[int] | None = None) -> SpeculativeResult:
    """Plain greedy decoding with a KV cache, timed the same way as ``speculative_generate``
    (through ``flexigpt.runner.BlockRunner`` where it applies: the same logits, less overhead)."""
    # transformers is heavy: imported on first use
    from transformers import DynamicCache

    eos = _eos_set(eos_token_id)
    start = time.perf_counter()
    if runner_support(model) is None:
        # imported on first use: keeps importing this module light
        from flexigpt.draft_search import greedy_tokens

        new = greedy_tokens(BlockRunner(model), input_ids, max_new_tokens, eos)
        seq = torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)
        return SpeculativeResult(seq, len(new), 0, 0, len(new) - 1, time.perf_counter() - start)
    cache = DynamicCache()
    seq = input_ids
    logits = _logits_last(model, input_ids, cache)
    calls = 0
    for _ in range(max_new_tokens):
        tok = logits[-1].argmax(-1).view(1, 1)
        seq = torch.cat([seq, tok], dim=1)
        if int(tok) in eos:
            break
        if seq.shape[1] - input_ids.shape[1] >= max_new_tokens:
            break
        logits = _logits_last(model, tok, cache)
        calls += 1
    new = seq.shape[1] - input_ids.shape[1]
    return SpeculativeResult(seq, new, 0, 0, calls, time.perf_counter() - start)


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    *,
    draft_len: int = 4,
    eos_token_id: int | Iterable[int] | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
) -> SpeculativeResult:
    """Decode with ``draft`` proposing ``draft_len`` tokens and ``target`` verifying them.

    Args:
        target: the full model.
        draft: a cheaper model over the same vocabulary (see ``draft_model``).
        input_ids: ``(1, T)`` prompt; batch size 1.
        max_new_tokens: tokens to generate at most.
        draft_len: tokens the draft proposes per round (>= 1).
        eos_token_id: stop after this token (or any of these tokens).
        temperature: 0 = greedy (output identical to the target's greedy output); > 0 samples
            with the standard acceptance rule.
        seed: seeds the sampling generator.

    Returns:
        SpeculativeResult with the sequence and acceptance statistics.
    """
    # transformers is heavy: imported on first use
    from transformers import DynamicCache

    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt of shape (1, T), got {tuple(input_ids.shape)}")
    if not isinstance(draft_len, int) or draft_len < 1:
        raise ValueError(f"draft_len must be a positive integer, got {draft_len!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = _eos_set(eos_token_id)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    start = time.perf_counter()
    t_cache, d_cache = DynamicCache(), DynamicCache()
    prompt_len = input_ids.shape[1]
    t_logits = _logits_last(target, input_ids, t_cache)
    _logits_last(draft, input_ids[:, :-1], d_cache) if prompt_len > 1 else None
    d_seen = prompt_len - 1  # tokens of `seq` already in the draft cache
    seq = input_ids
    nxt = _pick(t_logits[-1], temperature, gen).view(1, 1)  # target's token, always correct
    drafted = accepted = calls = 0
    while True:
        seq = torch.cat([seq, nxt], dim=1)
        produced = seq.shape[1] - prompt_len
        if produced >= max_new_tokens or int(nxt) in eos:
            break
        k = min(draft_len, max_new_tokens - produced)
        # draft: catch up on confirmed tokens it has not seen, then propose k tokens
        feed = seq[:, d_seen:]
        proposals, q_probs = [], []
        for _ in range(k):
            d_logits = _logits_last(draft, feed, d_cache)[-1]
            tok = _pick(d_logits, temperature, gen)
            if temperature > 0:
                q_probs.append(torch.softmax(d_logits / temperature, -1))
            proposals.append(int(tok))
            feed = tok.view(1, 1)
        d_seen = seq.shape[1] + k - 1
        drafted += k
        # target: verify all proposals in one pass (its cache holds seq[:-1])
        block = torch.tensor([[int(seq[0, -1])] + proposals], dtype=seq.dtype)
        v_logits = _logits_last(target, block, t_cache)  # (k+1, V)
        calls += 1
        m = 0
        if temperature <= 0:
            preds = v_logits.argmax(-1)
            while m < k and proposals[m] == int(preds[m]):
                m += 1
            nxt_tok = int(preds[m])
        else:
            p_all = torch.softmax(v_logits / temperature, -1)
            nxt_tok = None
            while m < k:
                p, q, x = p_all[m], q_probs[m], proposals[m]
                u = torch.rand((), generator=gen)
                if float(u) < min(1.0, float(p[x]) / max(float(q[x]), 1e-20)):
                    m += 1
                    continue
                residual = torch.clamp(p - q, min=0)
                residual = residual / residual.sum() if float(residual.sum()) > 0 else p
                nxt_tok = int(torch.multinomial(residual, 1, generator=gen))
                break
            if nxt_tok is None:
                nxt_tok = int(torch.multinomial(p_all[k], 1, generator=gen))
        accepted += m
        hit = next((i for i, t in enumerate(proposals[:m]) if t in eos), None)
        if hit is not None:
            m = hit + 1
            seq = torch.cat([seq[:, :-1], block[:, : m + 1]], dim=1)
            break
        seq = torch.cat([seq, torch.tensor([proposals[:m]], dtype=seq.dtype)], dim=1) if m else seq
        # keep only confirmed tokens in both caches
        _crop(t_cache, seq.shape[1])
        d_seen = min(d_seen, seq.shape[1])
        _crop(d_cache, d_seen)
        nxt = torch.tensor([[nxt_tok]], dtype=seq.dtype)
    seq = seq[:, : prompt_len + max_new_tokens]
    return SpeculativeResult(seq, seq.shape[1] - prompt_len, drafted, accepted, calls, time.perf_counter() - start)


def draft_for(model: nn.Module) -> nn.Module:
    """The self-speculative draft of a model built by ``flexigpt.surgery.apply_plan``: the same
    network with its replacement (and extension-copy) slots skipped.

    Raises:
        ValueError: the model has no replacement slots to skip (nothing would be gained).
    """
    # imported on first use: keeps importing this module light
    from flexigpt.surgery import build_info

    plan = build_info(model).plan
    if not plan.shared_slots:  # replacement slots, extension copies, FoldGPT group members
        raise ValueError(f"self-speculative decoding needs a model with replacement slots; this {plan.method!r} "
                         "model has none (build a FlexiGPT plan)")
    return draft_model(model, plan.shared_slots)


@torch.no_grad()
def speculative_reply(model: nn.Module, tokenizer, messages, *, draft=None, max_new_tokens: int = 128,
                      draft_len: int | None = None) -> tuple[str, SpeculativeResult]:
    """A greedy chat reply decoded self-speculatively; the text equals ``chat.reply(..., temperature=0)``.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        messages: as for ``flexigpt.chat.stream_reply``.
        draft: ``None`` (the draft chosen by measured speed, ``flexigpt.draft_search.self_draft``,
            searched once per model and cached; a FlexiGPT build of another family drafts without
            its replacement slots), a ``SelfDraft`` from ``self_draft``, or a draft model over the
            same vocabulary (the two-model loop).
        max_new_tokens: the most tokens generated.
        draft_len: the most tokens drafted per round (default: the chosen draft's; 4 for a draft model).

    Returns:
        ``(reply_text, statistics)``.
    """
    # imported on first use: keeps importing this module light
    from flexigpt.chat import ZERO_WIDTH_SPACE, _context_length, _eos_ids, build_prompt
    from flexigpt.draft_search import SelfDraft, self_draft

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if draft_len is not None and (isinstance(draft_len, bool) or not isinstance(draft_len, int) or not 1 <= draft_len <= 32):
        raise ValueError(f"draft_len must be an integer in 1..32, got {draft_len!r}")
    if draft is None:
        draft = self_draft(model, tokenizer) if runner_support(model) is None else draft_for(model)
    context = _context_length(model)
    prompt = build_prompt(tokenizer, messages, max_tokens=max(context - max_new_tokens, context // 2))
    ids = torch.tensor([prompt.ids], dtype=torch.long, device=next(model.parameters()).device)
    budget = min(max_new_tokens, context - ids.shape[1])
    eos = _eos_ids(model, tokenizer)
    was = model.training
    model.eval()
    try:
        if isinstance(draft, SelfDraft):
            result = draft.generate(ids, budget, eos, max_draft=draft_len)
        else:
            draft_was = draft.training
            draft.eval()
            try:
                result = speculative_generate(model, draft, ids, budget, draft_len=draft_len or 4, eos_token_id=eos)
            finally:
                draft.train(draft_was)
    finally:
        model.train(was)
    new = [int(t) for t in result.sequences[0, ids.shape[1]:]]
    if new and new[-1] in eos:
        new = new[:-1]
    text = tokenizer.decode(new, skip_special_tokens=True).replace(ZERO_WIDTH_SPACE, "")
    # the same post-processing as flexigpt.chat.stream_reply, so the two texts compare equal
    if not prompt.templated and "\nUser:" in text:
        return text.split("\nUser:")[0].strip(), result
    return text.lstrip(), result
