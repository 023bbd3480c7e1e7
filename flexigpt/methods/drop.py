"""Method ``drop`` (ShortGPT): remove the pruned blocks; the rest run unchanged.

``layer_map`` is the increasing list of kept blocks. Recovered with kept-block LoRA it is the
ShortGPT + LoRA baseline (``Plan.kept_lora_rank``).

Paper: ShortGPT (Men et al., 2024), https://arxiv.org/abs/2403.03853
"""
from __future__ import annotations

from flexigpt.methods.base import Method

__all__ = ["Drop"]


class Drop(Method):
    name = "drop"
    label = "drop (ShortGPT)"
    description = "remove the pruned blocks; the rest run unchanged (recovered with LoRA on the kept blocks)"
