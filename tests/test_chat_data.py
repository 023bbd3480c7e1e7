"""Self-distillation chat data: held-out prompts, the reply cache, windows recovery trains on, mixing."""
from __future__ import annotations

import copy

import pytest
import torch

from flexigpt.chat_data import chat_data, distill_prompts, mix_windows
from flexigpt.data import Windows
from flexigpt.prompt_sets import PromptItem, PromptSet, builtin_prompts
from flexigpt.recover import RecoverSpec, recover

SMALL = PromptSet("small", tuple(PromptItem(f"w{i} w{i + 1} w{i + 2}") for i in range(4, 40, 3)))


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_distill_prompts_hold_out_the_fidelity_set():
    prompts = distill_prompts()
    assert 300 <= len(prompts) <= 1000
    texts = [i.prompt for i in prompts.items]
    assert len(set(texts)) == len(texts)
    norm = lambda t: " ".join(t.lower().replace("?", " ").replace(".", " ").split())  # noqa: E731
    held = {norm(i.prompt) for i in builtin_prompts().items}
    assert not held & {norm(t) for t in texts}
    assert len({i.kind for i in prompts.items}) >= 8  # many families, not one template
    # a custom held-out set removes exactly its prompts; the draw is seeded
    gone = PromptSet("x", (PromptItem(texts[0], ("k",)),))
    assert texts[0] not in {i.prompt for i in distill_prompts(held_out=gone).items}
    assert distill_prompts().sha256 == prompts.sha256 and distill_prompts(seed=1).sha256 != prompts.sha256


def test_replies_are_generated_once_and_reused(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path))
    first = chat_data(tiny_model, tiny_tokenizer, prompts=SMALL, max_new_tokens=8)
    assert first.generated and first.path.is_file() and first.path.parent.parent == tmp_path
    calls, handle = _count_forwards(tiny_model)
    again = chat_data(tiny_model, tiny_tokenizer, prompts=SMALL, max_new_tokens=8)
    handle.remove()
    assert not again.generated and calls == [] and again.replies == first.replies  # not one forward pass
    # a changed prompt set, model or setting is a new key: generated again
    more = PromptSet("small+", SMALL.items + (PromptItem("w90 w91"),))
    assert chat_data(tiny_model, tiny_tokenizer, prompts=more, max_new_tokens=8).generated
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert chat_data(changed, tiny_tokenizer, prompts=SMALL, max_new_tokens=8).generated
    assert chat_data(tiny_model, tiny_tokenizer, prompts=SMALL, max_new_tokens=9).generated
    assert not chat_data(tiny_model, tiny_tokenizer, prompts=SMALL, max_new_tokens=8).generated
    # a damaged cache file is regenerated, not trusted
    first.path.write_text("{not json")
    assert chat_data(tiny_model, tiny_tokenizer, prompts=SMALL, max_new_tokens=8).generated


def test_windows_hold_the_conversations_and_recovery_trains_on_them(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path))
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = 3
    data = chat_data(model, tiny_tokenizer, prompts=SMALL, max_new_tokens=6)
    convs = data.conversations()
    for conv, rep in zip(convs, data.replies):
        assert conv[: len(rep.prompt_ids)] == list(rep.prompt_ids)
        assert conv[len(rep.prompt_ids):] == list(rep.tokens) + ([3] if rep.ended else [])
    total = sum(len(c) for c in convs)
    w = data.windows(seq_len=16)
    assert isinstance(w, Windows) and w.input_ids.dtype == torch.long and w.seq_len == 16
    assert w.num_windows == total // 16 and w.total_tokens == total and w.split == "train"
    assert torch.equal(data.windows(seq_len=16).input_ids, w.input_ids)  # seeded order
    assert not torch.equal(data.windows(seq_len=16, seed=1).input_ids, w.input_ids)
    assert data.windows(seq_len=16, max_windows=2).num_windows == 2
    with pytest.raises(ValueError, match="fewer than one window"):
        data.windows(seq_len=total + 1)
    with pytest.raises(ValueError, match="seq_len"):
        data.windows(seq_len=1)
    student = copy.deepcopy(tiny_model)
    for p in student.parameters():
        p.requires_grad_(False)
    student.model.norm.weight.requires_grad_(True)
    logs = list(recover(student, w, RecoverSpec(steps=2, batch_size=2, seq_len=16, objective="distill"),
                        teacher=tiny_model))
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(x.loss)) for x in logs)


def test_chat_data_needs_a_chat_template(tiny_model, tiny_tokenizer):
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat_data(tiny_model, plain, prompts=SMALL)


def test_mix_windows_shares_without_repeats():
    a = torch.arange(0, 40 * 4).view(40, 4)
    b = torch.arange(1000, 1000 + 10 * 4).view(10, 4)
    mixed = mix_windows(a, b, 0.2)
    from_b = (mixed.input_ids[:, 0] >= 1000).tolist()
    assert mixed.num_windows == 50 and sum(from_b) == 10
    assert len({tuple(r) for r in mixed.input_ids.tolist()}) == 50  # no window twice
    assert sum(from_b[:25]) == 5  # spread evenly: a prefix keeps the share
    half = mix_windows(a, b, 0.5)
    assert half.num_windows == 20 and int((half.input_ids[:, 0] >= 1000).sum()) == 10
    assert torch.equal(mix_windows(a, b, 0).input_ids, a) and torch.equal(mix_windows(a, b, 1).input_ids, b)
    wa = Windows(input_ids=a, data="default", split="train", seq_len=4, total_tokens=999, bos=False)
    assert mix_windows(wa, b, 0.2).data.startswith("mix(default, b, 0.2)")
    with pytest.raises(ValueError, match="fraction must be a number in"):
        mix_windows(a, b, 1.5)
    with pytest.raises(ValueError, match="differ in length"):
        mix_windows(a, torch.zeros((3, 5), dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="int64"):
        mix_windows(a.float(), b, 0.5)


def test_recovery_windows_resolve_text_chat_and_mixed(tiny_model, tiny_tokenizer, tiny_text_file, tmp_path, monkeypatch):
    from flexigpt.recovery_data import recovery_windows

    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path))
    text = recovery_windows(tiny_model, tiny_tokenizer, str(tiny_text_file), seq_len=16, max_windows=4)
    assert text.num_windows == 4 and text.split == "train"
    chat = recovery_windows(tiny_model, tiny_tokenizer, "chat", seq_len=16, max_windows=6)
    assert chat.num_windows == 6 and chat.data.startswith("chat:")
    mixed = recovery_windows(tiny_model, tiny_tokenizer, "mixed", text=str(tiny_text_file), seq_len=16, max_windows=8)
    assert mixed.num_windows == 8 and mixed.data.startswith("mix(")
    rows = {tuple(r) for r in mixed.input_ids.tolist()}
    assert rows & {tuple(r) for r in chat.input_ids.tolist()}  # some windows are chat, the rest text
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        recovery_windows(tiny_model, plain, "mixed", seq_len=16)


# ---- loss only on the replies ------------------------------------------------------------------
def test_replies_only_masks_the_template_and_the_prompts(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path))
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = 3
    data = chat_data(model, tiny_tokenizer, prompts=SMALL, max_new_tokens=6)
    plain, masked = data.windows(seq_len=16), data.windows(seq_len=16, replies_only=True)
    assert plain.loss_mask is None and torch.equal(plain.input_ids, masked.input_ids)
    # rebuild the expected mask from the conversations, in the windows' seeded order
    convs = data.conversations()
    marks = {tuple(c): [j >= len(r.prompt_ids) for j in range(len(c))] for c, r in zip(convs, data.replies)}
    stream, want = masked.input_ids.flatten().tolist(), []
    while len(want) < len(stream):
        conv = next(c for c in marks if stream[len(want): len(want) + len(c)] == list(c)[: len(stream) - len(want)])
        want += marks[conv][: len(stream) - len(want)]
    assert masked.loss_mask.flatten().tolist() == want
    assert 0 < masked.protocol()["loss_tokens"] < masked.num_windows * 16
    assert masked.head(2).loss_mask.shape == (2, 16) and masked.data.endswith(":replies")
    mixed = mix_windows(torch.zeros((8, 16), dtype=torch.long), masked, 0.5)
    from_chat = [any(torch.equal(r, c) for c in masked.input_ids) for r in mixed.input_ids]
    assert any(from_chat) and not all(from_chat)
    for chat_row, m in zip(from_chat, mixed.loss_mask):
        assert bool(m.all()) == (not chat_row)  # text windows learn every token, chat windows only replies
    assert mix_windows(torch.zeros((8, 16), dtype=torch.long), plain, 0.5).loss_mask is None


def test_the_masked_loss_counts_only_marked_targets(tiny_model):
    from flexigpt.recover import _objective

    ids = torch.randint(4, 100, (2, 12))
    spec = RecoverSpec(steps=1, batch_size=2, seq_len=12)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 6:] = True
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        want = nll.view(2, 11)[:, 5:].mean()
        got = _objective(tiny_model, None, ids, spec, {}, torch.no_grad, mask)
        full = _objective(tiny_model, None, ids, spec, {}, torch.no_grad, None)
        assert torch.allclose(got, want) and not torch.allclose(got, full)
        assert torch.allclose(_objective(tiny_model, None, ids, spec, {}, torch.no_grad, torch.ones_like(mask)), full)
        assert float(_objective(tiny_model, None, ids, spec, {}, torch.no_grad, torch.zeros_like(mask))) == 0.0
        kd = RecoverSpec(steps=1, batch_size=2, seq_len=12, objective="distill", hidden_weight=0.0)
        assert float(_objective(tiny_model, tiny_model, ids, kd, {}, torch.no_grad, mask)) == pytest.approx(0.0, abs=1e-5)


def test_recovery_on_masked_windows_and_bad_masks(tiny_model):
    ids = torch.randint(4, 100, (4, 12))
    student = copy.deepcopy(tiny_model)
    for p in student.parameters():
        p.requires_grad_(False)
    student.model.norm.weight.requires_grad_(True)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    w = Windows(input_ids=ids, data="x", split="train", seq_len=12, total_tokens=48, bos=False, loss_mask=mask)
    before = student.model.norm.weight.detach().clone()
    logs = list(recover(student, w, RecoverSpec(steps=1, batch_size=2, seq_len=12, weight_decay=0.0)))
    assert logs[0].loss == 0.0 and torch.equal(student.model.norm.weight, before)  # nothing marked: nothing learned
    bad = Windows(input_ids=ids, data="x", split="train", seq_len=12, total_tokens=48, bos=False,
                  loss_mask=mask[:2])
    with pytest.raises(ValueError, match=r"loss_mask must be a bool tensor shaped like the windows \(4, 12\)"):
        list(recover(student, bad, RecoverSpec(steps=1, batch_size=2, seq_len=12)))
