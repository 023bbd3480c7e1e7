"""FlexiGPT Studio: score transformer blocks, plan which to prune, build weight-sharing
replacements (FlexiGPT, NAACL 2025), recover, evaluate, chat and export.

Paper: https://arxiv.org/abs/2501.14713. The library never imports gradio or plotly.
"""
from flexigpt.arch import arch_of, block_linears, get_blocks
from flexigpt.data import Windows, load_text, token_windows
from flexigpt.models import LoadedModel, fingerprint, load_model, model_info, parameter_count

__version__ = "0.1.0"

__all__ = [
    "LoadedModel",
    "Windows",
    "arch_of",
    "block_linears",
    "fingerprint",
    "get_blocks",
    "load_model",
    "load_text",
    "model_info",
    "parameter_count",
    "token_windows",
]
