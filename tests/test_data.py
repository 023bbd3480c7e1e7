"""Text sources and deterministic token windows with a fixed held-out split."""
from __future__ import annotations

import json

import pytest
import torch

from flexigpt.data import HELDOUT_FRACTION, load_text, token_windows


def test_default_text_is_offline_and_large():
    text = load_text("default")
    assert len(text) > 300_000 and "assert" in text


def test_windows_are_deterministic_and_split(tiny_tokenizer, tiny_text_file):
    ref = str(tiny_text_file)
    a = token_windows(tiny_tokenizer, ref, seq_len=16, split="train")
    b = token_windows(tiny_tokenizer, ref, seq_len=16, split="train")
    assert torch.equal(a.input_ids, b.input_ids)
    held = token_windows(tiny_tokenizer, ref, seq_len=16, split="heldout")
    assert a.input_ids.shape[1] == 16 and held.num_windows >= 1
    stream = tiny_tokenizer(tiny_text_file.read_text(), add_special_tokens=False)["input_ids"]
    cut = int(len(stream) * (1 - HELDOUT_FRACTION))
    # train windows come from before the cut, held-out windows from after it, for any window length
    for seq_len in (7, 16, 50):
        tr = token_windows(tiny_tokenizer, ref, seq_len=seq_len, split="train").input_ids.reshape(-1).tolist()
        ho = token_windows(tiny_tokenizer, ref, seq_len=seq_len, split="heldout").input_ids.reshape(-1).tolist()
        assert tr == stream[: len(tr)] and len(tr) <= cut
        assert ho == stream[cut: cut + len(ho)]
    p = held.protocol()
    assert p["split"] == "heldout" and p["seq_len"] == 16 and p["level"] == "token" and p["bos"] is False


def test_bos_and_max_windows(tiny_tokenizer, tiny_text_file):
    w = token_windows(tiny_tokenizer, str(tiny_text_file), seq_len=8, max_windows=3, bos=True)
    assert w.input_ids.shape == (3, 8)
    assert (w.input_ids[:, 0] == tiny_tokenizer.bos_token_id).all()


def test_jsonl_source(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "w1 w2 w3 w4 " * 20}) for _ in range(5)))
    w = token_windows(tiny_tokenizer, str(path), seq_len=10)
    assert w.num_windows > 0


@pytest.mark.parametrize(
    "content, suffix, pattern",
    [
        (b"", ".txt", "is empty"),
        (b"   \n", ".txt", "is empty"),
        (b"\x00\x01\x02binary", ".txt", "looks binary"),
        (b"\xff\xfe\xfa", ".txt", "not UTF-8"),
        (b"{bad json", ".jsonl", "line 1 is not valid JSON"),
        (b"hello", ".csv", "expected .txt or .jsonl"),
    ],
)
def test_bad_files_are_refused_by_name(tmp_path, content, suffix, pattern):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        load_text(str(path))


def test_bad_settings(tiny_tokenizer, tiny_text_file):
    ref = str(tiny_text_file)
    with pytest.raises(ValueError, match="does not exist"):
        load_text("/no/such/file.txt")
    with pytest.raises(ValueError, match="seq_len must be"):
        token_windows(tiny_tokenizer, ref, seq_len=0)
    with pytest.raises(ValueError, match="exceeds the model's context length 64"):
        token_windows(tiny_tokenizer, ref, seq_len=128, max_len=64)
    with pytest.raises(ValueError, match="max_windows must be a positive integer, got 0"):
        token_windows(tiny_tokenizer, ref, seq_len=8, max_windows=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tiny_tokenizer, ref, seq_len=4000, split="heldout")
    with pytest.raises(ValueError, match="hf:NAME:SPLIT"):
        load_text("hf:onlyname")


def test_hf_dataset_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"data 'hf:nobody/nothing:train' could not be loaded"):
        load_text("hf:nobody/nothing:train")


def test_second_embedded_corpus_differs_in_style():
    text = load_text("shakespeare")
    assert "ROMEO" in text and "PROSPERO" in text and len(text) > 200_000
    assert "def " not in text
