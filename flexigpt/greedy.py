"""What does the model answer, greedily, to many chat prompts at once? Batched greedy decoding.

``greedy_replies`` renders each prompt through the tokenizer's chat template (``flexigpt.chat``'s
``build_prompt``, so template tokens typed in a prompt are neutralised exactly as in the chat),
sorts the prompts by length, left-pads each batch and decodes all rows together with the KV
cache. The prompts' common beginning (a chat template's system text) is run once and its cache
shared by the batch; each row is laid out as [shared prefix][left padding][own tokens], and
positions skip the padding, so a row sees the same positions as when it is decoded alone: the
replies agree with one-at-a-time greedy decoding up to floating-point ties. A row stops at the
end-of-sequence token (not included in its tokens) and leaves the batch.
``cached_greedy_replies`` keeps the replies of a model on disk, keyed by its fingerprint and
the rendered prompts, for replies that are asked for again (the original model's).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flexigpt.atomic import write_text
from flexigpt.chat import ZERO_WIDTH_SPACE, _context_length, build_prompt
from flexigpt.models import cache_dir, fingerprint

log = logging.getLogger(__name__)

__all__ = ["CachedReplies", "GreedyReply", "cached_greedy_replies", "eos_ids", "greedy_replies", "reply_text"]

_CACHE_FORMAT = 1


@dataclass(frozen=True)
class GreedyReply:
    """One prompt's greedy reply: the rendered prompt ids, the reply ids and whether it ended."""

    prompt_ids: tuple[int, ...]
    tokens: tuple[int, ...]  # without the end-of-sequence token
    ended: bool  # True: the model emitted an end-of-sequence token; False: the token limit cut it


def reply_text(tokenizer: Any, tokens: Sequence[int]) -> str:
    """The reply as the chat shows it: special tokens skipped, our escape removed, stripped."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).replace(ZERO_WIDTH_SPACE, "").strip()


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The end-of-sequence ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        values = value if isinstance(value, (list, tuple)) else [value]
        ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _validate(prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> None:
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("batch_size", batch_size, 1)
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} must be a non-empty string, got {p!r:.80}")


def _render(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[tuple[int, ...]]:
    context = _context_length(model)
    budget = max(context - max_new_tokens, context // 2)
    return [build_prompt(tokenizer, p, max_tokens=budget).ids for p in prompts]


def greedy_replies(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    callback: Callable[[int, int], None] | None = None,
) -> list[GreedyReply]:
    """Greedy replies to single-turn user prompts, in the order given.

    Args:
        model: a causal LM (original or pruned).
        tokenizer: its tokenizer; its chat template is used when it has one.
        prompts: user messages, one per reply.
        max_new_tokens: the most reply tokens per prompt (fewer if the context ends first).
        batch_size: prompts decoded together.
        callback: called as ``callback(done, total)`` after every batch.

    Raises:
        ValueError: an empty prompt list, a non-string prompt, or bad ``max_new_tokens``/``batch_size``.
    """
    _validate(prompts, max_new_tokens, batch_size)
    return _generate(model, tokenizer, _render(model, tokenizer, prompts, max_new_tokens), max_new_tokens,
                     batch_size, callback)


def _generate(model: nn.Module, tokenizer: Any, rendered: list[tuple[int, ...]], max_new_tokens: int, batch_size: int,
              callback: Callable[[int, int], None] | None) -> list[GreedyReply]:
    context = _context_length(model)
    order = sorted(range(len(rendered)), key=lambda i: (-len(rendered[i]), i))
    eos = eos_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else (min(eos) if eos else 0)
    device = next(model.parameters()).device
    out: list[GreedyReply | None] = [None] * len(rendered)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                for i, (tokens, ended) in zip(rows, _decode_batch(model, [rendered[i] for i in rows], context,
                                                                  max_new_tokens, eos, pad, device)):
                    out[i] = GreedyReply(prompt_ids=tuple(rendered[i]), tokens=tuple(tokens), ended=ended)
                if callback is not None:
                    callback(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class CachedReplies:
    """Replies from the disk cache or freshly generated (then written to it)."""

    replies: list[GreedyReply]
    path: Path
    generated: bool  # False: read from the cache, no token was generated
    seconds: float  # generation time when generated, else the time to read the cache


def _cache_key(model: nn.Module, tokenizer: Any, rendered: list[tuple[int, ...]], max_new_tokens: int,
               batch_size: int) -> dict[str, Any]:
    # the rendered ids stand for the prompts, the tokenizer and its chat template at once
    ids = hashlib.sha256(json.dumps(rendered, separators=(",", ":")).encode()).hexdigest()
    return {"format": _CACHE_FORMAT, "model": fingerprint(model), "prompt_ids_sha256": ids,
            "max_new_tokens": max_new_tokens, "batch_size": batch_size, "greedy": True,
            "eos": sorted(eos_ids(model, tokenizer))}


def _read_cache(path: Path, key: dict[str, Any], rendered: list[tuple[int, ...]]) -> list[GreedyReply] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key or len(data["replies"]) != len(rendered):
            return None
        replies = [GreedyReply(prompt_ids=tuple(r["prompt_ids"]), tokens=tuple(r["tokens"]), ended=bool(r["ended"]))
                   for r in data["replies"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable reply cache %s (%s)", path, err)
        return None
    return replies if all(r.prompt_ids == p for r, p in zip(replies, rendered)) else None


def _write_cache(path: Path, key: dict[str, Any], replies: list[GreedyReply]) -> None:
    data = {"key": key, "replies": [{"prompt_ids": list(r.prompt_ids), "tokens": list(r.tokens), "ended": r.ended}
                                    for r in replies]}
    write_text(path, json.dumps(data, separators=(",", ":")))  # a reader sees the old file or the new one


def cached_greedy_replies(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    callback: Callable[[int, int], None] | None = None,
) -> CachedReplies:
    """``greedy_replies`` through a disk cache under ``flexigpt.models.cache_dir() / "replies"``.

    The cache key is the model's fingerprint, the sha256 of the rendered prompt ids (so a
    changed prompt, tokenizer or chat template is a new key), ``max_new_tokens``, ``batch_size``
    and the end-of-sequence ids. The file is written atomically; an unreadable or mismatched
    file is regenerated.
    """
    _validate(prompts, max_new_tokens, batch_size)
    start = time.perf_counter()
    rendered = _render(model, tokenizer, prompts, max_new_tokens)
    key = _cache_key(model, tokenizer, rendered, max_new_tokens, batch_size)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "replies" / f"{name}.json"
    if path.is_file():
        replies = _read_cache(path, key, rendered)
        if replies is not None:
            log.info("greedy replies read from the cache %s", path)
            if callback is not None:
                callback(len(replies), len(replies))
            return CachedReplies(replies=replies, path=path, generated=False, seconds=time.perf_counter() - start)
    replies = _generate(model, tokenizer, rendered, max_new_tokens, batch_size, callback)
    _write_cache(path, key, replies)
    return CachedReplies(replies=replies, path=path, generated=True, seconds=time.perf_counter() - start)


def _common_prefix(prompts: list[tuple[int, ...]]) -> int:
    first, n = prompts[0], min(len(p) for p in prompts) - 1  # every row keeps one token of its own
    for k in range(max(n, 0)):
        if any(p[k] != first[k] for p in prompts):
            return k
    return max(n, 0)


def _forward(model: nn.Module, keep: dict, **inputs: Any):
    return model(use_cache=True, **keep, **inputs)


def _decode_batch(model: nn.Module, prompts: list[tuple[int, ...]], context: int, max_new_tokens: int,
                  eos: set[int], pad: int, device: torch.device) -> list[tuple[list[int], bool]]:
    # only the last position's logits are read: skip the (B, T, vocab) projection of the prompt
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    B, width = len(prompts), max(len(p) for p in prompts)
    # Chat templates put the same system text before every prompt: run it once and share its cache.
    # Layout per row: [shared prefix][left padding][own tokens]; positions skip the padding.
    shared = _common_prefix(prompts) if B > 1 else 0
    past = None
    if shared >= 2:
        past = _forward(model, keep, input_ids=torch.tensor([prompts[0][:shared]], device=device)).past_key_values
        if hasattr(past, "batch_repeat_interleave"):
            past.batch_repeat_interleave(B)
        else:
            past, shared = None, 0
    else:
        shared = 0
    own = width - shared
    ids = torch.full((B, own), pad, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    mask[:, :shared] = 1
    for r, p in enumerate(prompts):
        ids[r, own - (len(p) - shared):] = torch.tensor(p[shared:], dtype=torch.long)
        mask[r, width - (len(p) - shared):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = ((mask.cumsum(-1) - 1).clamp_min(0))[:, shared:]
    steps = max(0, min(max_new_tokens, context - width))
    tokens: list[list[int]] = [[] for _ in prompts]
    ended = [False] * B
    live = list(range(B))  # rows still decoding, in cache order
    step_ids = ids
    for _ in range(steps):
        out = _forward(model, keep, input_ids=step_ids, attention_mask=mask, position_ids=position, past_key_values=past)
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(-1)  # (live,)
        for r, t in zip(live, nxt.tolist()):
            if t in eos:
                ended[r] = True
            else:
                tokens[r].append(t)
        going = [j for j, r in enumerate(live) if not ended[r]]
        if not going:
            break
        if len(going) < len(live) and hasattr(past, "batch_select_indices"):
            index = torch.tensor(going, device=device)
            past.batch_select_indices(index)  # finished rows leave the batch
            nxt, mask, position = nxt[index], mask[index], position[index]
            live = [live[j] for j in going]
        else:  # no cache pruning: a finished row decodes padding that nobody reads
            nxt = torch.where(torch.tensor([ended[r] for r in live], device=device), torch.full_like(nxt, pad), nxt)
        step_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position[:, -1:] + 1
    return list(zip(tokens, ended))
