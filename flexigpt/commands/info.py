"""``info``: what is this model? Architecture, blocks, width, parameters."""
from __future__ import annotations

import argparse

HELP = "show a model's architecture summary (blocks, width, parameters, chat template)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2), a folder, or a hub id")


def run(args: argparse.Namespace) -> dict:
    # imported when the command runs, so `--help` stays fast
    from flexigpt.models import load_model, model_info

    loaded = load_model(args.model)
    info = model_info(loaded.model, loaded.tokenizer)
    info.update({"model": args.model, "source": loaded.source, "load_seconds": round(loaded.load_seconds, 3)})
    return info
