"""Permutation-aligned donors in the plan (``AdapterSpec.align``): the adapter is fitted against
the donor relabelled to match the pruned block, then folded back, so the slot still runs the
donor's tensors unchanged and nothing extra is stored or run."""
from __future__ import annotations

import json

import pytest
import torch

from flexigpt.adapters import ADAPTER, base_linear
from flexigpt.align import Alignment, align_donor, permute_block_
from flexigpt.arch import arch_of, block_linears, get_blocks
from flexigpt.params import estimate_params, measure_params
from flexigpt.plan import AdapterSpec, Plan
from flexigpt.surgery import apply_plan


def _scramble(model, donor: int, pruned: int, noise: float = 0.002) -> None:
    """Make block ``pruned`` a relabelled copy of block ``donor`` plus a little noise."""
    spec = arch_of(model)
    blocks = get_blocks(model)
    g = torch.Generator().manual_seed(3)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    hd = model.config.hidden_size // heads
    inter = model.config.intermediate_size
    kv_perm = torch.randperm(kv, generator=g)
    per = heads // kv
    q_heads = torch.cat([kv_perm[i] * per + torch.randperm(per, generator=g) for i in range(kv)])
    perm = Alignment(mlp=torch.randperm(inter, generator=g), q=(q_heads[:, None] * hd + torch.arange(hd)).reshape(-1),
                     kv=(kv_perm[:, None] * hd + torch.arange(hd)).reshape(-1))
    with torch.no_grad():
        for (name, src), (_, dst) in zip(block_linears(blocks[donor], spec).items(), block_linears(blocks[pruned], spec).items()):
            dst.weight.copy_(src.weight + noise * torch.randn(src.weight.shape, generator=g))
        permute_block_(blocks[pruned], perm, spec)


def _effective(slot, spec) -> dict[str, torch.Tensor]:
    out = {}
    for name in spec.matrix_names:
        layer = slot.get_submodule(spec.path_of(name))
        layer = getattr(layer, "inner", layer)
        w = base_linear(layer).weight.detach().clone()
        if hasattr(layer, "lora_A"):
            w += (layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight).detach()
        out[name] = w
    return out


def test_full_rank_aligned_slot_reproduces_the_pruned_block_and_shares_the_donor(tiny_model):
    _scramble(tiny_model, donor=1, pruned=3)
    plan = Plan("tiny", 6, (0, 1, 2, 1, 4, 5),
                adapter=AdapterSpec(rank=64, out_norm="scale", out_norm_scale=1.0, align=True))
    model = apply_plan(tiny_model, plan)
    spec = arch_of(model)
    slot, donor = get_blocks(model)[3], get_blocks(tiny_model)[1]
    for name, lin in block_linears(donor, spec).items():  # the donor's tensors, unchanged and shared
        assert base_linear(slot.get_submodule(spec.path_of(name))).weight.data_ptr() == lin.weight.data_ptr()
    assert estimate_params(plan, tiny_model) == measure_params(model)  # nothing extra stored
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():  # the block's function is the pruned block's (up to relabelling): same logits
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=2e-4, rtol=1e-4)
    assert not align_donor(get_blocks(tiny_model)[3], donor, spec, tiny_model.config).is_identity()


def test_low_rank_aligned_residual_is_smaller(tiny_model):
    _scramble(tiny_model, donor=1, pruned=3)
    spec = arch_of(tiny_model)
    pruned, donor = get_blocks(tiny_model)[3], get_blocks(tiny_model)[1]
    target = {n: m.weight.detach() for n, m in block_linears(pruned, spec).items()}
    residual = {}
    for align in (False, True):
        plan = Plan("tiny", 6, (0, 1, 2, 1, 4, 5), adapter=AdapterSpec(rank=4, align=align))
        eff = _effective(get_blocks(apply_plan(tiny_model, plan))[3], spec)
        if align:  # compare in the pruned block's labelling (relabelling is an isometry)
            a = align_donor(pruned, donor, spec, tiny_model.config)
            for m, axis, group in spec.permutable:
                idx = a.index(group)
                eff[m] = eff[m][idx] if axis == "rows" else eff[m][:, idx]
        residual[align] = sum(float((target[n] - eff[n]).norm() ** 2) for n in target) ** 0.5
    assert residual[True] <= 0.5 * residual[False]


def test_align_on_an_unrelated_pair_is_no_worse_and_reloads(tiny_model, tmp_path):
    from flexigpt.export import load_compact, save_compact

    plan = Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=2, align=True))
    model = apply_plan(tiny_model, plan)
    ids = torch.randint(0, 100, (1, 10))
    save_compact(model, plan, None, tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "c").model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_cli_plan_align_flag(tmp_path, capsys):
    from flexigpt.cli import main

    analysis = {"format_version": 1, "model": "default", "num_blocks": 6, "block_influence": [0.9, 0.1, 0.05, 0.3, 0.02, 0.5]}
    (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    out = tmp_path / "plan.json"
    # no share error in this analysis: --keep-donors gives the slots donors (nearest kept) to align
    assert main(["plan", "--analysis", str(tmp_path), "--ratio", "0.34", "--align", "--keep-donors",
                 "--out", str(out)]) == 0
    plan = Plan.from_json(out.read_text())
    assert plan.adapter.align and json.loads(out.read_text())["format_version"] == 2
    assert main(["plan", "--from-plan", str(out), "--no-align", "--out", str(out)]) == 0
    assert not Plan.from_json(out.read_text()).adapter.align and json.loads(out.read_text())["format_version"] == 1
    capsys.readouterr()


@pytest.mark.parametrize("bad", ["yes", 1])
def test_align_must_be_a_bool(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        AdapterSpec(align=bad)
