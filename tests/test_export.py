"""Export: compact round-trip (bit-identical, storage-true size), merged round-trip through plain
AutoModelForCausalLM, peft adapter files, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch

from flexigpt.trainable import attach_kept_lora
from flexigpt.export import load_compact, save_compact, save_merged, save_peft_adapters
from flexigpt.models import load_model
from flexigpt.params import measure_params
from flexigpt.plan import AdapterSpec, Plan, extend_plan
from flexigpt.surgery import apply_plan

IDS = torch.tensor([[5, 9, 17, 33, 2, 64, 100, 7, 8, 9]])


def _perturb(model):
    """Give the trainable parameters non-initial values, as recovery would."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("plan", [
    Plan("t", 6, (0, 1, 1, 3, 1, 5)),
    Plan("t", 6, (0, 2, 5), "drop"),
    extend_plan("t", 6, [2, 3], "sequential"),
], ids=["flexigpt", "drop", "extend"])
def test_compact_round_trip_is_bit_identical_and_storage_true(tiny_model, tiny_tokenizer, tmp_path, plan):
    model = _perturb(apply_plan(tiny_model, plan))
    manifest = save_compact(model, plan, tiny_tokenizer, tmp_path / "c")
    files = {p.name for p in (tmp_path / "c").iterdir()}
    assert {"plan.json", "flexigpt-export.json", "flexigpt-weights.safetensors", "tokenizer.json"} <= files
    stored = measure_params(model).stored
    assert manifest["stored_parameters"] == stored
    size = (tmp_path / "c" / "flexigpt-weights.safetensors").stat().st_size
    header = int.from_bytes((tmp_path / "c" / "flexigpt-weights.safetensors").read_bytes()[:8], "little")
    assert size - 8 - header == 4 * stored  # every stored parameter exactly once, nothing else
    loaded = load_model(str(tmp_path / "c"))  # models.load_model dispatches to load_compact
    assert loaded.source == "compact" and loaded.extra["plan"] == plan
    assert torch.equal(loaded.model(IDS).logits, model(IDS).logits)
    assert loaded.tokenizer("w1 w2")["input_ids"] == tiny_tokenizer("w1 w2")["input_ids"]
    out = loaded.model.generate(IDS[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 7)


def test_compact_opt_and_kept_lora(tiny_opt_model, tiny_model, tmp_path):
    plan = Plan("o", 4, (0, 0, 2, 3))
    model = _perturb(apply_plan(tiny_opt_model, plan))
    save_compact(model, plan, None, tmp_path / "o")
    assert torch.equal(load_compact(tmp_path / "o").model(IDS).logits, model(IDS).logits)
    drop = Plan("t", 6, (0, 2, 5), "drop")
    kept = _perturb(attach_kept_lora(apply_plan(tiny_model, drop), 4))
    save_compact(kept, drop, None, tmp_path / "k")
    assert torch.equal(load_compact(tmp_path / "k").model(IDS).logits, kept(IDS).logits)


@pytest.mark.parametrize("which", ["scale", "drop", "drop+lora", "opt-scale"])
def test_merged_round_trip_through_plain_transformers(tiny_model, tiny_opt_model, tiny_tokenizer, tmp_path, which):
    from transformers import AutoModelForCausalLM

    if which == "drop+lora":
        plan = Plan("t", 6, (0, 2, 5), "drop")
        model = _perturb(attach_kept_lora(apply_plan(tiny_model, plan), 4))
    elif which == "opt-scale":
        plan = Plan("o", 4, (0, 0, 2, 3), adapter=AdapterSpec(out_norm="scale"))
        model = _perturb(apply_plan(tiny_opt_model, plan))
    else:
        plan = Plan("t", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(out_norm="scale"))
        plan = plan.with_method("drop") if which == "drop" else plan
        model = _perturb(apply_plan(tiny_model, plan))
    manifest = save_merged(model, plan, tiny_tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(plain).__module__.startswith("transformers.")
    assert plain.config.num_hidden_layers == plan.num_slots
    torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)
    assert manifest["weights_bytes"] >= 4 * manifest["parameters"] * 0.99
    assert not (tmp_path / "m" / "flexigpt-export.json").exists()  # loads as a plain folder
    assert load_model(str(tmp_path / "m")).source == "folder"


def test_merged_layernorm_is_refused(tiny_model, tmp_path):
    plan = Plan("t", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(out_norm="layernorm"))
    with pytest.raises(ValueError, match="layernorm.*compact|compact.*scale"):
        save_merged(apply_plan(tiny_model, plan), plan, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_peft_adapter_files_load_with_peft(tiny_model, tmp_path):
    from peft import LoraConfig, PeftModel

    drop = Plan("t", 6, (0, 2, 5), "drop")
    model = _perturb(attach_kept_lora(apply_plan(tiny_model, drop), 4))
    info = save_peft_adapters(model, tmp_path / "a")
    assert info["which"] == "kept" and (tmp_path / "a" / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(apply_plan(tiny_model, drop), tmp_path / "a")
    torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, atol=1e-6, rtol=1e-6)
    flexi = Plan("t", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=48))
    save_peft_adapters(apply_plan(tiny_model, flexi), tmp_path / "s")
    cfg = LoraConfig.from_pretrained(str(tmp_path / "s"))
    assert cfg.layers_to_transform == [2, 4] and cfg.r == 48 and cfg.rank_pattern == {"k_proj": 32, "v_proj": 32}


def test_writes_are_atomic(tiny_model, tmp_path, monkeypatch):
    import safetensors.torch

    plan = Plan("t", 6, (0, 1, 1, 3, 3, 5))
    model = apply_plan(tiny_model, plan)
    target = tmp_path / "c"
    save_compact(model, plan, None, target)
    before = json.loads((target / "flexigpt-export.json").read_text())
    with pytest.raises(ValueError, match="not empty"):
        save_compact(model, plan, None, target)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_compact(model, plan, None, target, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save_compact(model, plan, None, tmp_path / "new")
    assert json.loads((target / "flexigpt-export.json").read_text()) == before  # old export intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no half-written or temp folder left


def test_export_rejects_a_different_plan(tiny_model, tmp_path):
    model = apply_plan(tiny_model, Plan("t", 6, (0, 1, 1, 3, 3, 5)))
    with pytest.raises(ValueError, match="differs"):
        save_compact(model, Plan("t", 6, (0, 1, 2, 3, 3, 5)), None, tmp_path / "x")


# ---- CLI: python -m flexigpt build ------------------------------------------------------
def test_cli_build_exports_and_reports(tiny_model, tiny_tokenizer, tiny_text_file, tmp_path, capsys):
    from flexigpt.cli import main

    base = tmp_path / "base"
    tiny_model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    plan = Plan(str(base), 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(out_norm="scale"))
    (tmp_path / "plan.json").write_text(plan.to_json())
    argv = ["build", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"), "--merged",
            "--data", str(tiny_text_file), "--eval-windows", "2", "--seq-len", "16", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stored_parameters"] < result["original_parameters"] < result["run_parameters"]
    assert result["protocol"]["split"] == "heldout" and result["protocol"]["windows"] == 2
    assert result["ppl"] > 1 and result["export"] == str(tmp_path / "out")
    reloaded = load_model(result["export"])
    assert reloaded.model.config.num_hidden_layers == 6 and load_model(result["merged_export"]).source == "folder"
    # plan --json on that base prints the estimate, equal to what build measured
    assert main(["plan", "--from-plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "p2.json"), "--json"]) == 0
    est = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]
    assert est["stored"] == result["stored_parameters"] and est["run"] == result["run_parameters"]


def test_cli_build_errors_exit_2(tmp_path, capsys):
    from flexigpt.cli import main

    (tmp_path / "bad.json").write_text('{"format_version": 1, "base_model": "x", "num_blocks": 4, "layer_map": [0, 1, 3, 2]}')
    assert main(["build", "--plan", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
    assert "donor block 3" in capsys.readouterr().err
    (tmp_path / "bad2.json").write_text('{"format_version": 1, "base_model": "x", "num_blocks": 4, "layer_map": [0, 2, 2, 5]}')
    assert main(["build", "--plan", str(tmp_path / "bad2.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "5" in err and "Traceback" not in err
    good = Plan("x", 4, (0, 1, 2, 3))
    (tmp_path / "good.json").write_text(good.to_json())
    assert main(["build", "--plan", str(tmp_path / "good.json"), "--out", str(tmp_path / "o"), "--steps", "-1"]) == 2
    assert "--steps must be >= 0, got -1" in capsys.readouterr().err
    assert main(["build", "--plan", str(tmp_path / "good.json"), "--out", str(tmp_path / "o"), "--steps", "2",
                 "--lr", "nan"]) == 2
    assert "lr" in capsys.readouterr().err
    assert main(["build", "--plan", str(tmp_path / "good.json"), "--out", str(tmp_path / "o"), "--resume"]) == 2
    assert "--resume needs --steps > 0" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["flexigpt", "drop"])
def test_cli_build_recovers_and_resumes(tiny_model, tiny_tokenizer, tiny_text_file, tmp_path, capsys, method):
    from flexigpt.cli import main
    from flexigpt.params import matched_lora_rank

    base = tmp_path / "base"
    tiny_model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    plan = Plan(str(base), 6, (0, 1, 1, 3, 3, 5))
    if method == "drop":
        plan = plan.with_method("drop")
    (tmp_path / "plan.json").write_text(plan.to_json())
    common = ["build", "--plan", str(tmp_path / "plan.json"), "--data", str(tiny_text_file), "--eval-windows", "2",
              "--seq-len", "16", "--batch-size", "2", "--lr", "0.01", "--checkpoint-every", "2", "--json"]
    assert main(common + ["--out", str(tmp_path / "full"), "--steps", "4"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert full["recovery"]["steps"] == 4 and full["ppl_after"] is not None
    assert full["ppl_after"] != full["ppl_before"]  # recovery changed the trainable tensors
    assert full["trainable_parameters"] > 0 and full["recovery"]["final_loss"] > 0
    if method == "drop":  # ShortGPT + LoRA at the FlexiGPT plan's trainable budget
        assert full["recovery"]["kept_lora_rank"] == matched_lora_rank(plan, tiny_model)
    # the checkpoint of the finished run resumes to the very same model (plumbing of --resume)
    assert (tmp_path / "full-checkpoint").is_dir()
    assert main(common + ["--out", str(tmp_path / "full"), "--steps", "4", "--resume"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl_after"] == full["ppl_after"]
