"""The CLI contract: subcommand names, --json as the last stdout line, exit 2 on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexigpt.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_the_parser_offers_exactly_the_documented_commands():
    import argparse
    import re

    from flexigpt.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cli = readme[readme.index("## CLI"):readme.index("## Benchmarks")]
    documented = [m for m in re.findall(r"^### `(\w+)`", cli, flags=re.M) if m != "accelerate"]
    assert list(sub.choices) == documented and set(COMMANDS) == set(documented)


def test_info_json_on_tiny_folder(tiny_model, tiny_tokenizer, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("architecture", "num_blocks", "hidden_size", "num_parameters", "tied_embeddings", "chat_template"):
        assert key in out
    assert out["num_blocks"] == 6 and out["architecture"] == "LlamaForCausalLM"


def test_bad_model_exit_2_without_traceback(capsys):
    assert main(["info", "--model", "./missing-model-folder", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model folder './missing-model-folder' does not exist")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_for_every_command():
    for name in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "flexigpt", name, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and "--json" in proc.stdout


@pytest.mark.slow
def test_info_default_subprocess_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "flexigpt", "info", "--model", "default", "--json"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["num_blocks"] == 30 and out["num_parameters"] == 134_515_008


@pytest.mark.parametrize("share", ["0", "1.5", "-0.2"])
def test_build_refuses_a_chat_share_outside_0_1_before_loading(share, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"format_version": 1, "base_model": "./not-loaded", "num_blocks": 2, "method": "drop", '
                    '"layer_map": [0], "adapter": {"rank": 1}}')
    assert main(["build", "--plan", str(plan), "--out", str(tmp_path / "m"), "--steps", "1",
                 "--train-data", "mixed", "--chat-share", share, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --chat-share must be between 0 and 1 (exclusive), got {float(share)}")
    assert not (tmp_path / "m").exists()


def test_build_on_chat_data_learns_the_replies_only_when_asked(tiny_folder, tmp_path, capsys, monkeypatch):
    from flexigpt.plan import Plan

    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))
    plan = tmp_path / "plan.json"
    plan.write_text(Plan.identity(tiny_folder, 6, method="drop").drop(2).with_kept_lora(2).to_json())
    common = ["build", "--plan", str(plan), "--steps", "1", "--seq-len", "16", "--batch-size", "2",
              "--eval-windows", "1", "--train-data", "chat", "--checkpoint-every", "0", "--json"]
    results = {}
    for loss in ("replies", "all"):
        assert main([*common, "--out", str(tmp_path / loss), "--chat-loss", loss]) == 0
        results[loss] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recovery"]
        assert results[loss]["chat_loss"] == loss
    assert results["replies"]["final_loss"] != results["all"]["final_loss"]
    with pytest.raises(SystemExit) as bad:
        main([*common, "--out", str(tmp_path / "x"), "--chat-loss", "prompts"])
    assert bad.value.code == 2 and "invalid choice: 'prompts'" in capsys.readouterr().err


def test_build_recovers_a_model_without_chat_template_with_the_text_recipe(_tiny_llama_base, tiny_tokenizer,
                                                                          tiny_text_file, tmp_path, capsys):
    """No --objective and no --train-data on a model without a chat template: `build` recovers on
    --data with the text recipe (next-token loss plus distillation from the original)."""
    import copy

    from flexigpt.pipeline import RATE_FIELDS, TEXT_RATES, TEXT_RECIPE, default_rates
    from flexigpt.plan import Plan

    folder = tmp_path / "plain"
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    _tiny_llama_base.save_pretrained(folder)
    plain.save_pretrained(folder)
    plan = tmp_path / "plan.json"
    plan.write_text(Plan.identity(str(folder), 6, method="drop").drop(2).with_kept_lora(2).to_json())
    assert main(["build", "--plan", str(plan), "--out", str(tmp_path / "m"), "--steps", "1", "--seq-len", "16",
                 "--batch-size", "2", "--eval-windows", "1", "--data", str(tiny_text_file), "--checkpoint-every", "0",
                 "--json"]) == 0
    recovery = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recovery"]
    assert (recovery["objective"], recovery["train_data"]) == (TEXT_RECIPE[0], str(tiny_text_file))
    assert recovery["final_loss"] is not None and recovery["final_loss"] > 0
    # and the text recipe's rates (a chat model keeps RecoverSpec's), unless a flag names one
    assert {k: recovery[k] for k in RATE_FIELDS} == default_rates(False) != default_rates(True)
    assert (recovery["lr"], recovery["gate_lr_scale"]) == (TEXT_RATES["lr"], TEXT_RATES["gate_lr_scale"])
    assert main(["build", "--plan", str(plan), "--out", str(tmp_path / "m2"), "--steps", "1", "--seq-len", "16",
                 "--batch-size", "2", "--eval-windows", "1", "--data", str(tiny_text_file), "--checkpoint-every", "0",
                 "--lr", "3e-4", "--kd-weight", "0.75", "--json"]) == 0
    recovery = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recovery"]
    assert (recovery["lr"], recovery["kd_weight"], recovery["gate_lr_scale"]) == (3e-4, 0.75, TEXT_RATES["gate_lr_scale"])


def test_build_fits_the_slots_of_a_model_without_chat_template_by_default(_tiny_llama_base, tiny_tokenizer,
                                                                          tiny_text_file, tmp_path, capsys):
    """No --fit-steps: a FlexiGPT plan of a model without a chat template gets the measured default
    of block-local fitting (TEXT_FIT_STEPS per slot); --fit-steps 0 turns it off; a chat model fits none."""
    import copy

    from flexigpt.pipeline import TEXT_FIT_STEPS, default_fit_steps
    from flexigpt.plan import Plan

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    folders = {}
    for name, tok in (("plain", plain), ("chat", tiny_tokenizer)):
        folders[name] = tmp_path / name
        _tiny_llama_base.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])

    def fit_of(folder, *extra):
        plan = tmp_path / f"{folder.name}.json"
        plan.write_text(Plan(str(folder), 6, (0, 1, 1, 3, 3, 5)).to_json())
        assert main(["build", "--plan", str(plan), "--out", str(tmp_path / f"m{len(extra)}{folder.name}"),
                     "--seq-len", "16", "--eval-windows", "1", "--data", str(tiny_text_file), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fit"]

    assert fit_of(folders["plain"])["fit_steps"] == TEXT_FIT_STEPS
    assert "fit_steps" not in fit_of(folders["plain"], "--fit-steps", "0")  # whitened init only
    assert "fit_steps" not in fit_of(folders["chat"])
    flexi = Plan("tiny", 6, (0, 1, 1, 3, 3, 5))
    assert default_fit_steps(flexi, False) == TEXT_FIT_STEPS and default_fit_steps(flexi, True) == 0
    assert default_fit_steps(flexi.with_method("drop"), False) == 0
    assert default_fit_steps(Plan.identity("tiny", 6), False) == 0  # nothing to fit
