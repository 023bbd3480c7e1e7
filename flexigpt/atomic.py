"""What does an interrupted write leave? Folders written so that a killed process leaves the old
one or the new one, never a mix; and export names that cannot leave their folder.

``atomic_dir`` fills a temporary folder next to the target and then puts it in place in one step:
a rename when the target is absent, an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``)
when it exists. ``atomic_file`` / ``write_text`` do the same for one file (``os.replace``): the
one way this project writes plans, analysis caches, checkpoints and trainable tensors.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "export_path", "write_text"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step, on
    any error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def export_path(root: str | os.PathLike, name: str) -> Path:
    """``root / name`` for an export (or download) *name*, never a path that leaves ``root``.

    Raises:
        ValueError: an empty name, a name with a path separator, ``..``, a leading dot, control
            characters, or more than 200 characters.
    """
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"export name must be 1 to 200 characters, got {name!r:.80}")
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise ValueError(f"export name {name!r} must be a plain file name (no '/', '\\', '..', leading dot or "
                         "control characters)")
    root = Path(root).expanduser()
    path = root / name
    if path.resolve().parent != root.resolve():
        raise ValueError(f"export name {name!r} resolves outside {str(root)!r}")
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    Written here because ``os`` has no portable atomic swap: with two renames a process killed
    between them would leave the target missing.
    """
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        # ctypes: only this path needs it
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_leftovers(path: Path) -> None:
    """Remove temporary folders of writers that were killed, and put back a previous export that a
    killed two-rename swap left aside (only where no atomic swap exists)."""
    for kind in ("tmp", "old"):
        for left in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = left.name.rsplit("-", 2)[-2] if left.name.count("-") >= 2 else ""
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not path.exists():  # an .old folder is always a whole previous export
                os.rename(left, path)
            else:
                shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one step.

    A process killed at any point leaves ``path`` as it was (absent or the previous complete
    export) or the new complete export, never a mix: the new folder is filled under a temporary
    name, and an existing ``path`` is swapped with it atomically (``renameat2`` exchange).
    Temporary folders of killed writers are removed by the next write to the same target.
    """
    path = Path(path).expanduser()
    if path.parent.exists():
        _sweep_leftovers(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"export target {str(path)!r} is a file; expected a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"export folder {str(path)!r} exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            os.rename(tmp, path)
        elif not _exchange(tmp, path):  # tmp now holds the previous export, removed below
            old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
