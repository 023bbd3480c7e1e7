"""Small shared pieces of the app: the heavy-job concurrency group, error handling, asset paths."""
from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any

import gradio as gr

log = logging.getLogger(__name__)

GPU = "gpu"  # concurrency id of every heavy listener: they share one limit (app.limits heavy_jobs)
ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
CSS_PATH = ASSETS / "style.css"
PLANS_DIR = ASSETS / "plans"


def heavy() -> dict:
    """Event-listener arguments of every heavy handler: one shared concurrency group whose size is
    ``app.limits`` ``heavy_jobs``; others wait in Gradio's queue, which shows their position."""
    from app import limits

    return {"concurrency_id": GPU, "concurrency_limit": limits.current().heavy_jobs}


def session_key(request: Any) -> str:
    """The visitor's key: Gradio's ``session_hash``, or ``local`` when a handler is called directly."""
    return str(getattr(request, "session_hash", None) or "local")


def user_errors(fn):
    """Turn ``ValueError`` (bad user input, raised by the library with a clear message) into ``gr.Error``.

    Works for plain functions and for generator handlers. Other exceptions are real bugs:
    they are logged and shown as a short error, never as a traceback in the page.
    """
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise _as_user_error(fn, err) from err

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise _as_user_error(fn, err) from err

    return wrapper


def _as_user_error(fn, err: Exception) -> gr.Error:
    """The message a visitor sees for an exception from handler ``fn`` (never a traceback)."""
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, ValueError):
        return gr.Error(str(err))
    if isinstance(err, MemoryError):
        return gr.Error("the server ran out of memory for this request; try a smaller setting or try again later")
    log.exception("handler %s failed", fn.__name__)
    return gr.Error(f"{type(err).__name__}: {str(err)[:300]}")


def fmt_params(n: int | float | None) -> str:
    """``134515008`` -> ``134.5 M``."""
    if n is None:
        return "n/a"
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)}"
