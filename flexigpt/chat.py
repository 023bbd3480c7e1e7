"""Talk to it: stream a reply from any causal LM (original or pruned) through its chat template.

``stream_reply`` yields the *growing reply text*: every item is the whole reply so far, which is
what a chat widget re-renders. Decoding is greedy when ``temperature == 0``; otherwise it samples
with Hugging Face's logits processors (temperature, top-k, top-p, repetition penalty) from a
private, seeded ``torch.Generator``. Template tokens that a user types inside a message (e.g.
``<|im_start|>``) are neutralised: a zero-width space (U+200B) is inserted after their first
character, so they are read as plain text and can never open a new turn or a system message
(the escape is removed from the reply text if the model echoes it).
A conversation longer than the model's context loses its oldest turns first, then the start of
the last message, and a ``UserWarning`` says so.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

__all__ = ["ChatPrompt", "build_prompt", "neutralise", "reply", "stream_reply"]

ZERO_WIDTH_SPACE = "\u200b"
_ROLES = ("system", "user", "assistant")
_FALLBACK_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_MIN_PROMPT = 8  # tokens the prompt keeps at least; below this a reply makes no sense


@dataclass(frozen=True)
class ChatPrompt:
    """The token ids sent to the model, the text they came from, and a note if it was cut."""

    ids: tuple[int, ...]
    text: str
    templated: bool  # False: the plain "User:/Assistant:" fallback was used
    note: str | None = None


def _special_strings(tokenizer: Any) -> list[str]:
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        found.add(str(getattr(tok, "content", tok)))
    return sorted((s for s in found if len(s) >= 2), key=len, reverse=True)


def neutralise(text: str, tokenizer: Any) -> str:
    """Break every special/added token string in user text so it tokenises as plain text."""
    for s in _special_strings(tokenizer):  # longest first, so "<|im_start|>" wins over "<|"
        if s in text:
            text = text.replace(s, s[0] + ZERO_WIDTH_SPACE + s[1:])
    return text


def _normalise(messages: Any) -> list[dict[str, str]]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts or a string, got {messages!r}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[int], bool]:
    safe = [{"role": m["role"], "content": neutralise(m["content"], tokenizer)} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(safe, tokenize=False, add_generation_prompt=True)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"], True  # the template has its own BOS
    text = "".join(f"{_FALLBACK_NAMES[m['role']]}: {m['content']}\n" for m in safe) + "Assistant:"
    return text, tokenizer(text)["input_ids"], False


def _context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def build_prompt(tokenizer: Any, messages: Any, *, max_tokens: int | None = None) -> ChatPrompt:
    """Render messages with the chat template (or the plain fallback) and fit them in ``max_tokens``.

    Oldest turns go first (a leading system message stays); if the last message alone is too
    long, its beginning is cut. ``note`` says what was dropped.

    Raises:
        ValueError: malformed messages, or ``max_tokens`` below a usable prompt.
    """
    msgs = _normalise(messages)
    text, ids, templated = _render(tokenizer, msgs)
    if max_tokens is None or len(ids) <= max_tokens:
        return ChatPrompt(ids=tuple(ids), text=text, templated=templated)
    if max_tokens < _MIN_PROMPT:
        raise ValueError(f"the prompt budget is {max_tokens} tokens; at least {_MIN_PROMPT} are needed")
    original, dropped = len(ids), 0
    keep_system = msgs[0]["role"] == "system" and len(msgs) > 1
    while len(ids) > max_tokens and len(msgs) > 1 + keep_system:
        msgs.pop(1 if keep_system else 0)
        dropped += 1
        text, ids, templated = _render(tokenizer, msgs)
    cut = 0
    while len(ids) > max_tokens:
        content = tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        keep = len(content) - (len(ids) - max_tokens) - 2  # a little slack: re-tokenising can merge
        if keep <= 0:
            raise ValueError(f"the conversation's fixed parts need {len(ids)} tokens; only {max_tokens} fit in the context")
        cut += len(content) - keep
        msgs[-1] = {**msgs[-1], "content": tokenizer.decode(content[-keep:])}
        text, ids, templated = _render(tokenizer, msgs)
    note = (f"the conversation ({original} tokens) did not fit the {max_tokens}-token prompt budget: "
            f"dropped {dropped} earlier message(s) and the first {cut} token(s) of the last one")
    return ChatPrompt(ids=tuple(ids), text=text, templated=templated, note=note)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _check(name: str, value: Any, ok: bool, valid: str) -> None:
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def stream_reply(
    model: nn.Module,
    tokenizer: Any,
    messages: Any,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_event: Any = None,
) -> Iterator[str]:
    """Stream the assistant's reply; every yielded item is the whole reply so far.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (the chat template is used when it has one).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` or one user string.
        max_new_tokens: the most tokens generated (fewer if the model's context ends first).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling mass (1.0: off); top_k: 0 for off.
        repetition_penalty: > 1 discourages repeats (1.0: off).
        seed: seeds a private generator for sampling (no global RNG is touched).
        stop_event: a ``threading.Event``; when set, generation stops before the next token.

    Raises:
        ValueError: bad sampling options, malformed messages, or no room for the prompt.
    """
    _check("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1, "an integer >= 1")
    _check("temperature", temperature, isinstance(temperature, (int, float)) and 0 <= temperature <= 100, "a number in [0, 100]")
    _check("top_p", top_p, isinstance(top_p, (int, float)) and 0 < top_p <= 1, "a number in (0, 1]")
    _check("top_k", top_k, isinstance(top_k, int) and top_k >= 0, "an integer >= 0")
    _check("repetition_penalty", repetition_penalty,
           isinstance(repetition_penalty, (int, float)) and 0 < repetition_penalty <= 10, "a number in (0, 10]")
    _check("seed", seed, seed is None or (isinstance(seed, int) and seed >= 0), "None or an integer >= 0")
    context = _context_length(model)
    # The prompt keeps at least half the context; the reply then ends where the context ends.
    prompt = build_prompt(tokenizer, messages, max_tokens=max(context - max_new_tokens, context // 2))
    if prompt.note:
        warnings.warn(prompt.note, UserWarning, stacklevel=2)
        log.warning(prompt.note)
    # transformers is heavy: imported on first use
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    sampling = temperature > 0
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if sampling:
        processors.append(TemperatureLogitsWarper(float(temperature)))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(float(top_p)))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if sampling and seed is not None else None
    eos = _eos_ids(model, tokenizer)
    sequence = torch.tensor([prompt.ids], dtype=torch.long, device=device)  # (1, T)
    steps = min(max_new_tokens, context - len(prompt.ids))
    step = _stepper(model, len(prompt.ids) + steps)
    step_input, generated, text = sequence, [], ""
    was_training = model.training
    model.eval()
    # Our own token loop rather than generate() + TextIteratorStreamer in a thread: cancellation
    # between tokens, exceptions reach the caller, and sampling uses a private seeded generator.
    try:
        with torch.inference_mode():
            for _ in range(steps):
                if stop_event is not None and stop_event.is_set():
                    break
                logits = step(step_input)  # (1, V): the last position only
                scores = processors(sequence, logits.float()) if len(processors) else logits.float()
                if sampling:
                    token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)  # (1, 1)
                else:
                    token = scores.argmax(-1, keepdim=True)
                if int(token) in eos:
                    break
                generated.append(int(token))
                sequence = torch.cat([sequence, token], dim=1)
                step_input = token
                # the model may echo our escape from the prompt; never show it
                new = tokenizer.decode(generated, skip_special_tokens=True).replace(ZERO_WIDTH_SPACE, "")
                if not prompt.templated and "\nUser:" in new:  # the fallback's next turn begins
                    new = new.split("\nUser:")[0]
                    if new.strip() != text:
                        yield new.strip()
                    break
                new = new.lstrip()
                if new != text and not new.endswith("\ufffd"):  # wait for a complete UTF-8 character
                    text = new
                    yield text
    finally:
        model.train(was_training)


def _stepper(model: nn.Module, capacity: int):
    """A function ``ids (1, n) -> logits (1, V)`` of the last position, keeping its own KV cache.

    LLaMA-family models run through ``flexigpt.runner.BlockRunner`` (the model's own modules,
    the same logits as its forward pass, with a preallocated cache and less per-token overhead);
    other models through their forward pass with a transformers cache. Only the last position
    goes through the LM head, as in ``generate``.
    """
    # imported on first use: keeps importing this module light
    from flexigpt.runner import BlockRunner, runner_support

    if runner_support(model) is None:
        runner = BlockRunner(model)
        cache = runner.new_cache(max(capacity, 1))
        position = [0]

        def step(ids: torch.Tensor) -> torch.Tensor:
            hidden = runner.run(runner.embed(ids), 0, runner.num_layers, cache, position[0])
            position[0] += ids.shape[1]
            return runner.logits(hidden[:, -1:])

        return step
    # inspect: only this path needs it
    import inspect

    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    past = [None]

    def step(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, past_key_values=past[0], use_cache=True, **({"logits_to_keep": 1} if keep else {}))
        past[0] = out.past_key_values
        return out.logits[:, -1, :]

    return step


def reply(model: nn.Module, tokenizer: Any, messages: Any, **options: Any) -> str:
    """The whole reply as one string (same options as ``stream_reply``)."""
    text = ""
    for text in stream_reply(model, tokenizer, messages, **options):
        pass
    return text
