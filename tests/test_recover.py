"""Recovery loop: what trains, what stays frozen, objectives, schedule, cancel and resume."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from flexigpt.recover import CHECKPOINT_NAME, RecoverSpec, StepLog, load_trainable, recover, save_trainable, trainable_state


def _lora(model, blocks=(2, 3), rank=4):
    """Freeze everything, then give a few blocks a peft LoRA (the only trainable tensors)."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)  # peft draws lora_A from the global RNG: same seed, same adapters
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"],
                     layers_to_transform=list(blocks))
    model = inject_adapter_in_model(cfg, model)
    return model


def _windows(n=8, t=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, t), generator=g)


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_lm_lowers_loss_and_leaves_frozen_tensors_bit_identical(tiny_model):
    model = _lora(tiny_model)
    before = _frozen(model)
    trained_before = {n: t.clone() for n, t in trainable_state(model).items()}
    ids = _windows(n=4)
    spec = RecoverSpec(steps=8, lr=2e-2, batch_size=4, seq_len=16, warmup=0)
    logs = list(recover(model, ids, spec))
    assert logs[-1].loss < logs[0].loss - 0.05
    after = _frozen(model)
    assert before.keys() == after.keys() and len(before) > 50
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(trained_before[n], t) for n, t in trainable_state(model).items())
    assert all(n.count("lora_") == 1 for n in trainable_state(model))


def test_steplog_fields_and_schedule(tiny_model):
    model = _lora(tiny_model)
    spec = RecoverSpec(steps=6, lr=1e-2, batch_size=2, grad_accum=2, seq_len=12, warmup=2)
    logs = list(recover(model, _windows(n=5, t=16), spec))
    assert [x.step for x in logs] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(x, StepLog) for x in logs)
    assert [x.tokens_seen for x in logs] == [s * 2 * 2 * 12 for s in range(1, 7)]
    assert logs[0].lr == 0.0 and logs[1].lr == pytest.approx(5e-3) and logs[2].lr == pytest.approx(1e-2)
    assert logs[3].lr > logs[4].lr > logs[5].lr > 0  # cosine decay
    assert all(math.isfinite(x.loss) and x.grad_norm > 0 for x in logs)
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(logs, logs[1:]))


def test_grad_accum_matches_one_big_batch(tiny_model):
    # Same 8 windows as one micro-batch of 8 or two of 4: same loss and same accumulated gradient.
    ids = _windows(n=8)
    a, b = _lora(copy.deepcopy(tiny_model)), _lora(copy.deepcopy(tiny_model))
    (la,) = recover(a, ids, RecoverSpec(steps=1, lr=1e-2, batch_size=8, seq_len=16, warmup=0))
    (lb,) = recover(b, ids, RecoverSpec(steps=1, lr=1e-2, batch_size=4, grad_accum=2, seq_len=16, warmup=0))
    assert lb.loss == pytest.approx(la.loss, rel=1e-5)
    assert lb.grad_norm == pytest.approx(la.grad_norm, rel=1e-4)
    assert lb.tokens_seen == la.tokens_seen == 8 * 16


def test_norm_only_training_on_opt(tiny_opt_model):
    model = tiny_opt_model
    for p in model.parameters():
        p.requires_grad_(False)
    norm = model.model.decoder.layers[1].final_layer_norm
    norm.weight.requires_grad_(True)
    start = norm.weight.detach().clone()
    logs = list(recover(model, _windows(n=4), RecoverSpec(steps=3, lr=1e-2, batch_size=4, seq_len=16, warmup=0)))
    assert len(logs) == 3 and not torch.equal(start, norm.weight)
    assert list(trainable_state(model)) == ["model.decoder.layers.1.final_layer_norm.weight"]


@pytest.mark.parametrize("objective,hidden", [("distill", 0.0), ("distill", 1.0), ("mix", 0.5)])
def test_distill_and_mix_lower_their_loss(tiny_model, objective, hidden):
    teacher = copy.deepcopy(tiny_model)
    student = copy.deepcopy(tiny_model)
    with torch.no_grad():  # damage one block, as a drop or a share would
        student.model.layers[3].mlp.down_proj.weight.mul_(-3.0)
    student = _lora(student, blocks=(3,))
    spec = RecoverSpec(steps=8, lr=2e-2, batch_size=4, seq_len=16, warmup=0, objective=objective,
                       kd_temperature=2.0, hidden_weight=hidden)
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    logs = list(recover(student, _windows(n=4), spec, teacher=teacher))
    assert logs[-1].loss < logs[0].loss
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())


def test_cancel_saves_a_checkpoint(tiny_model, tmp_path):
    model = _lora(tiny_model)
    seen = []
    gen = recover(model, _windows(), RecoverSpec(steps=10, batch_size=2, seq_len=16), checkpoint_dir=tmp_path,
                  should_stop=lambda: len(seen) >= 3)
    for record in gen:
        seen.append(record)
    assert [x.step for x in seen] == [1, 2, 3]
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 3 and state["cursor"] == 6 and state["world_size"] == 1
    assert set(state["trainable"]) == set(trainable_state(model))
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no leftovers


def test_resume_equals_uninterrupted(tiny_model, tmp_path):
    ids = _windows(n=6)
    spec = RecoverSpec(steps=7, lr=1e-2, batch_size=4, seq_len=16, warmup=2, checkpoint_every=2)
    full = _lora(copy.deepcopy(tiny_model))
    full_logs = list(recover(full, ids, spec))

    first = _lora(copy.deepcopy(tiny_model))
    part = []
    for record in recover(first, ids, spec, checkpoint_dir=tmp_path, should_stop=lambda: len(part) >= 5):
        part.append(record)
    assert part[-1].step == 5
    second = _lora(copy.deepcopy(tiny_model))  # a fresh process: the same starting model
    rest = list(recover(second, ids, spec, checkpoint_dir=tmp_path, resume=True))
    assert [x.step for x in rest] == [6, 7]
    assert rest[-1].loss == pytest.approx(full_logs[-1].loss, rel=1e-5)
    assert rest[-1].tokens_seen == full_logs[-1].tokens_seen
    for name, t in trainable_state(full).items():
        torch.testing.assert_close(trainable_state(second)[name], t, atol=1e-6, rtol=1e-5)
    # resuming a finished run trains nothing more
    assert list(recover(_lora(copy.deepcopy(tiny_model)), ids, spec, checkpoint_dir=tmp_path, resume=True)) == []


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    ids = _windows()
    spec = RecoverSpec(steps=2, batch_size=2, seq_len=16)
    list(recover(_lora(copy.deepcopy(tiny_model)), ids, spec, checkpoint_dir=tmp_path))
    with pytest.raises(ValueError, match="other settings.*lr"):
        list(recover(_lora(copy.deepcopy(tiny_model)), ids, RecoverSpec(steps=2, batch_size=2, seq_len=16, lr=spec.lr * 2),
                     checkpoint_dir=tmp_path, resume=True))
    with pytest.raises(ValueError, match="other windows"):
        list(recover(_lora(copy.deepcopy(tiny_model)), _windows(seed=5), spec, checkpoint_dir=tmp_path, resume=True))
    with pytest.raises(ValueError, match="trainable parameters"):
        list(recover(_lora(copy.deepcopy(tiny_model), blocks=(1,)), ids, spec, checkpoint_dir=tmp_path, resume=True))
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        list(recover(_lora(copy.deepcopy(tiny_model)), ids, spec, checkpoint_dir=tmp_path, resume=True))


def test_resumes_a_checkpoint_written_before_hidden_layers_existed(tiny_model, tmp_path):
    """A checkpoint whose spec lacks a newer field resumes when this run uses the value it ran with,
    and stays a settings error when it does not."""
    ids = _windows(n=6)
    spec = RecoverSpec(steps=4, lr=1e-2, batch_size=2, seq_len=16, warmup=0, checkpoint_every=1)
    seen = []
    for record in recover(_lora(copy.deepcopy(tiny_model)), ids, spec, checkpoint_dir=tmp_path,
                          should_stop=lambda: len(seen) >= 2):
        seen.append(record)
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    del state["spec"]["hidden_layers"]  # as written before the field existed
    torch.save(state, path)
    assert [x.step for x in recover(_lora(copy.deepcopy(tiny_model)), ids, spec, checkpoint_dir=tmp_path,
                                    resume=True)] == [3, 4]
    state["spec"]["hidden_layers"] = "all"
    torch.save(state, path)
    with pytest.raises(ValueError, match="other settings.*hidden_layers"):
        list(recover(_lora(copy.deepcopy(tiny_model)), ids, spec, checkpoint_dir=tmp_path, resume=True))


def test_trainable_file_round_trip(tiny_model, tmp_path):
    model = _lora(copy.deepcopy(tiny_model))
    list(recover(model, _windows(n=4), RecoverSpec(steps=2, lr=1e-2, batch_size=4, seq_len=16, warmup=0)))
    save_trainable(model, tmp_path / "t.safetensors")
    fresh = _lora(copy.deepcopy(tiny_model))
    load_trainable(fresh, tmp_path / "t.safetensors")
    ids = _windows(n=2)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="does not match"):
        load_trainable(_lora(copy.deepcopy(tiny_model), blocks=(0,)), tmp_path / "t.safetensors")


@pytest.mark.parametrize("kwargs,name", [
    ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"objective": "rl"}, "objective"),
    ({"warmup": 2.5}, "warmup"), ({"warmup": 500, "steps": 10}, "warmup"), ({"clip": 0}, "clip"),
    ({"batch_size": True}, "batch_size"), ({"objective": "distill", "kd_weight": 0.0}, "kd_weight"),
    ({"betas": (0.9,)}, "betas"), ({"kd_temperature": 0}, "kd_temperature"),
])
def test_spec_validation_names_the_value(kwargs, name):
    with pytest.raises(ValueError, match=f"recover.{name} must be"):
        RecoverSpec(**kwargs)


def test_from_args_fills_flags_left_unset_from_the_recipe():
    import argparse

    from flexigpt.recover_spec import RATE_FIELDS, add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser, defaults={f: None for f in RATE_FIELDS})  # as `build` adds them
    args = parser.parse_args(["--lr", "3e-4"])
    recipe = {"lr": 7e-3, "gate_lr_scale": 3.0, "kd_weight": 0.25}  # unlike RecoverSpec's defaults
    assert all(getattr(RecoverSpec(), k) != v for k, v in recipe.items())
    spec = from_args(args, recipe=recipe)
    assert spec.lr == 3e-4  # the user's flag wins over the recipe
    assert (spec.gate_lr_scale, spec.kd_weight) == (3.0, 0.25)  # flags left unset take the recipe
    plain = from_args(args)  # no recipe: the spec's own defaults
    assert (plain.gate_lr_scale, plain.kd_weight) == (RecoverSpec().gate_lr_scale, RecoverSpec().kd_weight)
    assert from_args(args, recipe=recipe, kd_weight=0.125).kd_weight == 0.125  # changes override both


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="no trainable parameters"):
        list(recover(tiny_model.requires_grad_(False), _windows(), RecoverSpec(steps=1, seq_len=16)))
    model = _lora(tiny_model)
    with pytest.raises(ValueError, match="teacher"):
        list(recover(model, _windows(), RecoverSpec(steps=1, seq_len=16, objective="distill")))
    with pytest.raises(ValueError, match="fewer than recover.seq_len=32"):
        list(recover(model, _windows(t=16), RecoverSpec(steps=1, seq_len=32)))
    spec = RecoverSpec(steps=3, lr=1e-3, seq_len=16, checkpoint_every=1)
    assert RecoverSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown recover fields"):
        RecoverSpec.from_dict({"epochs": 3})


def test_recovers_a_flexigpt_build_and_keeps_sharing(tiny_model):
    from flexigpt.plan import Plan
    from flexigpt.surgery import apply_plan

    base = tiny_model.requires_grad_(False)
    model = apply_plan(base, Plan(base_model="tiny", num_blocks=6, layer_map=(0, 1, 2, 2, 4, 4)))
    trainable = trainable_state(model)
    assert trainable and all(n.startswith(("model.layers.3.", "model.layers.5.")) for n in trainable)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    spec = RecoverSpec(steps=8, lr=5e-3, gate_lr_scale=1.0, batch_size=4, seq_len=16, warmup=0, objective="mix",
                       hidden_weight=1.0)
    logs = list(recover(model, _windows(n=4), spec, teacher=base))
    assert logs[-1].loss < logs[0].loss
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())  # the teacher/base is untouched
    donor = base.model.layers[2].mlp.up_proj.weight
    slot = model.model.layers[3].mlp.up_proj.base_layer.weight
    assert slot.data_ptr() == donor.data_ptr()  # still shared, not copied, after training


def test_hidden_layers_all_matches_every_block_output(tiny_model):
    """``hidden_layers='all'``: the hidden term is the mean over blocks of each block's scale-free
    MSE, so an undamaged student scores zero there and one damaged block raises it."""
    from flexigpt.recover import _hidden_pairs, _objective, _output_hook

    teacher = copy.deepcopy(tiny_model)
    student = copy.deepcopy(tiny_model)
    batch = _windows(n=2)
    spec = RecoverSpec(steps=1, batch_size=2, seq_len=16, objective="distill", kd_weight=0.0, hidden_weight=1.0,
                       hidden_layers="all")

    def hidden_loss():
        tails, hooks = {}, []
        pairs = _hidden_pairs(student.model.layers, teacher.model.layers, "all")
        assert len(pairs) == len(teacher.model.layers)
        for i, (s, t) in enumerate(pairs):
            hooks += [s.register_forward_hook(_output_hook(tails, ("student", i))),
                      t.register_forward_hook(_output_hook(tails, ("teacher", i)))]
        try:
            with torch.no_grad():
                return float(_objective(student, teacher, batch, spec, tails, torch.no_grad))
        finally:
            for h in hooks:
                h.remove()

    assert hidden_loss() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        student.model.layers[-1].mlp.down_proj.weight.mul_(-3.0)  # damage only the last block
    last_only = hidden_loss()
    assert last_only > 0
    with torch.no_grad():
        student.model.layers[1].mlp.down_proj.weight.mul_(-3.0)  # and an early one: every later output moves
    assert hidden_loss() > last_only


def test_hidden_layers_all_needs_the_original_depth(tiny_model):
    teacher = copy.deepcopy(tiny_model)
    student = copy.deepcopy(tiny_model)
    del student.model.layers[2]  # a plain drop: one block fewer than the original
    student = _lora(student, blocks=(1,))
    spec = RecoverSpec(steps=1, batch_size=2, seq_len=16, objective="mix", hidden_weight=1.0, hidden_layers="all")
    with pytest.raises(ValueError, match=r"hidden_layers 'all'.*as many blocks as the original \(\d+\); it has \d+"):
        list(recover(student, _windows(n=2), spec, teacher=teacher))
    with pytest.raises(ValueError, match=r"recover.hidden_layers must be one of 'last', 'all', got 'some'"):
        RecoverSpec(hidden_layers="some")
