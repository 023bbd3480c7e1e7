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
           "--model", str(folder), "--data", str(tiny_text_file), "--out", str(out), "--steps", "4",
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
