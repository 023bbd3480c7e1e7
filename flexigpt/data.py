"""Which tokens do we calibrate and heal on? Text sources -> fixed-length token windows.

Data references:
    ``default``               CPython's ``pydoc_data.topics`` (English prose about Python, PSF licence),
                              always present, about 113k SmolLM2 tokens.
    ``shakespeare``           *The Tempest* and *Romeo and Juliet* (public domain), shipped with the
                              package: a second, differently-styled offline text for cross-domain checks.
    a ``.txt`` file           plain UTF-8 text.
    a ``.jsonl`` file         one JSON object per line; its ``text`` field (or the first string field).
    ``hf:NAME[:CONFIG]:SPLIT``  a Hugging Face dataset through ``datasets`` (online or cached), ``text`` column.

Split protocol (fixed, documented in the README): the whole text is tokenised once, without
special tokens; the first 90 % of the token stream is the *train* part (calibration and
recovery draw from it) and the last 10 % is the *held-out* part (perplexity). The boundary is
a token index, so it does not move with the window length: calibration and recovery never see
an evaluation token. Each part is cut into non-overlapping windows of ``seq_len`` tokens; a
trailing remainder shorter than a window is dropped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

__all__ = ["EMBEDDED", "HELDOUT_FRACTION", "MAX_TEXT_BYTES", "Windows", "load_text", "token_windows", "tokenize_text"]

HELDOUT_FRACTION = 0.10
MAX_TEXT_BYTES = 200 * 1024 * 1024
_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


@dataclass(frozen=True)
class Windows:
    """Token windows of one split, with the protocol that produced them."""

    input_ids: torch.Tensor  # (N, T) int64
    data: str
    split: Literal["train", "heldout"]
    seq_len: int
    total_tokens: int  # tokens in the whole source, before the split
    bos: bool
    # (N, T) bool, or None (every token): which tokens recovery learns to predict. Chat data marks
    # only the replies, so the loss is not spent on the chat template and the prompts.
    loss_mask: torch.Tensor | None = None

    @property
    def num_windows(self) -> int:
        return int(self.input_ids.shape[0])

    def head(self, n: int | None) -> "Windows":
        """The first ``n`` windows (all when ``n`` is None or not smaller)."""
        if n is None or self.num_windows <= n:
            return self
        mask = None if self.loss_mask is None else self.loss_mask[:n].clone()
        return dataclasses.replace(self, input_ids=self.input_ids[:n].clone(), loss_mask=mask)

    def protocol(self) -> dict[str, Any]:
        """The fields printed next to every number computed on these windows."""
        return {
            "data": self.data,
            "split": self.split,
            "split_rule": f"last {int(HELDOUT_FRACTION * 100)}% of the token stream is held out",
            "windows": self.num_windows,
            "seq_len": self.seq_len,
            "tokens": self.num_windows * self.seq_len,
            "level": "token",
            "bos": self.bos,
            **({} if self.loss_mask is None else {"loss_tokens": int(self.loss_mask[:, 1:].sum())}),
        }


def _default_text() -> str:
    # pydoc_data: only this path needs it
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def _shakespeare_text() -> str:
    return (Path(__file__).resolve().parent / "corpora" / "shakespeare.txt").read_text(encoding="utf-8")


EMBEDDED = {"default": _default_text, "shakespeare": _shakespeare_text}


def _read_jsonl(path: Path) -> str:
    parts: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data file {str(path)!r} line {lineno} is not valid JSON ({err.msg})") from err
        if isinstance(obj, str):
            parts.append(obj)
        elif isinstance(obj, dict):
            text = obj.get("text")
            if not isinstance(text, str):
                text = next((v for v in obj.values() if isinstance(v, str)), None)
            if text is None:
                raise ValueError(f"data file {str(path)!r} line {lineno} has no string field (expected 'text')")
            parts.append(text)
        else:
            raise ValueError(f"data file {str(path)!r} line {lineno} is neither a string nor an object")
    return "\n\n".join(parts)


def _read_hf(ref: str) -> str:
    fields = ref[3:].split(":")
    if len(fields) == 2:
        name, config, split = fields[0], None, fields[1]
    elif len(fields) == 3:
        name, config, split = fields
    else:
        raise ValueError(f"data reference {ref!r} must look like hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    try:
        # datasets is heavy: imported on first use
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown dataset, bad split...
        raise ValueError(
            f"data {ref!r} could not be loaded through `datasets` ({type(err).__name__}: {err}); "
            "it needs network or a local datasets cache"
        ) from err
    column = "text" if "text" in ds.column_names else next(
        (c for c in ds.column_names if ds.features[c].dtype == "string"), None
    )
    if column is None:
        raise ValueError(f"data {ref!r} has no text column; columns: {ds.column_names}")
    return "\n\n".join(t for t in ds[column] if t)


def load_text(ref: str) -> str:
    """Return the raw text of a data reference (see module docstring).

    Raises:
        ValueError: a missing, empty, binary or oversized file, or an unknown reference.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"data reference must be a non-empty string, got {ref!r}")
    if ref in EMBEDDED:
        return EMBEDDED[ref]()
    if ref.startswith("hf:"):
        text = _read_hf(ref)
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ValueError(
                f"data file {ref!r} does not exist (valid: {', '.join(EMBEDDED)}, a .txt/.jsonl file, hf:NAME:SPLIT)"
            )
        if path.suffix.lower() not in (".txt", ".jsonl", ".md", ".text"):
            raise ValueError(f"data file {ref!r} has suffix {path.suffix!r}; expected .txt or .jsonl")
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"data file {ref!r} is {size} bytes; the limit is {MAX_TEXT_BYTES}")
        raw = path.read_bytes()
        if b"\x00" in raw[:65536]:
            raise ValueError(f"data file {ref!r} looks binary (NUL bytes); expected UTF-8 text")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {ref!r} is not UTF-8 text (byte {err.start})") from err
        text = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else raw.decode("utf-8")
    if not text.strip():
        raise ValueError(f"data {ref!r} is empty")
    return text


def _tokenizer_key(tokenizer: Any) -> str:
    vocab = getattr(tokenizer, "vocab_size", 0)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    probe = tokenizer("FlexiGPT calibration probe 123", add_special_tokens=False)["input_ids"]
    return hashlib.sha256(f"{name}|{vocab}|{probe}".encode()).hexdigest()[:16]


def tokenize_text(tokenizer: Any, ref: str) -> torch.Tensor:
    """The whole source as one 1-D token stream (no special tokens), memoised per tokenizer."""
    key = (_tokenizer_key(tokenizer), ref)
    if key not in _TOKEN_CACHE:
        text = load_text(ref)
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def token_windows(
    tokenizer: Any,
    data: str = "default",
    *,
    seq_len: int = 256,
    split: Literal["train", "heldout"] = "train",
    max_windows: int | None = None,
    bos: bool = False,
    max_len: int | None = None,
) -> Windows:
    """Cut one split of a data source into ``(N, seq_len)`` token windows.

    Args:
        tokenizer: a Hugging Face tokenizer.
        data: a data reference (see module docstring).
        seq_len: tokens per window (including the BOS token when ``bos``).
        split: ``train`` (first 90 % of tokens) or ``heldout`` (last 10 %).
        max_windows: keep at most this many windows (the first ones, deterministic).
        bos: put the tokenizer's BOS token at the start of every window.
        max_len: the model's context length; ``seq_len`` above it is an error.

    Raises:
        ValueError: bad ``seq_len``/``max_windows``/``split``, or too little text for one window.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_len is not None and seq_len > max_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context length {max_len}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"samples/max_windows must be a positive integer, got {max_windows!r}")
    stream = tokenize_text(tokenizer, data)
    cut = int(len(stream) * (1.0 - HELDOUT_FRACTION))
    part = stream[:cut] if split == "train" else stream[cut:]
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    if bos and bos_id is None:
        raise ValueError("bos=True but the tokenizer has no BOS token")
    body = seq_len - (1 if bos_id is not None else 0)
    n = len(part) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"data {data!r} has {len(part)} {split} tokens, fewer than one window of {seq_len}; "
            "use a shorter seq_len or more text"
        )
    windows = part[: n * body].view(n, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), windows], dim=1)
    return Windows(input_ids=windows.clone(), data=data, split=split, seq_len=seq_len, total_tokens=len(stream), bos=bos)
