"""Which prompts do we ask? Prompt sets with answer keys: the built-in set and JSONL files.

The built-in set (``builtin-v1``, ``flexigpt/corpora/chat_prompts.json``) holds short questions
and instructions written for this project: facts, arithmetic, definitions and simple
instructions, each with the keys a correct short answer contains. A JSONL file replaces it: one
``{"prompt": str, "keys": [str, ...]}`` object per line (an optional ``"kind"`` string groups the
rows); blank lines are skipped. A set is identified by the sha256 of its prompts and keys.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["BUILTIN", "MAX_PROMPTS", "PromptItem", "PromptSet", "builtin_prompts", "load_prompts"]

BUILTIN = Path(__file__).resolve().parent / "corpora" / "chat_prompts.json"
MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 2_000
MAX_KEY_CHARS = 200
MAX_FILE_BYTES = 20 * 1024 * 1024
_FIELDS = ("prompt", "keys", "kind")


@dataclass(frozen=True)
class PromptItem:
    """One prompt and the keys a correct reply contains (empty for distillation-only prompts)."""

    prompt: str
    keys: tuple[str, ...] = ()
    kind: str = ""


@dataclass(frozen=True)
class PromptSet:
    """A named, ordered list of prompts."""

    name: str
    items: tuple[PromptItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def sha256(self) -> str:
        """Hash of the prompts and keys in order (the name and kinds do not change it)."""
        canon = json.dumps([[i.prompt, list(i.keys)] for i in self.items], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def protocol(self) -> dict[str, Any]:
        return {"prompt_set": self.name, "size": len(self.items), "sha256": self.sha256}


def _item(obj: Any, where: str, need_keys: bool) -> PromptItem:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a JSON object {{\"prompt\": str, \"keys\": [str, ...]}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; valid fields: {list(_FIELDS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"{where}: 'prompt' must be a non-empty string of at most {MAX_PROMPT_CHARS} characters, "
                         f"got {prompt!r:.80}")
    keys = obj.get("keys", [])
    if not isinstance(keys, list) or (need_keys and not keys) or not all(
            isinstance(k, str) and k.strip() and len(k) <= MAX_KEY_CHARS for k in keys):
        raise ValueError(f"{where}: 'keys' must be a non-empty list of non-empty strings (at most {MAX_KEY_CHARS} "
                         f"characters each), got {keys!r:.80}")
    kind = obj.get("kind", "")
    if not isinstance(kind, str) or len(kind) > 40:
        raise ValueError(f"{where}: 'kind' must be a string of at most 40 characters, got {kind!r:.80}")
    return PromptItem(prompt=prompt, keys=tuple(k.strip() for k in keys), kind=kind)


def _check_size(items: list[PromptItem], where: str) -> None:
    if not items:
        raise ValueError(f"{where} holds no prompts; at least 1 is needed")
    if len(items) > MAX_PROMPTS:
        raise ValueError(f"{where} holds {len(items)} prompts; at most {MAX_PROMPTS}")


def load_prompts(path: str | Path) -> PromptSet:
    """Read a JSONL prompt file (see the module docstring); the set is named after the file.

    Raises:
        ValueError: a missing, oversized or non-UTF-8 file, no prompts, or a bad line (named by
            its number, with what is wrong).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist; expected a .jsonl file, one "
                         "{\"prompt\": ..., \"keys\": [...]} per line")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"prompt file {str(path)!r} is {size} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte {err.start})") from err
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompt file {str(path)!r} line {lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{where} is not valid JSON ({getattr(err, 'msg', err)})") from err
        items.append(_item(obj, where, need_keys=True))
    _check_size(items, f"prompt file {str(path)!r}")
    return PromptSet(name=p.name, items=tuple(items))


@lru_cache(maxsize=1)
def builtin_prompts() -> PromptSet:
    """The built-in set shipped with the package (``builtin-v1``)."""
    doc = json.loads(BUILTIN.read_text(encoding="utf-8"))
    items = [_item(obj, f"built-in prompt {i}", need_keys=True) for i, obj in enumerate(doc["prompts"])]
    _check_size(items, "the built-in prompt set")
    return PromptSet(name=doc["name"], items=tuple(items))
