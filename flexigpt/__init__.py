"""FlexiGPT Studio: score transformer blocks, plan which to prune, build weight-sharing
replacements (FlexiGPT, NAACL 2025), recover, evaluate, chat and export.

Paper: https://arxiv.org/abs/2501.14713. The library never imports gradio or plotly.

Heavy submodules are imported lazily, so ``import flexigpt`` stays cheap; the names below are
the public API the app and the CLI use. Import evaluation as ``from flexigpt import evaluate``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # models and data
    "LoadedModel": "flexigpt.models", "load_model": "flexigpt.models", "model_info": "flexigpt.models",
    "fingerprint": "flexigpt.models", "parameter_count": "flexigpt.models",
    "arch_of": "flexigpt.arch", "get_blocks": "flexigpt.arch", "block_linears": "flexigpt.arch",
    "Windows": "flexigpt.data", "load_text": "flexigpt.data", "token_windows": "flexigpt.data",
    # analysis
    "analyze": "flexigpt.analysis", "score_blocks": "flexigpt.scoring", "choose_donors": "flexigpt.sharing",
    # plan and surgery
    "Plan": "flexigpt.plan", "AdapterSpec": "flexigpt.plan", "plan_from_scores": "flexigpt.plan",
    "plan_from_analysis": "flexigpt.plan", "extend_plan": "flexigpt.plan", "foldgpt_plan": "flexigpt.plan",
    "apply_plan": "flexigpt.surgery", "attach_kept_lora": "flexigpt.trainable",
    "Method": "flexigpt.methods", "register": "flexigpt.methods", "get_method": "flexigpt.methods",
    "build_model": "flexigpt.pipeline",
    "estimate_params": "flexigpt.params", "measure_params": "flexigpt.params", "matched_lora_rank": "flexigpt.params",
    # recovery, evaluation, chat, export
    "RecoverSpec": "flexigpt.recover", "StepLog": "flexigpt.recover", "recover": "flexigpt.recover",
    "perplexity": "flexigpt.evaluate", "compare_speed": "flexigpt.evaluate",
    "stream_reply": "flexigpt.chat", "reply": "flexigpt.chat",
    "save_compact": "flexigpt.export", "load_compact": "flexigpt.export", "save_merged": "flexigpt.export",
    # beyond the paper
    "draft_model": "flexigpt.speculative", "speculative_generate": "flexigpt.speculative",
    "align_donor": "flexigpt.align", "train_gates": "flexigpt.gates",
}

__all__ = sorted(_EXPORTS)


_RENAMED = {"build_model": "build"}  # public name -> name in its module


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flexigpt' has no attribute {name!r}")
