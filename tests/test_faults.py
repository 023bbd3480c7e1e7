"""Nothing lost: exports and recoveries killed with SIGKILL at random moments (fixed seed).

* Export: a worker rewrites a compact export in a loop (two different models, alternately) and is
  killed at a random delay. The folder must then be absent (when there was none) or a *complete*
  export of one of the two models that loads and gives that model's logits; leftovers of the
  killed writer are swept by the next write.
* Recovery: a worker runs a 60-step recovery with a checkpoint every step and is killed at a
  random delay. Resuming from the checkpoint left behind must start right after the checkpoint's
  step and end with the same trainable tensors as an uninterrupted run.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_worker  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(fault_worker.__file__)
SEED = 20250114
TRIALS = 3
REPORT: dict[str, int] = {"kills": 0, "states verified": 0}


def _start(mode: str, target: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(WORKER), mode, str(target)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"worker did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def _kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL after ``delay`` s; False when the worker had already finished."""
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
        REPORT["kills"] += 1
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    return alive


@pytest.fixture(scope="module")
def references():
    """Logits of models A and B on a fixed batch: what a complete export must reproduce."""
    threads = torch.get_num_threads()
    ids = torch.arange(4, 20).view(2, 8)
    out = {}
    for which in ("A", "B"):
        model, plan = fault_worker.built(which)
        with torch.no_grad():
            out[which] = (plan, model(ids).logits)
    torch.set_num_threads(threads)
    return ids, out


def _which(folder: Path, references) -> str:
    """Load a complete export and say which model it is (fails on a partial or mixed folder)."""
    from flexigpt.export import load_compact

    ids, refs = references
    loaded = load_compact(folder)
    with torch.no_grad():
        logits = loaded.model(ids).logits
    plan = loaded.extra.get("plan") if isinstance(loaded.extra, dict) else None
    for which, (ref_plan, ref_logits) in refs.items():
        if torch.allclose(logits, ref_logits, atol=1e-5) and (plan is None or plan == ref_plan):
            return which
    raise AssertionError(f"{folder} loads but matches neither model")


@pytest.mark.parametrize("start_with", ["nothing", "previous export"])
def test_killed_export_leaves_the_previous_export_or_nothing(tmp_path, references, start_with):
    from flexigpt.export import save_compact

    rng = random.Random(f"{SEED}-{start_with}")
    target = tmp_path / "export"
    for trial in range(TRIALS if start_with == "previous export" else 2):
        if start_with == "previous export":
            model, plan = fault_worker.built("A")
            save_compact(model, plan, None, target, overwrite=True)
            assert _which(target, references) == "A"
        elif target.exists():
            import shutil

            shutil.rmtree(target)
        proc = _start("export", target)
        # the first writes land within ~0.1 s; "nothing" trials also kill before the first one
        delay = rng.uniform(0.0, 0.3) if start_with == "nothing" else rng.uniform(0.05, 1.5)
        _kill_after(proc, delay)
        if target.exists():
            assert _which(target, references) in ("A", "B")  # complete, never a mix
        else:
            assert start_with == "nothing", "a killed overwrite lost the previous export"
        REPORT["states verified"] += 1
        left = [p.name for p in tmp_path.iterdir() if p.name != "export"]
        # the next write sweeps what the killed writer left (its pid is gone)
        model, plan = fault_worker.built("B")
        save_compact(model, plan, None, target, overwrite=True)
        assert _which(target, references) == "B"
        assert [p.name for p in tmp_path.iterdir()] == ["export"], f"leftovers not swept: {left}"
    print(f"\nexport kills ({start_with}): {REPORT}")


def test_killed_recovery_resumes_to_the_uninterrupted_result(tmp_path):
    from flexigpt.recover import recover
    from flexigpt.recover_state import CHECKPOINT_NAME, trainable_state

    threads = torch.get_num_threads()
    try:
        model, ids, spec = fault_worker.recover_setup()
        list(recover(model, ids, spec))
        expected = {n: t.clone() for n, t in trainable_state(model).items()}
        rng = random.Random(SEED)
        resumed_from = []
        for trial in range(TRIALS):
            ckpt = tmp_path / f"run{trial}"
            proc = _start("recover", ckpt)
            killed = _kill_after(proc, rng.uniform(0.02, 0.6))
            path = ckpt / CHECKPOINT_NAME
            step = torch.load(path, map_location="cpu", weights_only=True)["step"] if path.is_file() else 0
            assert 0 <= step <= spec.steps
            assert not [p for p in ckpt.glob("*") if p.name != CHECKPOINT_NAME and not p.name.startswith(".")]
            model, ids, spec = fault_worker.recover_setup()
            logs = list(recover(model, ids, spec, checkpoint_dir=ckpt, resume=True))
            if step < spec.steps:
                assert logs[0].step == step + 1, f"resumed at {logs[0].step}, the checkpoint says {step}"
            assert [log.step for log in logs] == list(range(step + 1, spec.steps + 1))
            got = trainable_state(model)
            assert set(got) == set(expected)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
            resumed_from.append((killed, step))
            REPORT["states verified"] += 1
    finally:
        torch.set_num_threads(threads)
    print(f"\nrecovery kills: resumed from steps {resumed_from} of {spec.steps}; {REPORT}")
    assert any(killed and 0 < step < spec.steps for killed, step in resumed_from), resumed_from
