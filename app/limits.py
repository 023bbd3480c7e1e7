"""How much may one visitor, and all visitors together, use? The app's limits, in one place.

One setting switches them: ``FLEXIGPT_MODE=public`` (limits on, models restricted to an
allow-list) or ``FLEXIGPT_MODE=local`` (resource limits off, any local folder). Without it the
mode is ``public`` when ``SPACE_ID`` is set (as on Hugging Face Spaces) and ``local`` otherwise
(``make demo``). Every limit has a documented default per mode (``SETTINGS``) and an environment
override ``FLEXIGPT_<NAME>``; ``current()`` reads them. Input hygiene (no URLs as model
references, control characters stripped from chat input, plan uploads capped) applies in both
modes.

Pure Python (no torch, no gradio): handlers call the ``check_*`` functions, which raise
``ValueError`` with the numbers in the message (the app turns that into ``gr.Error``).
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass

MODES = ("public", "local")
UNLIMITED = None

# name: (public default, local default, what it bounds). None = no limit. Override: FLEXIGPT_<NAME>.
SETTINGS: dict[str, tuple[int | None, int | None, str]] = {
    "heavy_jobs": (1, 1, "model jobs (load, score, build, recover, chat, export) run at once; the rest queue"),
    "queue_size": (24, None, "requests waiting in the queue; beyond it a visitor is told the server is busy"),
    "max_sessions": (8, 8, "visitors whose work is kept; beyond it the least recently active one is freed"),
    "idle_seconds": (20 * 60, 45 * 60, "a visitor's built models are freed after this long without a request"),
    "builds_per_visitor": (4, None, "built models one visitor holds at once"),
    "builds_total": (16, None, "built models held for all visitors together"),
    "build_mb_per_visitor": (1024, None, "MB of tensors a visitor's built models own (shared base weights not counted)"),
    "build_mb_total": (4096, None, "MB of tensors all built models own together"),
    "rss_mb": (12 * 1024, None, "resident memory (MB) of the server above which new heavy jobs are refused"),
    "recover_steps": (100, 500, "recovery steps per run"),
    "fit_steps": (200, 1000, "block-local fitting steps per slot (fit slots)"),
    "recover_batch": (4, 16, "windows per recovery step"),
    "seq_len": (256, 4096, "tokens per window (scores, recovery)"),
    "score_windows": (32, 256, "calibration windows for block scores and share error"),
    "new_tokens": (128, 1024, "tokens generated per chat reply"),
    "chat_chars": (2000, 20000, "characters of one chat message (longer input is cut, and the visitor told)"),
    "history_chars": (16000, 200000, "characters of chat history sent back with a message"),
    "upload_bytes": (64 * 1024, 1_000_000, "bytes of an uploaded plan.json"),
}
MODE_ENV = "FLEXIGPT_MODE"
MODELS_ENV = "FLEXIGPT_ALLOWED_MODELS"
DATA_ENV = "FLEXIGPT_ALLOWED_DATA"
PUBLIC_MODELS = ("default",)
PUBLIC_DATA = ("default", "shakespeare")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


@dataclass(frozen=True)
class Limits:
    """The limits in force. ``None`` means no limit. See ``SETTINGS`` for each field's meaning."""

    mode: str
    allowed_models: tuple[str, ...] | None
    allowed_data: tuple[str, ...] | None
    heavy_jobs: int
    queue_size: int | None
    max_sessions: int
    idle_seconds: int
    builds_per_visitor: int | None
    builds_total: int | None
    build_mb_per_visitor: int | None
    build_mb_total: int | None
    rss_mb: int | None
    recover_steps: int
    fit_steps: int
    recover_batch: int
    seq_len: int
    score_windows: int
    new_tokens: int
    chat_chars: int
    history_chars: int
    upload_bytes: int

    @property
    def public(self) -> bool:
        return self.mode == "public"


def resolve_mode(env: dict | None = None) -> str:
    """``public`` or ``local`` from ``FLEXIGPT_MODE``, else ``public`` iff ``SPACE_ID`` is set."""
    env = os.environ if env is None else env
    mode = (env.get(MODE_ENV) or "").strip().lower()
    if not mode:
        return "public" if env.get("SPACE_ID") else "local"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {env.get(MODE_ENV)!r}")
    return mode


def _setting(env: dict, name: str, default: int | None) -> int | None:
    raw = env.get(f"FLEXIGPT_{name.upper()}")
    if raw is None or not raw.strip():
        return default
    if raw.strip().lower() in ("none", "off", "unlimited"):
        if name in ("heavy_jobs", "max_sessions", "idle_seconds", "recover_steps", "fit_steps", "recover_batch", "seq_len",
                    "score_windows", "new_tokens", "chat_chars", "history_chars", "upload_bytes"):
            raise ValueError(f"FLEXIGPT_{name.upper()} needs a number, got {raw!r}")
        return None
    try:
        value = int(raw)
    except ValueError as err:
        raise ValueError(f"FLEXIGPT_{name.upper()} must be a whole number >= 1 (or 'none'), got {raw!r}") from err
    if value < 1:
        raise ValueError(f"FLEXIGPT_{name.upper()} must be >= 1, got {value}")
    return value


def _names(raw: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (raw or "").split(",") if x.strip())


def current(env: dict | None = None) -> Limits:
    """The limits for the current environment (read on every call: cheap, and tests can change it)."""
    env = os.environ if env is None else env
    mode = resolve_mode(env)
    col = 0 if mode == "public" else 1
    values = {name: _setting(env, name, spec[col]) for name, spec in SETTINGS.items()}
    if mode == "public":
        models = tuple(dict.fromkeys(PUBLIC_MODELS + _names(env.get(MODELS_ENV))))
        data = tuple(dict.fromkeys(PUBLIC_DATA + _names(env.get(DATA_ENV))))
    else:
        models = data = None
    return Limits(mode=mode, allowed_models=models, allowed_data=data, **values)


# ---- checks (ValueError with the numbers) --------------------------------------------------------
def is_url(ref: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", ref)) or ref.startswith("//")


def check_model_ref(ref: str, lim: Limits | None = None) -> str:
    """A model reference the server may load: never a URL; in public mode only the allow-list."""
    lim = lim or current()
    ref = (ref or "").strip() or "default"
    if len(ref) > 1000 or "\x00" in ref:
        raise ValueError(f"model reference is not a valid name or path: {ref[:80]!r}")
    if is_url(ref):
        raise ValueError(f"model reference {ref!r} is a URL; URLs are never loaded (use 'default', a local folder "
                         "or a cached hub id owner/name)")
    if lim.allowed_models is not None and ref not in lim.allowed_models:
        raise ValueError(f"model {ref!r} is not available on this public server; allowed: {list(lim.allowed_models)} "
                         f"(the operator extends the list with {MODELS_ENV})")
    return ref


def check_data_ref(ref: str, lim: Limits | None = None) -> str:
    """A data reference the server may read: in public mode only the allow-list (no server files, no hub)."""
    lim = lim or current()
    ref = (ref or "").strip() or "default"
    if len(ref) > 1000 or "\x00" in ref:
        raise ValueError(f"data reference is not a valid name or path: {ref[:80]!r}")
    if is_url(ref):
        raise ValueError(f"data reference {ref!r} is a URL; use 'default', 'shakespeare' or a local .txt/.jsonl file")
    if lim.allowed_data is not None and ref not in lim.allowed_data:
        raise ValueError(f"data {ref!r} is not available on this public server; allowed: {list(lim.allowed_data)} "
                         f"(the operator extends the list with {DATA_ENV})")
    return ref


def check_int(what: str, value, lo: int, hi: int | None) -> int:
    """A whole number in ``[lo, hi]`` (``hi=None``: no upper limit), or ValueError quoting it and the range."""
    try:
        f = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a whole number in [{lo}, {hi if hi is not None else '∞'}], got {value!r}") from err
    if f != f or f in (float("inf"), float("-inf")) or f != int(f):
        raise ValueError(f"{what} must be a whole number in [{lo}, {hi if hi is not None else '∞'}], got {value!r}")
    n = int(f)
    if n < lo or (hi is not None and n > hi):
        limit = " (the limit on this server)" if hi is not None else ""
        raise ValueError(f"{what} must be in [{lo}, {hi if hi is not None else '∞'}]{limit}, got {n}")
    return n


def check_float(what: str, value, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number in [{lo}, {hi}], got {value!r}") from err
    if not lo <= f <= hi:  # also false for NaN
        raise ValueError(f"{what} must be a number in [{lo}, {hi}], got {value!r}")
    return f


def clean_text(text, max_chars: int) -> tuple[str, list[str]]:
    """Chat input made safe to show and tokenize: control characters (NUL, escapes, bidi overrides)
    removed and the length capped. Returns the text and what was changed, in words."""
    if text is None:
        return "", []
    if not isinstance(text, str):
        raise ValueError(f"a message must be text, got {type(text).__name__}")
    notes = []
    normalised = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    removed = len(_CONTROL.findall(normalised))
    cleaned = _CONTROL.sub("", normalised)
    if "\r" in cleaned:
        cleaned = cleaned.replace("\r", "\n")
    if removed > 0:
        notes.append(f"{removed} control character(s) removed")
    if len(cleaned) > max_chars:
        notes.append(f"cut from {len(cleaned):,} to {max_chars:,} characters (the limit on this server)")
        cleaned = cleaned[:max_chars]
    return cleaned, notes


def check_memory(held_mb: float, adding_mb: float, cap_mb: int | None, what: str) -> None:
    """Refuse when ``held + adding`` would exceed ``cap`` (``None``: no cap)."""
    if cap_mb is not None and held_mb + adding_mb > cap_mb:
        raise ValueError(f"limit reached: {what} would hold {held_mb + adding_mb:,.0f} MB, the limit is {cap_mb:,} MB; "
                         "free a build (build with the same settings to replace it) or try again later")
