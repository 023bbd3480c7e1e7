"""How good, how big, how fast? Perplexity, side-by-side speed, and zero-shot accuracy.

Perplexity is token-level: the mean negative log-likelihood of every next-token prediction in
each window (every position except the first), exponentiated. Speed is measured for several
models in one process with interleaved repeats (so machine noise hits all of them alike) and
reported as ratios to the first model, the original: FlexiGPT's shared blocks still execute,
so its runtime is about the base model's (the paper reports about 105 %). Zero-shot accuracy
goes through lm-eval-harness (the paper's set: ARC-e, ARC-c, PIQA, WinoGrande, HellaSwag).
Always import this module as ``from flexigpt import evaluate`` so it never shadows the
``evaluate`` package that lm-eval uses.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from flexigpt.models import parameter_count

log = logging.getLogger(__name__)

__all__ = [
    "PAPER_TASKS",
    "PerplexityResult",
    "SpeedReport",
    "SpeedRow",
    "ZeroShotResult",
    "compare_speed",
    "latency",
    "perplexity",
    "zero_shot",
]

PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag")
# lm-eval folder of each paper task: indexing only these takes about 1 s instead of 10+ s for all.
_TASK_DIRS = {"arc_easy": "arc", "arc_challenge": "arc", "piqa": "piqa", "winogrande": "winogrande", "hellaswag": "hellaswag"}


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``tokens`` is the number of predicted tokens."""

    ppl: float
    nll: float
    tokens: int
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll": self.nll, **self.protocol}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: nn.Module, windows: Any, *, batch_size: int = 8, progress: bool = False) -> PerplexityResult:
    """Token-level perplexity over fixed windows.

    Args:
        model: a causal LM.
        windows: ``flexigpt.data.Windows`` (its protocol is reported) or an ``(N, T)`` int64 tensor.
        batch_size: windows per forward pass.
        progress: show a tqdm bar.

    Returns:
        PerplexityResult; ``protocol`` is ``windows.protocol()`` plus ``predicted_tokens``.

    Raises:
        ValueError: bad windows or batch size.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ids = getattr(windows, "input_ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError("windows must be flexigpt.data.Windows or a non-empty (N, T>=2) int64 tensor")
    if hasattr(windows, "protocol"):
        protocol = windows.protocol()
    else:
        protocol = {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.numel()), "level": "token"}
    device, was_training = _device(model), model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, ids.shape[0], batch_size), disable=not progress, desc="Perplexity"):
                batch = ids[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # (B, T-1, V)
                target = batch[:, 1:]
                total += float(F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum"))
                count += target.numel()
    finally:
        model.train(was_training)
    nll = total / count
    ppl = math.exp(nll) if nll < 700 else float("inf")
    return PerplexityResult(ppl=ppl, nll=nll, tokens=count, protocol={**protocol, "predicted_tokens": count})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency(model: nn.Module, input_ids: torch.Tensor, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one forward pass (no KV cache) over ``input_ids`` ``(B, T)``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats!r}, warmup={warmup!r}")
    device = _device(model)
    ids = input_ids.to(device)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        _sync(device)

    for _ in range(warmup):
        forward()
    return statistics.median(_timed(forward) for _ in range(repeats))


@dataclass(frozen=True)
class SpeedRow:
    """One model's speed. Ratios are relative to the first model compared (1.0 for it):
    ``forward_ratio`` > 1 means slower forward passes, ``throughput_ratio`` < 1 fewer tokens/s."""

    name: str
    forward_s: float
    tokens_per_s: float
    forward_ratio: float
    throughput_ratio: float
    parameters: int
    forward_spread: float = 0.0  # (max - min) / median over the repeats
    generate_spread: float = 0.0


@dataclass(frozen=True)
class SpeedReport:
    rows: tuple[SpeedRow, ...]
    protocol: dict

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [vars(r) for r in self.rows], **self.protocol}

    def to_frame(self):
        # pandas is heavy: imported on first use
        import pandas as pd

        return pd.DataFrame([vars(r) for r in self.rows])


def _prompt_ids(tokenizer: Any, prompt: str | None, prompt_tokens: int) -> torch.Tensor:
    text = prompt or (
        "Depth pruning removes whole transformer blocks from a language model, and weight sharing lets "
        "the remaining blocks stand in for the removed ones with small low-rank adapters. "
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the prompt {text[:40]!r} tokenises to nothing")
    if prompt is None:  # repeat the built-in text up to the requested length
        ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    return torch.tensor([ids], dtype=torch.long)


def compare_speed(
    models: dict[str, nn.Module],
    tokenizer: Any,
    *,
    prompt: str | None = None,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
) -> SpeedReport:
    """Forward latency and greedy generation speed of several models, side by side.

    Every repeat measures each model once, in order, so slow phases of a shared machine hit all
    models alike; the median over repeats is reported. Generation always produces exactly
    ``new_tokens`` tokens (end-of-sequence suppressed) and its tokens/s include the prefill.

    Args:
        models: ``{name: model}``; the first is the reference (the original model).
        tokenizer: tokenises the prompt.
        prompt: the prompt text (default: a built-in English text repeated to ``prompt_tokens``).
        prompt_tokens: prompt length for the built-in text.
        new_tokens: tokens generated per measurement.
        repeats: measured rounds; warmup: unmeasured rounds first.

    Raises:
        ValueError: no models, or non-positive lengths/repeats.
    """
    if not models:
        raise ValueError("compare_speed needs at least one model")
    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 1),
                             ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    ids = _prompt_ids(tokenizer, prompt, prompt_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(model: nn.Module) -> tuple[float, float]:
        device = _device(model)
        x = ids.to(device)
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids=x, use_cache=False)
            _sync(device)
            fwd = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad)
            _sync(device)
            gen = time.perf_counter() - start
        return fwd, gen

    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for round_ in range(warmup + repeats):
            for name, m in models.items():
                measured = run(m)
                if round_ >= warmup:
                    times[name].append(measured)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    rows, first = [], None
    def spread(values: list[float]) -> float:
        return (max(values) - min(values)) / statistics.median(values)

    for name, model in models.items():
        fwd = statistics.median(t[0] for t in times[name])
        tps = new_tokens / statistics.median(t[1] for t in times[name])
        first = first or (fwd, tps)
        rows.append(SpeedRow(name=name, forward_s=fwd, tokens_per_s=tps, forward_ratio=fwd / first[0],
                             throughput_ratio=tps / first[1], parameters=parameter_count(model),
                             forward_spread=spread([t[0] for t in times[name]]),
                             generate_spread=spread([t[1] for t in times[name]])))
    device = _device(next(iter(models.values())))
    protocol = {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                "batch_size": 1, "device": str(device), "threads": torch.get_num_threads(),
                "statistic": "median", "generation": "greedy, KV cache, tokens/s include prefill"}
    return SpeedReport(rows=tuple(rows), protocol=protocol)


@dataclass(frozen=True)
class ZeroShotResult:
    """``scores[task]`` maps metric names (``acc``, ``acc_norm``, ``acc_stderr``...) to values."""

    scores: dict
    protocol: dict

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, **self.protocol}


def _task_manager(tasks: Sequence[str], include_path: str | Path | None):
    # lm_eval is heavy: imported on first use
    import lm_eval
    from lm_eval.tasks import TaskManager

    builtin = Path(lm_eval.__file__).resolve().parent / "tasks"
    paths = [str(Path(include_path).resolve())] if include_path is not None else []
    paths += sorted({str(builtin / _TASK_DIRS[t]) for t in tasks if t in _TASK_DIRS})
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=paths or None, include_defaults=True)  # indexes every task (slow)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; the paper's set is {', '.join(PAPER_TASKS)}")
    return manager


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int = 0,
    include_path: str | Path | None = None,
    seed: int = 0,
) -> ZeroShotResult:
    """Zero-shot multiple-choice accuracy through lm-eval-harness (``HFLM`` over this model).

    Args:
        model: a causal LM (any module with a Hugging Face ``config``).
        tokenizer: its tokenizer.
        tasks: lm-eval task names, e.g. ``PAPER_TASKS``.
        limit: evaluate at most this many questions per task (quick looks; not comparable).
        batch_size: lm-eval batch size.
        num_fewshot: 0 for zero-shot.
        include_path: a folder of extra task yamls (local tasks).
        seed: lm-eval's random seeds (it sets the global python/numpy/torch seeds).

    Raises:
        ValueError: lm-eval missing, an unknown task, or a task whose data cannot be loaded
            (offline without a local datasets cache), naming the task.
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    try:
        # lm_eval is heavy: imported on first use
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import get_task_dict
    except ImportError as err:
        raise ValueError("zero-shot evaluation needs lm-eval (pip install lm-eval==0.4.13)") from err
    tasks = list(dict.fromkeys(tasks))
    manager = _task_manager(tasks, include_path)
    for task in tasks:  # load each task's data first, so a failure names the task
        try:
            get_task_dict([task], manager)
        except Exception as err:
            raise ValueError(
                f"zero-shot task {task!r} could not load its data ({type(err).__name__}: {err}); "
                "it needs network access or a local datasets cache"
            ) from err
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    try:
        out = simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            bootstrap_iters=100, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        raw = out["results"].get(task, {})
        scores[task] = {k.split(",")[0]: float(v) for k, v in raw.items()
                        if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    samples = {t: int(out.get("n-samples", {}).get(t, {}).get("effective", 0)) for t in tasks}
    protocol = {"harness": f"lm-eval {lm_eval.__version__}", "num_fewshot": num_fewshot, "limit": limit, "samples": samples,
                "metrics": "acc (raw log-likelihood), acc_norm (length-normalised)"}
    return ZeroShotResult(scores=scores, protocol=protocol)
