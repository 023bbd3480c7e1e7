"""Shared fixtures: tiny random models built in code (no download), and the embedded model."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub call fails fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model or long tests (run in CI, kept few)")
    config.addinivalue_line("markers", "browser: drives the app in headless Chromium")
    config.addinivalue_line("markers", "gpu: needs CUDA")


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def _tiny_llama_base():
    from tiny import tiny_llama

    return tiny_llama()


@pytest.fixture
def tiny_model(_tiny_llama_base):
    """A 6-block GQA LLaMA (hidden 64, vocab 128); each test gets its own copy."""
    return copy.deepcopy(_tiny_llama_base)


@pytest.fixture(scope="session")
def _tiny_opt_base():
    from tiny import tiny_opt

    return tiny_opt()


@pytest.fixture
def tiny_opt_model(_tiny_opt_base):
    """A 4-block OPT (tied embeddings, biases); each test gets its own copy."""
    return copy.deepcopy(_tiny_opt_base)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """An in-memory word-level tokenizer (128 words, a one-line chat template), no files, no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(124)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    t.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return t


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    """A .txt file of 4000 words from the tiny vocabulary (deterministic)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 124, (4000,), generator=g).tolist()
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(" ".join(f"w{i}" for i in ids))
    return path


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from flexigpt.models import load_model

    return load_model("default")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, _tiny_llama_base, tiny_tokenizer):
    """A real checkpoint folder of the 6-block tiny LLaMA: the app and the CLI load it like any model."""
    path = tmp_path_factory.mktemp("tiny-model")
    _tiny_llama_base.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def request_(request):
    """A stand-in for gr.Request (handlers only read ``session_hash``); the visitor's work is freed after."""
    from types import SimpleNamespace

    from app import session

    key = f"test-{request.node.name}"
    yield SimpleNamespace(session_hash=key)
    session.drop(key)
