"""The method registry: a method is one module; a toy method registered here builds, counts,
exports and reloads through the public API without any other file knowing about it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flexigpt.methods import BuildContext, Method, get_method, method_names, register, unregister
from flexigpt.plan import Plan


class EchoLast(Method):
    """A toy: drop the pruned blocks, then run the last kept block once more, sharing its weights."""

    name = "echo_last"
    label = "echo the last block (toy)"
    description = "a test method"

    def validate(self, plan) -> None:
        body = plan.layer_map[:-1]
        if not body or plan.layer_map[-1] != body[-1] or any(b <= a for a, b in zip(body, body[1:])):
            raise ValueError(f"an echo_last layer_map is increasing kept blocks plus the last one again, got {list(plan.layer_map)}")

    def shared_slots(self, plan):
        return (plan.num_slots - 1,)

    def slot_sources(self, plan):
        return plan.layer_map[:-1] + (plan.layer_map[-1],)

    def from_pruned(self, plan, pruned, *, donors=None, group_size=None):
        kept = tuple(b for b in range(plan.num_blocks) if b not in pruned)
        return dataclasses.replace(plan, method=self.name, layer_map=kept + kept[-1:], sources=None)

    def build_slot(self, ctx: BuildContext, plan, slot: int):
        from flexigpt.slots import structural_copy  # test-local: the toy needs one more copy

        block = plan.layer_map[slot]
        return structural_copy(ctx.copies[block]) if slot == plan.num_slots - 1 else ctx.copies[block]

    def estimate(self, plan, shapes, adapter):
        kept = len(set(plan.layer_map))
        return shapes.nonblock + kept * shapes.block, shapes.nonblock + plan.num_slots * shapes.block, 0


@pytest.fixture
def echo():
    method = register(EchoLast())
    yield method
    unregister(method.name)


def test_builtin_methods_are_registered_with_labels():
    assert set(method_names()) >= {"flexigpt", "drop", "extend", "foldgpt"}
    for name in method_names():
        m = get_method(name)
        assert m.label and m.description and m.name == name
    with pytest.raises(ValueError, match="unknown method 'nope'; valid: flexigpt"):
        get_method("nope")


def test_toy_method_builds_exports_and_reloads(echo, tiny_model, tiny_tokenizer, tmp_path):
    from flexigpt import apply_plan, estimate_params, load_model, measure_params, save_compact

    plan = Plan("tiny", 6, (0, 1, 2, 3, 4, 5), "drop").with_method("echo_last").drop(2)
    assert plan.layer_map == (0, 1, 3, 4, 5, 5) and plan.pruned_blocks == (2,) and plan.shared_slots == (5,)
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="echo_last layer_map"):
        dataclasses.replace(plan, layer_map=(0, 1, 3, 4, 5))
    model = apply_plan(tiny_model, plan)
    blocks = model.model.layers
    assert blocks[5].mlp.up_proj.weight.data_ptr() == blocks[4].mlp.up_proj.weight.data_ptr()
    assert blocks[5] is not blocks[4]
    assert estimate_params(plan, tiny_model) == measure_params(model)
    ids = torch.randint(4, 128, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_compact(model, plan, tiny_tokenizer, tmp_path / "echo")
    reloaded = load_model(str(tmp_path / "echo"))
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, logits)
    assert reloaded.extra["plan"] == plan
