"""Loaders for the local lm-eval test tasks: a few multiple-choice questions in jsonl, no network."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_facts(**_metadata):
    """Eight easy general-knowledge questions (for a real instruction-tuned model)."""
    return _load("facts.jsonl")


def load_words(**_metadata):
    """Six questions over the tiny test vocabulary w0..w123 (for tiny random models)."""
    return _load("words.jsonl")
