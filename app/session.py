"""Where the app keeps models and per-visitor work.

* Base models are loaded once per model reference and shared, read-only, by every visitor
  (surgery never modifies them: ``flexigpt.surgery.apply_plan`` returns a new model whose
  slots share the base Parameters).
* Everything a visitor makes (the last analysis, built models, recovery runs, exports) lives in a
  :class:`Work` keyed by Gradio's ``session_hash``. It is freed by ``demo.unload`` and by an idle
  sweep, so an abandoned tab does not keep a model in memory forever.

``gr.State`` holds only the Plan and small keys; models never go through it (it deep-copies).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IDLE_SECONDS = 45 * 60  # a visitor's built models are freed after this long without a request
MAX_SESSIONS = 8  # the oldest visitor's work is freed beyond this (models are large)


class ModelRegistry:
    """Base models by reference, loaded on first use and never mutated."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self._info: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get(self, ref: str):
        """The ``flexigpt.models.LoadedModel`` for ``ref`` (loads it once; ValueError for a bad ref)."""
        ref = (ref or "").strip() or "default"
        with self._lock:
            if ref not in self._models:
                from flexigpt.models import load_model

                self._models[ref] = load_model(ref)
            return self._models[ref]

    def loaded(self, ref: str) -> bool:
        return ((ref or "").strip() or "default") in self._models

    def info(self, ref: str) -> dict:
        """``flexigpt.models.model_info`` of the base model, memoised."""
        ref = (ref or "").strip() or "default"
        if ref not in self._info:
            from flexigpt.models import model_info

            loaded = self.get(ref)
            self._info[ref] = model_info(loaded.model, loaded.tokenizer)
        return self._info[ref]


@dataclass
class Build:
    """One model built in this visit, with the numbers the Compare tab shows."""

    name: str
    plan: Any  # flexigpt.plan.Plan
    model: Any  # torch module (never put in gr.State)
    tokenizer: Any
    ppl_before: float | None = None
    ppl_after: float | None = None
    protocol: dict | None = None
    params: dict = field(default_factory=dict)
    speed: dict | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    recovered_steps: int = 0


@dataclass
class Work:
    """One visitor's work."""

    key: str
    analysis: dict | None = None
    analysis_key: tuple | None = None
    builds: dict[str, Build] = field(default_factory=dict)
    base_ppl: dict[str, tuple[float, dict]] = field(default_factory=dict)  # "ref|data" -> (ppl, protocol)
    base_speed: dict[str, float] = field(default_factory=dict)  # model ref -> generated tokens/s
    stop: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    _tmp: Path | None = None

    def tmp_dir(self) -> Path:
        """A private folder for this visitor's downloads (removed with the session)."""
        if self._tmp is None or not self._tmp.exists():
            self._tmp = Path(tempfile.mkdtemp(prefix="flexigpt-app-"))
        return self._tmp

    def close(self) -> None:
        self.stop.set()
        self.builds.clear()
        self.analysis = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


REGISTRY = ModelRegistry()
_SESSIONS: dict[str, Work] = {}
_LOCK = threading.Lock()


def work(key: str) -> Work:
    """The visitor's Work (created on first use); also sweeps idle sessions."""
    now = time.monotonic()
    with _LOCK:
        w = _SESSIONS.get(key)
        if w is None:
            w = _SESSIONS[key] = Work(key=key)
        w.last_used = now
        stale = [k for k, v in _SESSIONS.items() if k != key and now - v.last_used > IDLE_SECONDS]
        if len(_SESSIONS) - len(stale) > MAX_SESSIONS:
            by_age = sorted((v.last_used, k) for k, v in _SESSIONS.items() if k != key and k not in stale)
            stale += [k for _, k in by_age[: len(_SESSIONS) - len(stale) - MAX_SESSIONS]]
        for k in stale:
            log.info("freeing idle session %s", k)
            _SESSIONS.pop(k).close()
    return w


def drop(key: str) -> None:
    """Free a visitor's work (``demo.unload``)."""
    with _LOCK:
        w = _SESSIONS.pop(key, None)
    if w is not None:
        w.close()


def active_sessions() -> list[str]:
    with _LOCK:
        return list(_SESSIONS)
