"""What do we heal a chat model on? Self-distillation chat data: the original's own replies.

``distill_prompts`` builds several hundred single-turn prompts from templates and word lists
written for this project (arithmetic, capitals, definitions, opposites and synonyms,
translations, lists, rewrites, short explanations, animals, simple instructions). The prompts of
the fidelity set (``flexigpt.prompt_sets.builtin_prompts``) are held out: none of them is in the
distillation set, so chat fidelity is never measured on a training prompt.

``chat_data`` has the original model answer them greedily once (``flexigpt.greedy``, batched)
and caches the replies on disk, keyed by the model's fingerprint, the rendered prompts (prompt
set, tokenizer and chat template) and the generation settings; a changed model or prompt set
is a new key. ``ChatData.windows`` renders every conversation as the chat shows it to the model
(the templated prompt, the reply tokens, the end-of-turn token), concatenates the conversations
in a seeded order and cuts the stream into ``(N, seq_len)`` windows, like
``flexigpt.data.token_windows``: ``flexigpt.recover.recover`` trains on them unchanged.
``mix_windows`` interleaves two window sets at a given share (and their loss masks).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flexigpt.data import Windows
from flexigpt.greedy import GreedyReply, cached_greedy_replies, eos_ids
from flexigpt.prompt_sets import PromptItem, PromptSet, builtin_prompts

log = logging.getLogger(__name__)

__all__ = ["ChatData", "chat_data", "distill_prompts", "mix_windows"]

DEFAULT_MAX_NEW_TOKENS = 96

_COUNTRIES = ("Portugal Greece Egypt Canada Australia India Argentina Kenya Norway Sweden Poland Ireland Turkey Peru "
              "Chile Cuba Thailand Vietnam Austria Belgium Netherlands Denmark Finland Hungary Switzerland Morocco "
              "Nigeria Colombia Indonesia Iran").split()
_CITIES = ("Sydney Toronto Mumbai Cairo Istanbul Barcelona Munich Osaka Chicago Lagos Nairobi Lima Oslo Dublin "
           "Vienna Prague Warsaw Athens Lisbon Stockholm").split()
_THINGS = ("a volcano|a library|a bicycle|an island|a recipe|a vaccine|a poem|an orchestra|a battery|a glacier|"
           "a calendar|a compass|a museum|a desert|a planet|a bridge|a rainbow|an atom|a telescope|a map|a dictionary|"
           "a hospital|a forest|a computer|a microscope|an election|a tax|a virus|a magnet|a harbor").split("|")
_WORDS = ("curious brave ancient gentle rapid fragile honest generous famous quiet humble patient clever "
          "polite stubborn").split()
_CONCEPTS = ("gravity|friendship|inflation|evaporation|recycling|electricity|a budget|the internet|evolution|"
             "erosion|a habit|climate|a healthy diet|time zones|an echo").split("|")
_OPPOSITES = "early light happy open fast strong wet full rich young loud soft high inside begin".split()
_TRANSLATE = ("good morning|goodbye|please|water|book|house|friend|cat|dog|red|bread|school|sun|night|apple").split("|")
_LANGUAGES = ("French", "Spanish", "German", "Italian")
_CATEGORIES = ("fruits|vegetables|animals that live in the sea|musical instruments|sports|countries in Europe|"
               "colors|birds|tools|things you find in a kitchen|planets|jobs|board games|flowers|languages").split("|")
_SENTENCES = ("I walk to the park every morning.|She writes a letter to her friend.|We eat dinner at seven.|"
              "The children play in the garden.|He reads the newspaper.|They build a small house.|"
              "The dog chases the ball.|I drink a cup of tea.|My brother drives to work.|The bird sings a song.").split("|")
_MISSPELLED = ("I recieved the pakage yesterday.|The wether is beatiful today.|She is my best freind.|"
               "We went to the libary.|This is a grate idea.").split("|")
_EXPLAIN = ("Why do leaves change color in autumn?|Why do we need sleep?|How does a rainbow form?|"
            "Why is exercise good for you?|How do airplanes stay in the air?|Why does the Moon change shape?|"
            "Why do we have seasons?|How do fish breathe underwater?|Why is it important to drink water?|"
            "How does a refrigerator keep food cold?|Why do cats purr?|What causes thunder?|"
            "Why do people learn foreign languages?|How do plants grow from seeds?|Why should we recycle?|"
            "Give me a tip for studying better.|Give me a tip for saving money.|Give me a tip for sleeping well.|"
            "How can I make a cup of tea?|What should I pack for a beach trip?|How do I write a good email?|"
            "Suggest a name for a pet goldfish.|Suggest a fun activity for a rainy day.|"
            "What is a good breakfast?|How can I be more productive?").split("|")
_ANIMALS = "dog horse bird cow octopus duck snake frog chicken kangaroo".split()
_SOUNDS = "dog cat cow duck sheep horse lion owl pig frog".split()
_TOPICS = ("the ocean|autumn|a city at night|friendship|a mountain|coffee|the moon|a train journey|music|winter|"
           "a garden|a library|the wind|a lighthouse|bread").split("|")
_NUMBERS = (3, 4, 7, 8, 9, 11, 13, 14, 16, 18, 21, 24, 32, 45, 60, 75, 99, 120)


def _arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(10):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        out.append((f"What is {a} + {b}?", "arithmetic"))
        out.append((f"What is {max(a, b)} minus {min(a, b)}?", "arithmetic"))
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        out.append((f"What is {x} times {y}?", "arithmetic"))
        out.append((f"What is {x * y} divided by {y}?", "arithmetic"))
    for n in _NUMBERS:
        out.append((f"Is {n} an even or an odd number?", "arithmetic"))
        out.append((f"What is double {n}?", "arithmetic"))
    return out


def _templated(rng: random.Random) -> list[tuple[str, str]]:
    out = _arithmetic(rng)
    out += [(f"What is the capital of {c}?", "capital") for c in _COUNTRIES]
    out += [(f"In which country is the city of {c}?", "capital") for c in _CITIES]
    out += [(f"What is {t}? Answer in one sentence.", "definition") for t in _THINGS]
    out += [(f"Define the word '{w}'.", "definition") for w in _WORDS]
    out += [(f"Explain {c} in simple words.", "definition") for c in _CONCEPTS]
    out += [(f"What is the opposite of '{w}'?", "opposite") for w in _OPPOSITES]
    out += [(f"Give a synonym for '{w}'.", "opposite") for w in _WORDS]
    out += [(f"Translate '{w}' into {_LANGUAGES[i % len(_LANGUAGES)]}.", "translate") for i, w in enumerate(_TRANSLATE)]
    out += [(f"List three {c}.", "list") for c in _CATEGORIES]
    out += [(f"Name one of the {c} you like and say why.", "list") for c in _CATEGORIES[:8]]
    out += [(f"Rewrite this sentence in the past tense: {s}", "rewrite") for s in _SENTENCES]
    out += [(f"Make this sentence sound more formal: {s}", "rewrite") for s in _SENTENCES[:5]]
    out += [(f"Correct the spelling in this sentence: {s}", "rewrite") for s in _MISSPELLED]
    out += [(q, "explain") for q in _EXPLAIN]
    out += [(f"How many legs does a {a} have?", "animal") for a in _ANIMALS]
    out += [(f"What sound does a {a} make?", "animal") for a in _SOUNDS]
    out += [(f"Write one sentence about {t}.", "instruction") for t in _TOPICS]
    out += [(f"Write a two-line poem about {t}.", "instruction") for t in _TOPICS[:8]]
    out += [(f"Answer with one word: what is the opposite of '{w}'?", "instruction") for w in _OPPOSITES[:8]]
    out += [(f"Spell the word '{w}' letter by letter.", "instruction") for w in _WORDS[:6]]
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


def distill_prompts(*, held_out: PromptSet | None = None, seed: int = 0) -> PromptSet:
    """The template-generated distillation prompts, minus every prompt of ``held_out``.

    Args:
        held_out: prompts never to train on (default: the built-in fidelity set).
        seed: draws the arithmetic operands and the order.
    """
    held = builtin_prompts() if held_out is None else held_out
    banned = {_norm(i.prompt) for i in held.items}
    rng = random.Random(seed)
    seen, items = set(banned), []
    for text, kind in _templated(rng):
        if _norm(text) not in seen:
            seen.add(_norm(text))
            items.append(PromptItem(prompt=text, kind=kind))
    rng.shuffle(items)
    return PromptSet(name=f"chat-distill-v1 (held out: {held.name})", items=tuple(items))


@dataclass(frozen=True)
class ChatData:
    """Distillation prompts with the original's greedy replies, and where they came from."""

    prompts: PromptSet
    replies: list[GreedyReply]
    end_ids: tuple[int, ...]  # appended after a reply the model ended itself
    path: Path
    generated: bool  # False: read from the cache
    seconds: float
    max_new_tokens: int

    def conversations(self) -> list[list[int]]:
        """Each conversation's tokens: templated prompt, reply, end-of-turn token if the reply ended."""
        return [list(r.prompt_ids) + list(r.tokens) + (list(self.end_ids) if r.ended else []) for r in self.replies]

    def windows(self, seq_len: int = 256, *, seed: int = 0, max_windows: int | None = None,
                replies_only: bool = False) -> Windows:
        """The conversations, in a seeded order, as one stream cut into ``(N, seq_len)`` windows.

        With ``replies_only`` the windows carry a ``loss_mask`` that marks the reply tokens (and
        the end-of-turn token after them): recovery then learns to predict the original's
        replies, not the chat template and the prompts, which the model reads but never writes.

        Raises:
            ValueError: a bad ``seq_len``/``max_windows`` or fewer tokens than one window.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                        or max_windows < 1):
            raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
        convs = self.conversations()
        written = [len(r.prompt_ids) for r in self.replies]  # tokens before the reply, per conversation
        order = list(range(len(convs)))
        random.Random(seed).shuffle(order)
        stream = torch.tensor([t for i in order for t in convs[i]], dtype=torch.long)
        mask = torch.tensor([j >= written[i] for i in order for j in range(len(convs[i]))], dtype=torch.bool)
        n = len(stream) // seq_len if max_windows is None else min(len(stream) // seq_len, max_windows)
        if n == 0:
            raise ValueError(f"the chat data has {len(stream)} tokens, fewer than one window of {seq_len}")
        return Windows(input_ids=stream[: n * seq_len].view(n, seq_len).clone(),
                       data=f"chat:{self.prompts.name}:{self.prompts.sha256[:12]}{':replies' if replies_only else ''}",
                       split="train", seq_len=seq_len, total_tokens=len(stream), bos=False,
                       loss_mask=mask[: n * seq_len].view(n, seq_len).clone() if replies_only else None)

    def protocol(self) -> dict[str, Any]:
        return {**self.prompts.protocol(), "max_new_tokens": self.max_new_tokens, "greedy": True,
                "replies_ended": sum(r.ended for r in self.replies), "cache": str(self.path)}


def chat_data(
    model: nn.Module,
    tokenizer: Any,
    *,
    prompts: PromptSet | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 64,
    callback: Callable[[int, int], None] | None = None,
) -> ChatData:
    """The original model's greedy replies to the distillation prompts, generated once and cached.

    Args:
        model: the original (unpruned) model: its replies are the targets.
        tokenizer: its tokenizer; it must have a chat template.
        prompts: the prompts (default ``distill_prompts()``).
        max_new_tokens: reply length limit.
        batch_size: prompts decoded together.
        callback: ``callback(done, total)`` after every generated batch.

    Raises:
        ValueError: a tokenizer without a chat template, or bad generation settings.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat data needs a tokenizer with a chat template; this one has none "
                         "(use text data such as 'default' for recovery instead)")
    pset = distill_prompts() if prompts is None else prompts
    got = cached_greedy_replies(model, tokenizer, [i.prompt for i in pset.items], max_new_tokens=max_new_tokens,
                                batch_size=batch_size, callback=callback)
    end = getattr(tokenizer, "eos_token_id", None)
    end_ids = (end,) if isinstance(end, int) else tuple(sorted(eos_ids(model, tokenizer)))[:1]
    log.info("chat data: %d replies %s in %.1f s (%s)", len(got.replies), "generated" if got.generated else "cached",
             got.seconds, got.path)
    return ChatData(prompts=pset, replies=got.replies, end_ids=end_ids, path=got.path, generated=got.generated,
                    seconds=got.seconds, max_new_tokens=max_new_tokens)


def _ids(w: Any, name: str) -> torch.Tensor:
    ids = getattr(w, "input_ids", w)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype != torch.long or ids.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, T) int64 tensor or flexigpt.data.Windows, "
                         f"got {type(ids).__name__}")
    return ids


def mix_windows(a: Windows | torch.Tensor, b: Windows | torch.Tensor, fraction: float) -> Windows:
    """Interleave windows of ``a`` and ``b`` so that a ``fraction`` share comes from ``b``.

    No window is repeated: the result is as large as the smaller side allows
    (``min(len(a) / (1 - fraction), len(b) / fraction)`` windows), the first windows of each
    side in their order, spread evenly, so any prefix of the result keeps about the same share.

    Raises:
        ValueError: ``fraction`` outside [0, 1], different window lengths, or bad windows.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    ia, ib = _ids(a, "a"), _ids(b, "b")
    if ia.shape[1] != ib.shape[1]:
        raise ValueError(f"windows differ in length: a has {ia.shape[1]} tokens, b has {ib.shape[1]}; "
                         "cut both with the same seq_len")
    if fraction == 0:
        total = ia.shape[0]
    elif fraction == 1:
        total = ib.shape[0]
    else:
        total = int(min(ia.shape[0] / (1 - fraction), ib.shape[0] / fraction))
    nb = min(ib.shape[0], int(round(fraction * total)))
    na = min(ia.shape[0], total - nb)
    # window k comes from b when the running share of b falls behind the target (evenly spread)
    ma, mb = (_mask(w, ids) for w, ids in ((a, ia), (b, ib)))
    rows, masks, ta, tb = [], [], 0, 0
    for k in range(na + nb):
        if tb < nb and (ta >= na or (tb + 1) <= fraction * (k + 1) + 1e-9):
            rows.append(ib[tb])
            masks.append(mb[tb])
            tb += 1
        else:
            rows.append(ia[ta])
            masks.append(ma[ta])
            ta += 1
    if not rows:
        raise ValueError(f"mixing {ia.shape[0]} and {ib.shape[0]} windows at fraction {fraction} leaves no window")
    names = [w.data if isinstance(w, Windows) else side for w, side in ((a, "a"), (b, "b"))]
    total_tokens = sum(w.total_tokens if isinstance(w, Windows) else int(w.numel()) for w in (a, b))
    bos = isinstance(a, Windows) and isinstance(b, Windows) and a.bos and b.bos
    masked = any(getattr(w, "loss_mask", None) is not None for w in (a, b))
    return Windows(input_ids=torch.stack(rows), data=f"mix({names[0]}, {names[1]}, {fraction:g})", split="train",
                   seq_len=int(ia.shape[1]), total_tokens=total_tokens, bos=bos,
                   loss_mask=torch.stack(masks) if masked else None)


def _mask(w: Any, ids: torch.Tensor) -> torch.Tensor:
    """``w``'s loss mask, or every token when it has none."""
    mask = getattr(w, "loss_mask", None)
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
