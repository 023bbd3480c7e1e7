"""Chat fidelity: key matching, the loop detector, agreement, batched greedy decoding, the report, the CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from flexigpt.chat import reply
from flexigpt.fidelity import (FidelityReport, FidelityRow, chat_fidelity, contains_key, find_loop, is_degenerate,
                               token_agreement)
from flexigpt.greedy import cached_greedy_replies, greedy_replies, reply_text
from flexigpt.prompt_sets import PromptItem, PromptSet, builtin_prompts, load_prompts


def _set(*pairs):
    return PromptSet("tiny", tuple(PromptItem(p, tuple(k)) for p, k in pairs))


TINY = _set(("w5 w6 w7", ["w9"]), ("w10", ["w11", "w12"]), ("w20 w21", ["w30"]), ("w40 w41 w42 w43", ["w44"]),
            ("w50", ["w51"]))


def test_keys_match_case_insensitive_whole_words_and_numbers():
    assert contains_key("The capital of France is Paris.", ["paris"])
    assert contains_key("2 + 2 = 4.", ["4", "four"]) and not contains_key("The answer is 14.", ["4"])
    assert contains_key("Yes!", ["yes"]) and not contains_key("Yesterday it rained.", ["yes"])
    assert contains_key("It is a blue whale, the largest.", ["Blue Whale"])
    assert contains_key("forty-two", ["forty-two"]) and not contains_key("", ["x"])
    assert contains_key("Carbon dioxide (CO2).", ["co2"]) and not contains_key("CO22", ["co2"])


def test_loop_detector_on_hand_made_strings():
    # the screenshot's failure: a unit repeated to the end of the reply (last copy cut short)
    tokens = ["Hangul", "-", "LIML", "-"] + ["LIMMER", "-"] * 5 + ["LIMMER"]
    loop = find_loop(tokens)
    assert loop is not None and loop.n == 2 and loop.at_end and loop.repeats >= 3
    assert is_degenerate(list("ab" * 10))  # period 2, 20 tokens, to the end
    assert is_degenerate(["!"] * 12) and not is_degenerate(["!"] * 11)  # the 12-token minimum span
    # three copies of an 8-token unit = 24 tokens, to the end
    unit = "the cat sat on the mat and then".split()
    assert find_loop(unit * 3).n == 8 and not is_degenerate(unit * 2 + ["slept"])
    # a loop that stops is one only when it covers at least half of the reply
    assert is_degenerate(["x"] * 14 + "then it ended well".split())
    assert not is_degenerate(["x"] * 14 + ("and the reply goes on with many different words after the short "
                                           "stutter near its start").split())
    # ordinary replies are not loops, even with repeated words or a counting list
    assert not is_degenerate("The capital of France is Paris. Paris is also the largest city of France.".split())
    assert not is_degenerate("1 . 1 2 . 2 3 . 3 4 . 4 5 . 5".split())
    assert not is_degenerate([])
    with_period = find_loop([1, 2, 3] * 5, min_span=6)
    assert (with_period.start, with_period.n, with_period.span) == (0, 3, 15)


def test_agreement_counts_reference_positions_and_its_end():
    assert token_agreement([1, 2, 3], True, [1, 2, 3], True) == (4, 4)  # the end-of-sequence position counts
    assert token_agreement([1, 2], False, [1, 2, 3], True) == (2, 4)  # shorter reply: missing positions mismatch
    assert token_agreement([9, 2, 3], True, [1, 2, 3], True) == (3, 4)  # positional, not prefix
    assert token_agreement(list(range(40)), False, list(range(40)), False) == (16, 16)  # first 16 only
    assert token_agreement([], True, [], True) == (1, 1)
    assert token_agreement([5] * 20, False, list(range(20)), False, first=4) == (0, 4)


def test_batched_greedy_matches_one_at_a_time_and_the_chat(tiny_model, tiny_tokenizer):
    prompts = [" ".join(f"w{(i * 7 + j * 3) % 120 + 4}" for j in range(1 + i % 5)) for i in range(9)]
    single = greedy_replies(tiny_model, tiny_tokenizer, prompts, max_new_tokens=10, batch_size=1)
    assert [reply_text(tiny_tokenizer, r.tokens) for r in single] == [
        reply(tiny_model, tiny_tokenizer, p, max_new_tokens=10) for p in prompts]
    # make a token the model emits mid-reply its end-of-sequence, so rows end early and leave the batch
    stop = single[0].tokens[3]
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = stop
    one = greedy_replies(model, tiny_tokenizer, prompts, max_new_tokens=10, batch_size=1)
    many = greedy_replies(model, tiny_tokenizer, prompts, max_new_tokens=10, batch_size=4)
    assert [r.tokens for r in many] == [r.tokens for r in one] and [r.ended for r in many] == [r.ended for r in one]
    assert any(r.ended for r in one) and all(stop not in r.tokens for r in one)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_replies(tiny_model, tiny_tokenizer, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1"):
        greedy_replies(tiny_model, tiny_tokenizer, ["w1", " "])


def test_batched_greedy_on_opt(tiny_opt_model, tiny_tokenizer):
    prompts = ["w1 w2", "w3", "w4 w5 w6 w7"]
    one = greedy_replies(tiny_opt_model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert [r.tokens for r in greedy_replies(tiny_opt_model, tiny_tokenizer, prompts, max_new_tokens=6)] == [
        r.tokens for r in one]


def test_report_scores_agreement_and_reference_checks(tiny_model, tiny_tokenizer):
    ref = chat_fidelity(tiny_model, tiny_tokenizer, prompts=TINY, max_new_tokens=16)
    assert ref.agreement is None and len(ref.rows) == 5
    # keys the tiny model really produced: those prompts pass, the others fail
    keyed = _set(*[(r.prompt, [r.reply.split()[0]] if i % 2 == 0 else ["w127"]) for i, r in enumerate(ref.rows)])
    rep = chat_fidelity(tiny_model, tiny_tokenizer, prompts=keyed, max_new_tokens=16)
    assert [r.passed for r in rep.rows] == [True, False, True, False, True] and rep.score == pytest.approx(0.6)
    assert rep.degeneration == sum(is_degenerate(r.tokens) for r in rep.rows) / 5
    same = chat_fidelity(tiny_model, tiny_tokenizer, prompts=TINY, max_new_tokens=16, reference=ref)
    assert same.agreement == 1.0 and all(r.agreement == 1.0 for r in same.rows)
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1)  # a different model answers differently
    diff = chat_fidelity(other, tiny_tokenizer, prompts=TINY, max_new_tokens=16, reference=ref)
    assert 0 <= diff.agreement < 1 and diff.protocol["sha256"] == ref.protocol["sha256"]
    assert diff.regressions(ref) == []  # TINY's keys are never produced: nothing to lose
    back = FidelityReport.from_dict(json.loads(json.dumps(diff.to_dict())))
    assert back.rows == diff.rows and back.agreement == diff.agreement
    text = diff.summary()
    assert "score" in text and "agreement" in text and "degeneration" in text and "max new tokens 16" in text
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat_fidelity(tiny_model, tiny_tokenizer, prompts=TINY, max_new_tokens=20, reference=ref)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 16"):
        chat_fidelity(tiny_model, tiny_tokenizer, prompts=TINY, max_new_tokens=8)


def test_progress_callback_and_cached_replies(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path))
    seen = []
    chat_fidelity(tiny_model, tiny_tokenizer, prompts=TINY, max_new_tokens=16, batch_size=2,
                  callback=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    texts = [i.prompt for i in TINY.items]
    first = cached_greedy_replies(tiny_model, tiny_tokenizer, texts, max_new_tokens=16)
    again = cached_greedy_replies(tiny_model, tiny_tokenizer, texts, max_new_tokens=16)
    assert first.generated and not again.generated and again.replies == first.replies
    a = chat_fidelity(tiny_model, tiny_tokenizer, prompts=TINY, max_new_tokens=16, cache=True)
    assert [r.tokens for r in a.rows] == [r.tokens for r in first.replies]


def test_prompt_files_and_the_builtin_set(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "w1 w2", "keys": ["w3"]}\n\n{"prompt": "w4", "keys": ["w5", "w6"], "kind": "x"}\n')
    pset = load_prompts(good)
    assert pset.name == "p.jsonl" and len(pset) == 2 and pset.items[1].keys == ("w5", "w6")
    assert len(pset.sha256) == 64 and pset.sha256 != _set(("w1 w2", ["w3"])).sha256
    bad_lines = {
        '{"prompt": "a", "keys": ["b"]}\nnot json\n': "line 2 is not valid JSON",
        '{"prompt": "a"}\n': "line 1: 'keys' must be a non-empty list",
        '{"prompt": "", "keys": ["b"]}\n': "line 1: 'prompt' must be a non-empty string",
        '{"prompt": "a", "key": ["b"]}\n': "line 1 has unknown field",
        '["a", "b"]\n': "line 1 must be a JSON object",
        '{"prompt": "a", "keys": ["b", 3]}\n': "line 1: 'keys'",
        '\n\n': "holds no prompts",
    }
    for i, (content, message) in enumerate(bad_lines.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            load_prompts(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    builtin = builtin_prompts()
    assert builtin.name == "builtin-v1" and len(builtin) >= 48
    assert {i.kind for i in builtin.items} == {"fact", "arithmetic", "definition", "instruction"}
    assert len({i.prompt for i in builtin.items}) == len(builtin)


def test_eval_cli_chat_fidelity(tiny_folder, tiny_text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))
    from flexigpt.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt, "keys": list(p.keys)}) + "\n" for p in TINY.items))
    base = ["eval", "--model", tiny_folder, "--data", str(tiny_text_file), "--windows", "1", "--seq-len", "16"]
    assert main(base + ["--prompts", str(prompts), "--fidelity-max-new-tokens", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "ppl" in out and out["data"] == str(tiny_text_file)  # the perplexity fields are unchanged
    fid = out["chat_fidelity"]
    assert set(fid) >= {"score", "agreement", "degeneration", "protocol", "rows", "by_kind"}
    assert fid["by_kind"] == {"other": {"passed": fid["passed"], "prompts": 5}}  # the file gives no kinds
    assert fid["protocol"]["prompt_set"] == "p.jsonl" and fid["protocol"]["size"] == 5 and fid["agreement"] is None
    assert main(base + ["--chat-fidelity", "--prompts", str(prompts), "--fidelity-max-new-tokens", "16",
                        "--reference", tiny_folder]) == 0
    human = capsys.readouterr().out
    assert "chat fidelity: score" in human and "agreement 1.000" in human and "sha256" in human
    assert "answered by kind: other " in human and "(reference " in human
    assert main(base + ["--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--chat-fidelity", "--fidelity-max-new-tokens", "4"]) == 2
    assert "max_new_tokens must be an integer >= 16" in capsys.readouterr().err


def _report(kinds_passed, sha="s"):
    rows = [FidelityRow(prompt=f"p{i}", keys=("k",), kind=k, reply="", tokens=(), ended=True, passed=ok,
                        degenerate=False) for i, (k, ok) in enumerate(kinds_passed)]
    return FidelityReport(score=sum(ok for _, ok in kinds_passed) / len(rows), agreement=None, degeneration=0.0,
                          protocol={"sha256": sha, "max_new_tokens": 48}, rows=rows)


def test_answered_by_kind_counts_each_kind_in_the_sets_order():
    built = _report([("fact", False), ("arithmetic", True), ("fact", True), ("", False), ("fact", False)])
    original = _report([("fact", True), ("arithmetic", True), ("fact", True), ("", True), ("fact", True)])
    assert built.by_kind() == {"fact": (1, 3), "arithmetic": (1, 1), "other": (0, 1)}
    assert list(built.by_kind()) == ["fact", "arithmetic", "other"]
    assert built.to_dict(rows=False)["by_kind"]["fact"] == {"passed": 1, "prompts": 3}
    assert built.kinds_line(original) == ("answered by kind: fact 1/3 (reference 3/3), arithmetic 1/1 "
                                          "(reference 1/1), other 0/1 (reference 1/1)")
    assert built.kinds_line() == "answered by kind: fact 1/3, arithmetic 1/1, other 0/1"
    with pytest.raises(ValueError, match="same prompt set"):
        built.kinds_line(_report([("fact", True)] * 5, sha="another"))
