"""A worker the fault test kills: writes compact exports, or runs a recovery with checkpoints.

``python tests/fault_worker.py export TARGET`` rewrites ``TARGET`` with exports of model B, then A,
then B... until killed. ``python tests/fault_worker.py recover DIR`` runs ``RECOVER_SPEC`` with a
checkpoint every step into DIR. Both print ``ready`` once set up, so the test's random delay
falls on the writing itself. The same builders give the test its reference models.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny.py

from flexigpt.plan import AdapterSpec, Plan  # noqa: E402

RECOVER_STEPS = 60


def built(which: str):
    """Model A or B: the same tiny base, two different FlexiGPT plans (different donors and ranks)."""
    from tiny import tiny_llama
    from flexigpt.surgery import apply_plan

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the same arithmetic in every process
    base = tiny_llama()
    lm = (0, 1, 1, 3, 3, 5) if which == "A" else (0, 1, 2, 2, 4, 5)
    plan = Plan("tiny", 6, lm, adapter=AdapterSpec(rank=4 if which == "A" else 2))
    return apply_plan(base, plan), plan


def recover_setup():
    """The model, windows and spec of the recovery run (deterministic)."""
    from flexigpt.recover import RecoverSpec

    model, _ = built("A")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (24, 16), generator=gen)
    spec = RecoverSpec(steps=RECOVER_STEPS, lr=1e-3, batch_size=2, seq_len=16, checkpoint_every=1, seed=3)
    return model, ids, spec


def main(argv: list[str]) -> None:
    mode, target = argv[0], Path(argv[1])
    if mode == "export":
        from flexigpt.export import save_compact

        models = [built("B"), built("A")]
        print("ready", flush=True)
        i = 0
        while True:
            model, plan = models[i % 2]
            save_compact(model, plan, None, target, overwrite=True)
            i += 1
    elif mode == "recover":
        from flexigpt.recover import recover

        model, ids, spec = recover_setup()
        print("ready", flush=True)
        for _ in recover(model, ids, spec, checkpoint_dir=target):
            pass
        print("finished", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
