"""Start the app in a subprocess on a free loopback port, for the browser and load tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(log_path: Path, extra_env: dict[str, str] | None = None, timeout_s: float = 90) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """Yield ``(url, process, start_time)`` of ``python app.py`` serving on 127.0.0.1.

    The app gets a fresh analysis cache (so cold-cache timings are real) that links the already
    converted embedded model (converting it again costs about 15 s; the link is never written
    through). The process group is always killed at the end and the cache removed.
    """
    real_cache = Path(os.environ.get("FLEXIGPT_CACHE") or Path.home() / ".cache" / "flexigpt").expanduser()
    cache = Path(tempfile.mkdtemp(prefix="flexigpt-app-cache-"))
    if (real_cache / "models").is_dir():
        (cache / "models").symlink_to(real_cache / "models", target_is_directory=True)
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "FLEXIGPT_CACHE": str(cache), **(extra_env or {})}
    env.pop("SPACE_ID", None)
    log = open(log_path, "w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode}: {Path(log_path).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not answer on {url} within {timeout_s} s: "
                                   f"{Path(log_path).read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, proc, start
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()
        if (cache / "models").is_symlink():
            (cache / "models").unlink()  # the link only, never the linked models
        shutil.rmtree(cache, ignore_errors=True)
