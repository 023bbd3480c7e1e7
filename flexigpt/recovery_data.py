"""What does recovery train on? Text, the original model's own chat replies, or a mix.

``recovery_windows`` resolves a recovery data reference to train windows:

* a text reference (``default``, ``shakespeare``, a file, a dataset; ``flexigpt.data``): its train split;
* ``chat``: self-distillation chat data, the original model's greedy replies to the template
  prompts (which hold the fidelity set out), rendered through its chat template, generated once
  and cached (``flexigpt.chat_data``); needs a tokenizer with a chat template;
* ``mixed``: ``fraction`` of the windows from ``chat``, the rest from the text's train split,
  interleaved so any prefix keeps the share.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from flexigpt.chat_data import chat_data, distill_prompts, mix_windows
from flexigpt.data import Windows, token_windows
from flexigpt.prompt_sets import PromptSet

__all__ = ["CHAT", "MIXED", "RECOVERY_SOURCES", "has_chat_template", "recovery_windows"]

CHAT, MIXED = "chat", "mixed"
RECOVERY_SOURCES = (CHAT, MIXED)  # recovery data references besides text


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def recovery_windows(base: nn.Module, tokenizer: Any, ref: str, *, text: str = "default", seq_len: int = 256,
                     max_windows: int | None = None, max_len: int | None = None, fraction: float = 0.5,
                     prompts: int | None = None, replies_only: bool = False) -> Windows:
    """Train windows for recovery (or calibration) from ``ref``.

    Args:
        base: the original model (its replies are the chat data; generated once, then cached).
        tokenizer: its tokenizer.
        ref: a text reference, ``chat`` or ``mixed``.
        text: the text mixed in by ``mixed``.
        seq_len, max_windows, max_len: as ``flexigpt.data.token_windows``.
        fraction: the share of chat windows in ``mixed``.
        prompts: use only the first ``prompts`` distillation prompts (fewer replies to generate
            when little data is needed, as in the app's short recoveries); ``None``: all.
        replies_only: the chat windows carry a loss mask that marks only the replies
            (``ChatData.windows``); text windows learn every token.

    Raises:
        ValueError: ``chat``/``mixed`` with a tokenizer that has no chat template, and every
            ``token_windows`` error.
    """
    if ref not in RECOVERY_SOURCES:
        return token_windows(tokenizer, ref, seq_len=seq_len, split="train", max_windows=max_windows, max_len=max_len)
    if not has_chat_template(tokenizer):
        raise ValueError(f"recovery data {ref!r} is the original model's own chat replies, but this tokenizer has no "
                         f"chat template; use a text such as 'default'")
    pset = distill_prompts()
    if prompts is not None:
        if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
            raise ValueError(f"prompts must be a positive integer or None, got {prompts!r}")
        pset = PromptSet(name=f"{pset.name}, first {prompts}", items=pset.items[:prompts])
    chat = chat_data(base, tokenizer, prompts=pset).windows(seq_len=seq_len, replies_only=replies_only)
    if ref == CHAT:
        return chat.head(max_windows)
    plain = token_windows(tokenizer, text, seq_len=seq_len, split="train", max_len=max_len)
    return mix_windows(plain, chat, fraction).head(max_windows)
