"""Evaluation: perplexity definition and protocol, speed comparison, zero-shot through lm-eval."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flexigpt import evaluate
from flexigpt.data import token_windows
from tiny import tiny_llama

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def test_uniform_logits_give_vocab_size(tiny_model, tiny_tokenizer, tiny_text_file):
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()  # every logit 0: a uniform next-token distribution
    windows = token_windows(tiny_tokenizer, str(tiny_text_file), seq_len=16, split="heldout")
    result = evaluate.perplexity(tiny_model, windows, batch_size=3)
    assert result.ppl == pytest.approx(128.0, rel=1e-5)
    assert result.nll == pytest.approx(math.log(128), rel=1e-6)
    n = windows.num_windows
    assert result.tokens == n * 15
    proto = result.protocol
    assert proto["split"] == "heldout" and proto["windows"] == n and proto["seq_len"] == 16
    assert proto["tokens"] == n * 16 and proto["predicted_tokens"] == n * 15
    assert proto["level"] == "token" and proto["bos"] is False and proto["data"] == str(tiny_text_file)
    assert json.loads(json.dumps(result.to_dict()))["ppl"] == pytest.approx(128.0, rel=1e-5)


def test_perplexity_matches_hf_loss_and_ignores_batch_size(tiny_model):
    ids = torch.randint(4, 128, (5, 24), generator=torch.Generator().manual_seed(3))
    a = evaluate.perplexity(tiny_model, ids, batch_size=1)
    b = evaluate.perplexity(tiny_model, ids, batch_size=8)
    assert a.nll == pytest.approx(b.nll, rel=1e-6) and a.tokens == 5 * 23
    with torch.no_grad():
        hf = tiny_model(input_ids=ids, labels=ids).loss  # mean over the same 5 x 23 predictions
    assert a.nll == pytest.approx(float(hf), rel=1e-5)
    assert a.protocol == {"windows": 5, "seq_len": 24, "tokens": 120, "level": "token", "predicted_tokens": 115}
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        evaluate.perplexity(tiny_model, ids, batch_size=0)
    with pytest.raises(ValueError, match="windows must be"):
        evaluate.perplexity(tiny_model, ids[0])


def test_latency_and_compare_speed(tiny_model, tiny_tokenizer):
    ids = torch.randint(4, 128, (1, 16))
    assert 0 < evaluate.latency(tiny_model, ids, repeats=2) < 5
    shallow = tiny_llama(num_blocks=2)
    report = evaluate.compare_speed({"original": tiny_model, "shallow": shallow}, tiny_tokenizer,
                                    prompt_tokens=12, new_tokens=4, repeats=2, warmup=1)
    first, second = report.rows
    assert (first.name, second.name) == ("original", "shallow")
    assert first.forward_ratio == 1.0 and first.throughput_ratio == 1.0
    assert second.forward_ratio == pytest.approx(second.forward_s / first.forward_s)
    assert all(r.forward_s > 0 and r.tokens_per_s > 0 for r in report.rows)
    assert second.parameters < first.parameters
    assert report.protocol["prompt_tokens"] == 12 and report.protocol["new_tokens"] == 4
    assert list(report.to_frame().columns)[:3] == ["name", "forward_s", "tokens_per_s"]
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 1, got 0"):
        evaluate.compare_speed({"a": tiny_model}, tiny_tokenizer, new_tokens=0)


def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    rows = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return float(logp[rows, torch.tensor(cont)].sum())


def test_zero_shot_local_task_matches_a_direct_scorer(tiny_model, tiny_tokenizer):
    result = evaluate.zero_shot(tiny_model, tiny_tokenizer, ["flexigpt_words"], include_path=TASKS)
    docs = [json.loads(line) for line in (TASKS / "words.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [_choice_logprob(tiny_model, tiny_tokenizer, context, " " + c) for c in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert result.scores["flexigpt_words"]["acc"] == pytest.approx(correct / len(docs))
    assert 0 <= result.scores["flexigpt_words"]["acc_norm"] <= 1
    assert result.protocol["samples"] == {"flexigpt_words": len(docs)} and result.protocol["num_fewshot"] == 0


def test_zero_shot_offline_names_the_task(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="zero-shot task 'arc_easy' could not load its data"):
        evaluate.zero_shot(tiny_model, tiny_tokenizer, ["arc_easy"])
    with pytest.raises(ValueError, match="non-empty list of task names"):
        evaluate.zero_shot(tiny_model, tiny_tokenizer, "arc_easy")


@pytest.mark.slow
def test_zero_shot_on_the_embedded_model(smollm):
    result = evaluate.zero_shot(smollm.model, smollm.tokenizer, ["flexigpt_facts"], include_path=TASKS)
    assert result.scores["flexigpt_facts"]["acc"] >= 0.625  # 8 easy questions, 4 choices: chance is 0.25 (measured 0.75)


def test_eval_cli_on_a_tiny_folder(tiny_model, tiny_tokenizer, tiny_text_file, tmp_path, capsys):
    from flexigpt.cli import main

    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    argv = ["eval", "--model", str(tmp_path), "--data", str(tiny_text_file), "--windows", "4", "--seq-len", "16",
            "--speed", "--new-tokens", "3", "--repeats", "1", "--tasks", "flexigpt_words", "--task-path", str(TASKS), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ppl", "data", "split", "windows", "seq_len", "tokens", "level", "bos", "predicted_tokens"):
        assert key in out
    assert out["split"] == "heldout" and out["windows"] == 4 and out["tokens"] == 64 and out["predicted_tokens"] == 60
    windows = token_windows(tiny_tokenizer, str(tiny_text_file), seq_len=16, split="heldout", max_windows=4)
    assert out["ppl"] == pytest.approx(evaluate.perplexity(tiny_model, windows).ppl, rel=1e-5)
    assert out["forward_s"] > 0 and out["tokens_per_s"] > 0
    assert 0 <= out["zero_shot"]["flexigpt_words"]["acc"] <= 1
    assert main(["eval", "--model", str(tmp_path), "--data", str(tiny_text_file), "--seq-len", "1"]) == 2
    assert "seq_len must be an integer >= 2" in capsys.readouterr().err
    offline = ["eval", "--model", str(tmp_path), "--data", str(tiny_text_file), "--seq-len", "16", "--tasks", "arc_easy"]
    assert main(offline) == 2
    assert "error: zero-shot task 'arc_easy' could not load its data" in capsys.readouterr().err
