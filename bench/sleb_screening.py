"""How far can SLEB's search be cut without changing what it removes? Screening replayed on exact rounds.

Runs exact iterative selection (SLEB) on the embedded model (or --model) and records, in every
round, every remaining block's NLL on each calibration window. It then replays the screened
search of ``flexigpt.selection`` (try every block on the first w windows, finish the K best on
all of them) on those numbers for several (w, K) and prints, per setting, the modelled speed-up
(cost = blocks run after the candidate + the LM head, about 8 blocks on SmolLM2, per window)
and whether it removes the same blocks in the same order. A replay is only valid up to its
first disagreement with the exact order, so a setting that disagrees is reported as such.
Finally it times ``iterative_selection`` with its defaults against the exact order.

    python bench/sleb_screening.py --json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flexigpt.arch import get_blocks  # noqa: E402
from flexigpt.data import token_windows  # noqa: E402
from flexigpt.models import load_model  # noqa: E402
from flexigpt.selection import SCREEN_WINDOWS, SHORTLIST, _Stack, iterative_selection  # noqa: E402

HEAD_BLOCKS = 8  # the LM head's cost in blocks on SmolLM2-135M (49k x 576 against 3.5 M per block)


@torch.no_grad()
def exact_rounds(model, ids: torch.Tensor, n_remove: int) -> list[dict]:
    """Every round of exact SLEB: the alive blocks and each one's per-window NLL when removed.

    Uses the selection module's cached stack (one window per batch) so that a candidate's NLL on
    one window can be read on its own."""
    stack = _Stack(model, ids, 1, ())
    rounds = []
    for _ in range(n_remove):
        n = len(stack.alive)
        nll = [[stack.nll_without(k, range(w, w + 1)) for w in range(ids.shape[0])] for k in range(n)]
        rounds.append({"alive": list(stack.alive), "nll": nll})
        stack.remove(min(range(n), key=lambda k: (sum(nll[k]), k)))
    return rounds


def replay(rounds: list[dict], screen: int, shortlist: int) -> dict:
    windows = len(rounds[0]["nll"][0])
    picks, cost, exact_cost = [], 0.0, 0.0
    for r in rounds:
        n, nll = len(r["alive"]), r["nll"]
        per = [(n - k - 1 + HEAD_BLOCKS) / windows for k in range(n)]
        exact_cost += sum(p * windows for p in per)
        first = [sum(v[:screen]) for v in nll]
        cost += sum(p * screen for p in per)
        short = sorted(range(n), key=lambda k: (first[k], k))[:shortlist]
        cost += sum(per[k] * (windows - screen) for k in short)
        pick = min(short, key=lambda k: (sum(nll[k]), k))
        picks.append(r["alive"][pick])
        if pick != min(range(n), key=lambda k: (sum(nll[k]), k)):
            break  # later rounds of the exact run no longer describe this search
    exact = [r["alive"][min(range(len(r["alive"])), key=lambda k: (sum(r["nll"][k]), k))] for r in rounds]
    same = picks == exact
    return {"screen_windows": screen, "shortlist": shortlist, "speedup": round(exact_cost / cost, 2) if same else None,
            "same_order": same, "first_difference": None if same else {"round": len(picks), "picked": picks[-1],
                                                                          "exact": exact[len(picks) - 1]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--settings", default="1:3,1:6,2:3,2:6,4:3", help="comma-separated W:K screening settings")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    n = int(round(args.ratio * len(get_blocks(model))))
    windows = token_windows(loaded.tokenizer, args.data, seq_len=args.seq_len, split="train", max_windows=args.windows)
    t = time.perf_counter()
    rounds = exact_rounds(model, windows.input_ids, n)
    record_s = time.perf_counter() - t
    exact = [r["alive"][min(range(len(r["alive"])), key=lambda k: (sum(r["nll"][k]), k))] for r in rounds]
    print(f"exact SLEB order: {exact} (recorded per window in {record_s:.0f} s)")
    rows = []
    for part in args.settings.split(","):
        w, _, k = part.partition(":")
        row = replay(rounds, int(w), int(k))
        rows.append(row)
        print(f"  screen {row['screen_windows']} window(s), shortlist {row['shortlist']}: "
              + (f"same order, modelled speed-up {row['speedup']:.2f} x" if row["same_order"]
                 else f"differs in round {row['first_difference']['round']}: {row['first_difference']['picked']} "
                      f"instead of {row['first_difference']['exact']}"), flush=True)
    t = time.perf_counter()
    timed = iterative_selection(model, windows, n, cache=False)
    seconds = time.perf_counter() - t
    print(f"iterative_selection defaults (screen {SCREEN_WINDOWS}, shortlist {SHORTLIST}): {seconds:.1f} s, order "
          f"{list(timed.order)} ({'same as' if list(timed.order) == exact else 'differs from'} exact), "
          f"{torch.get_num_threads()} threads")
    if args.json:
        print(json.dumps({"exact_order": exact, "replays": rows, "default_seconds": round(seconds, 1),
                          "default_order": list(timed.order), "threads": torch.get_num_threads(),
                          "protocol": windows.protocol()}))


if __name__ == "__main__":
    main()
