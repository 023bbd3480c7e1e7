"""Where the app keeps models and per-visitor work.

* Base models are loaded once per model reference and shared, read-only, by every visitor
  (surgery never modifies them: ``flexigpt.surgery.apply_plan`` returns a new model whose
  slots share the base Parameters). In public mode only allow-listed references load
  (``app.limits.check_model_ref``); URLs never do.
* Everything a visitor makes (the last analysis, built models, recovery runs, exports) lives in a
  :class:`Work` keyed by Gradio's ``session_hash``; handlers only ever look up the caller's own
  key, so one visitor cannot name, stop or download another's work. Downloads go to a private
  folder per visitor with an unguessable name. Work is freed by ``demo.unload``, by an idle
  sweep (a background thread as well as every request) and beyond ``max_sessions`` visitors.
* Built models are admitted against the limits (count and owned MB per visitor and in total,
  and the server's resident memory): :func:`admit_build` refuses with the numbers.

``gr.State`` holds only the Plan and small keys; models never go through it (it deep-copies).
"""
from __future__ import annotations

import gc
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import limits

log = logging.getLogger(__name__)

SWEEP_SECONDS = 60  # how often the background sweep looks for idle visitors
MB = 1024 * 1024


class ModelRegistry:
    """Base models by reference, loaded on first use and never mutated."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self._info: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get(self, ref: str):
        """The ``flexigpt.models.LoadedModel`` for ``ref`` (loads it once; ValueError for a bad or
        not-allowed ref)."""
        ref = limits.check_model_ref(ref)
        with self._lock:
            if ref not in self._models:
                from flexigpt.models import load_model

                self._models[ref] = load_model(ref)
            return self._models[ref]

    def loaded(self, ref: str) -> bool:
        return ((ref or "").strip() or "default") in self._models

    def info(self, ref: str) -> dict:
        """``flexigpt.models.model_info`` of the base model, memoised."""
        ref = limits.check_model_ref(ref)
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
    fit: dict | None = None  # the last slot-fit report (flexigpt.slot_fit.SlotFitReport.to_dict())
    fidelity: dict | None = None  # the last chat-fidelity check (FidelityReport.to_dict(rows=False))
    own_bytes: int = 0  # bytes of tensors this build holds beyond the shared base weights


@dataclass
class Work:
    """One visitor's work."""

    key: str
    analysis: dict | None = None
    analysis_key: tuple | None = None
    builds: dict[str, Build] = field(default_factory=dict)
    base_ppl: dict[str, tuple[float, dict]] = field(default_factory=dict)  # "ref|data" -> (ppl, protocol)
    base_speed: dict[str, dict] = field(default_factory=dict)  # model ref -> {tokens_per_s, forward_s, ...}
    base_fidelity: dict[str, Any] = field(default_factory=dict)  # model ref -> the original's FidelityReport
    stop: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    _tmp: Path | None = None

    def tmp_dir(self) -> Path:
        """This visitor's private folder for downloads (mode 0700, a 128-bit random name, removed
        with the session). Nothing the app writes for a visitor goes anywhere else."""
        if self._tmp is None or not self._tmp.exists():
            self._tmp = Path(tempfile.mkdtemp(prefix=f"flexigpt-app-{secrets.token_hex(16)}-"))
        return self._tmp

    def file_path(self, name: str) -> Path:
        """``tmp_dir() / name`` for a plain file name; a name with a path separator or ``..`` is refused."""
        from flexigpt.export import export_path

        return export_path(self.tmp_dir(), name)

    def held_bytes(self) -> int:
        return sum(b.own_bytes for b in self.builds.values())

    def close(self) -> None:
        self.stop.set()
        self.builds.clear()
        self.analysis = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


REGISTRY = ModelRegistry()
_SESSIONS: dict[str, Work] = {}
_LOCK = threading.Lock()


_SWEEPER: threading.Thread | None = None


def _stale(now: float, keep: str | None) -> list[Work]:
    """Pop the sessions idle beyond ``idle_seconds`` and the least recently used beyond ``max_sessions``."""
    lim = limits.current()
    stale = [k for k, v in _SESSIONS.items() if k != keep and now - v.last_used > lim.idle_seconds]
    if len(_SESSIONS) - len(stale) > lim.max_sessions:
        by_age = sorted((v.last_used, k) for k, v in _SESSIONS.items() if k != keep and k not in stale)
        stale += [k for _, k in by_age[: len(_SESSIONS) - len(stale) - lim.max_sessions]]
    return [_SESSIONS.pop(k) for k in stale]


def _free(works: list[Work]) -> None:
    for w in works:
        log.info("freeing session %s (%d builds, %.1f MB)", w.key[:6], len(w.builds), w.held_bytes() / MB)
        w.close()
    if works:
        gc.collect()


def sweep() -> int:
    """Free idle sessions now; returns how many were freed."""
    with _LOCK:
        gone = _stale(time.monotonic(), None)
    _free(gone)
    return len(gone)


def _sweep_forever() -> None:
    while True:
        time.sleep(SWEEP_SECONDS)
        try:
            sweep()
        except Exception:  # a failed sweep must never kill the thread
            log.exception("idle sweep failed")


def start_sweeper() -> None:
    """Start the background idle sweep once (``build_demo`` calls it)."""
    global _SWEEPER
    with _LOCK:
        if _SWEEPER is None or not _SWEEPER.is_alive():
            _SWEEPER = threading.Thread(target=_sweep_forever, name="flexigpt-idle-sweep", daemon=True)
            _SWEEPER.start()


def work(key: str) -> Work:
    """The visitor's Work (created on first use); also sweeps idle sessions."""
    now = time.monotonic()
    with _LOCK:
        w = _SESSIONS.get(key)
        if w is None:
            w = _SESSIONS[key] = Work(key=key)
        w.last_used = now
        gone = _stale(now, key)
    _free(gone)
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


# ---- resources ------------------------------------------------------------------------------------
def own_bytes(model: Any, base: Any) -> int:
    """Bytes of the tensors of ``model`` that are not the base model's (shared tensors count once)."""
    shared = {t.data_ptr() for t in (*base.parameters(), *base.buffers())}
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        ptr = t.data_ptr()
        if ptr in shared or ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def rss_mb() -> float:
    """Resident memory of this server process and its children, in MB."""
    import psutil

    proc = psutil.Process(os.getpid())
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / MB


def check_server_memory(lim: limits.Limits | None = None) -> None:
    """Refuse a new heavy job while the server's resident memory is above the cap."""
    lim = lim or limits.current()
    if lim.rss_mb is None:
        return
    used = rss_mb()
    if used > lim.rss_mb:
        gc.collect()
        used = rss_mb()
    if used > lim.rss_mb:
        raise ValueError(f"the server is busy: it uses {used:,.0f} MB of its {lim.rss_mb:,} MB memory limit; "
                         "try again in a few minutes")


def build_usage() -> tuple[int, int]:
    """``(builds held, bytes they own)`` over every visitor."""
    with _LOCK:
        works = list(_SESSIONS.values())
    return sum(len(w.builds) for w in works), sum(w.held_bytes() for w in works)


def admit_build(key: str, names: list[str], adding_bytes: int = 0) -> None:
    """Check that visitor ``key`` may hold builds ``names`` (replacing builds of the same name) plus
    ``adding_bytes``; ValueError ("limit reached ...") with the numbers otherwise."""
    lim = limits.current()
    w = work(key)
    replaced = [n for n in names if n in w.builds]
    mine = len(w.builds) - len(replaced) + len(names)
    if lim.builds_per_visitor is not None and mine > lim.builds_per_visitor:
        raise ValueError(f"limit reached: you would hold {mine} built models, the limit is {lim.builds_per_visitor} "
                         f"per visitor; current builds: {sorted(w.builds)}")
    count, held = build_usage()
    freed = sum(w.builds[n].own_bytes for n in replaced)
    total = count - len(replaced) + len(names)
    if lim.builds_total is not None and total > lim.builds_total:
        raise ValueError(f"the server is busy: all visitors together would hold {total} built models, the limit is "
                         f"{lim.builds_total}; try again in a few minutes")
    limits.check_memory((w.held_bytes() - freed) / MB, adding_bytes / MB, lim.build_mb_per_visitor, "your built models")
    limits.check_memory((held - freed) / MB, adding_bytes / MB, lim.build_mb_total, "the built models of all visitors")
    check_server_memory(lim)
