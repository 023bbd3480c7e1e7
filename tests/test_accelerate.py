"""Data-parallel recovery: two CPU processes (gloo) under ``accelerate launch``."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexigpt.accelerate_recover import attach_lora, trainable_digest
from flexigpt.data import token_windows
from flexigpt.recover import RecoverSpec, load_trainable, recover, trainable_state

ROOT = Path(__file__).resolve().parent.parent


def _accelerate() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.is_file() else shutil.which("accelerate") or ""


@pytest.mark.slow
def test_two_process_recovery_matches_one_process(tiny_model, tiny_tokenizer, tiny_text_file, tmp_path):
    if not _accelerate():
        pytest.skip("the accelerate launcher is not installed")
    folder, out = tmp_path / "model", tmp_path / "out"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flexigpt.accelerate_recover",
           "--model", str(folder), "--data", str(tiny_text_file), "--train-data", str(tiny_text_file),
           "--out", str(out), "--steps", "4",
           "--seq-len", "16", "--batch-size", "2", "--lr", "0.01", "--warmup", "0", "--lora-rank", "4",
           "--lora-targets", "q_proj,v_proj", "--lora-blocks", "2,3", "--checkpoint-every", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "recover.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["mixed_precision"] == "no"
    assert len(summary["rank_digests"]) == 2 and summary["ranks_identical"]
    logs = [json.loads(line) for line in (out / "recover-log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs] == [1, 2, 3, 4] and logs[-1]["tokens_seen"] == 4 * 2 * 2 * 16
    assert torch.load(out / "checkpoint" / "recover-checkpoint.pt", weights_only=True)["world_size"] == 2

    # The result loads into a model built the same way, and holds what every rank held.
    fresh = attach_lora(copy.deepcopy(tiny_model), 4, ["q_proj", "v_proj"], [2, 3])
    load_trainable(fresh, out / "trainable.safetensors")
    assert trainable_digest(fresh) == summary["rank_digests"][0]

    # Two processes x batch 2 (gradients all-reduced) equal one process x batch 4 on the same windows.
    single = attach_lora(copy.deepcopy(tiny_model), 4, ["q_proj", "v_proj"], [2, 3])
    windows = token_windows(tiny_tokenizer, str(tiny_text_file), seq_len=16, split="train")
    spec = RecoverSpec(steps=4, lr=0.01, batch_size=4, seq_len=16, warmup=0)
    one = list(recover(single, windows, spec))
    assert one[-1].loss == pytest.approx(logs[-1]["loss"], rel=1e-4)
    for name, t in trainable_state(single).items():
        torch.testing.assert_close(trainable_state(fresh)[name], t, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_cluster_recipe_build_under_accelerate_launch(tiny_model, tiny_tokenizer, tiny_text_file, tmp_path):
    """The README recipe: `accelerate launch -m flexigpt build --plan plan.json --steps N`, 2 processes.

    Two processes x batch 1 equal one process x batch 2, and the export loads.
    """
    if not _accelerate():
        pytest.skip("the accelerate launcher is not installed")
    from flexigpt.cli import main
    from flexigpt.models import load_model
    from flexigpt.plan import Plan

    base = tmp_path / "base"
    tiny_model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    (tmp_path / "plan.json").write_text(Plan(str(base), 6, (0, 1, 1, 3, 3, 5)).to_json())
    common = ["build", "--plan", str(tmp_path / "plan.json"), "--steps", "3", "--data", str(tiny_text_file),
              "--seq-len", "16", "--eval-windows", "2", "--lr", "0.01", "--warmup", "0", "--checkpoint-every", "0",
              "--json"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flexigpt",
           *common, "--batch-size", "1", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only the main process reports
    two = json.loads(lines[0])
    assert two["recovery"]["processes"] == 2
    assert main(common + ["--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    reloaded = load_model(two["export"])
    single = load_model(str(tmp_path / "one"))
    ids = torch.randint(4, 128, (1, 12))
    torch.testing.assert_close(reloaded.model(ids).logits, single.model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_accelerate_entry_follows_the_build_recipe(tiny_model, tiny_tokenizer, tiny_text_file, tmp_path):
    """Without --train-data, a chat model recovers on `build`'s default data (mixed chat + text);
    the chat flags are read as in `build`, and a bad share is refused before anything is written."""
    from flexigpt.pipeline import CHAT_LOSS, CHAT_SHARE, RATE_FIELDS, default_rates

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", FLEXIGPT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def entry(out: Path, *flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "flexigpt.accelerate_recover", "--model", str(folder), "--data",
               str(tiny_text_file), "--out", str(out), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
               "--warmup", "0", "--lora-rank", "2", "--checkpoint-every", "0", *flags]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)

    proc = entry(tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "recover.json").read_text())
    assert (summary["train_data"], summary["chat_share"], summary["chat_loss"]) == ("mixed", CHAT_SHARE, CHAT_LOSS)
    assert summary["spec"]["objective"] == "lm"
    assert {k: summary["spec"][k] for k in RATE_FIELDS} == default_rates(True)  # the chat recipe's rates

    proc = entry(tmp_path / "b", "--train-data", "chat", "--chat-loss", "replies")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "recover.json").read_text())
    assert (summary["train_data"], summary["chat_loss"]) == ("chat", "replies") and "chat_share" not in summary

    proc = entry(tmp_path / "c", "--chat-share", "1.5")
    assert proc.returncode == 2 and "--chat-share" in proc.stderr and "1.5" in proc.stderr
    assert not (tmp_path / "c").exists()
