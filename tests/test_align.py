"""Permutation-aligned donors: relabelling neurons and heads preserves a block's function."""
from __future__ import annotations

import copy

import torch

from flexigpt.align import Alignment, align_donor, aligned_weights, fold_lora, head_layout, permute_block_
from flexigpt.arch import arch_of, block_linears, get_blocks


def _random_alignment(config, spec, block, seed=0) -> Alignment:
    g = torch.Generator().manual_seed(seed)
    heads, kv, hd = head_layout(config)
    per = heads // kv
    first_rows = next(m for m, axis, grp in spec.permutable if grp == "mlp" and axis == "rows")
    n_mlp = block_linears(block, spec)[first_rows].weight.shape[0]
    kv_perm = torch.randperm(kv, generator=g)
    q_heads = torch.cat([kv_perm[i] * per + torch.randperm(per, generator=g) for i in range(kv)])
    return Alignment(
        mlp=torch.randperm(n_mlp, generator=g),
        q=(q_heads[:, None] * hd + torch.arange(hd)).reshape(-1),
        kv=(kv_perm[:, None] * hd + torch.arange(hd)).reshape(-1),
    )


def _block_out(model, block, x):
    pos = torch.arange(x.shape[1])[None]
    emb = model.model.rotary_emb(x, pos) if hasattr(model.model, "rotary_emb") else None
    kwargs = {"position_embeddings": emb} if emb is not None else {}
    out = block(x, position_ids=pos, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def test_permutation_preserves_function(tiny_model):
    spec = arch_of(tiny_model)
    block = get_blocks(tiny_model)[2]
    moved = copy.deepcopy(block)
    permute_block_(moved, _random_alignment(tiny_model.config, spec, block), spec)
    x = torch.randn(1, 5, 64)
    assert not torch.allclose(block.mlp.gate_proj.weight, moved.mlp.gate_proj.weight)
    torch.testing.assert_close(_block_out(tiny_model, moved, x), _block_out(tiny_model, block, x), rtol=1e-5, atol=1e-5)


def test_exact_permutation_is_recovered_with_zero_residual(tiny_model):
    spec = arch_of(tiny_model)
    blocks = get_blocks(tiny_model)
    donor, pruned = blocks[2], blocks[4]
    truth = _random_alignment(tiny_model.config, spec, donor, seed=5)
    with torch.no_grad():
        for name, w in aligned_weights(donor, truth, spec).items():
            block_linears(pruned, spec)[name].weight.copy_(w)  # pruned := permuted donor
    found = align_donor(pruned, donor, spec, tiny_model.config)
    aligned = aligned_weights(donor, found, spec)
    for name, layer in block_linears(pruned, spec).items():
        before = (layer.weight - block_linears(donor, spec)[name].weight).norm()
        after = (layer.weight - aligned[name]).norm()
        assert after < 1e-6 and before > 0.1, name


def test_identity_when_blocks_equal(tiny_model):
    spec = arch_of(tiny_model)
    b = get_blocks(tiny_model)[1]
    assert align_donor(b, b, spec, tiny_model.config).is_identity()


def test_fold_lora_gives_same_slot_function(tiny_model):
    """An adapter fitted against the aligned donor, folded back, computes the aligned slot's function."""
    spec = arch_of(tiny_model)
    blocks = get_blocks(tiny_model)
    donor, pruned = blocks[1], blocks[3]
    al = align_donor(pruned, donor, spec, tiny_model.config)
    aligned = aligned_weights(donor, al, spec)
    slot_aligned = copy.deepcopy(donor)   # aligned donor + full-rank delta == pruned (in aligned labels)
    slot_folded = copy.deepcopy(donor)    # donor's own labels + folded adapters
    with torch.no_grad():
        for name, layer in block_linears(pruned, spec).items():
            delta = layer.weight.float() - aligned[name]
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            B, A = U * S, Vh
            block_linears(slot_aligned, spec)[name].weight.copy_(aligned[name] + B @ A)
            A2, B2 = fold_lora(name, A, B, al, spec)
            w = block_linears(donor, spec)[name].weight
            block_linears(slot_folded, spec)[name].weight.copy_(w + B2 @ A2)
    x = torch.randn(1, 4, 64)
    ref = _block_out(tiny_model, pruned, x)
    torch.testing.assert_close(_block_out(tiny_model, slot_aligned, x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_block_out(tiny_model, slot_folded, x), ref, rtol=1e-4, atol=1e-4)


def test_opt_alignment(tiny_opt_model):
    spec = arch_of(tiny_opt_model)
    blocks = get_blocks(tiny_opt_model)
    al = align_donor(blocks[0], blocks[2], spec, tiny_opt_model.config)
    assert sorted(al.mlp.tolist()) == list(range(128)) and sorted(al.q.tolist()) == list(range(64))
