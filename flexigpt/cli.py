"""The command line: ``python -m flexigpt SUBCOMMAND``.

Each subcommand lives in ``flexigpt/commands/<name>.py`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> dict | None``. The dict is the command's JSON
result: with ``--json`` it is printed as the last line of stdout. Bad input (``ValueError``,
``FileNotFoundError``) prints ``error: ...`` on stderr and exits with code 2, no traceback.
This is the only entry point that configures logging.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

# The CLI is a contract: these names are stable. Modules are imported only for the chosen command.
COMMANDS = ("info", "analyze", "plan", "build", "eval", "chat")


def _command_module(name: str):
    return importlib.import_module(f"flexigpt.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flexigpt",
        description="FlexiGPT Studio: score, plan, build, recover and evaluate depth-pruned language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = _command_module(name)
        except ModuleNotFoundError as err:
            if err.name != f"flexigpt.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        p.set_defaults(_module=module)
    return parser


def emit(result: dict | None, as_json: bool, human: str | None = None) -> None:
    """Print a result: JSON (last stdout line) or a human summary."""
    if result is None:
        return
    if as_json:
        print(json.dumps(result, default=str))
    elif human is not None:
        print(human)
    else:
        for key, value in result.items():
            if isinstance(value, (dict, list)) and len(json.dumps(value, default=str)) > 200:
                continue
            print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers is heavy: imported on first use
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep stderr for errors; --verbose shows progress
        hf_logging.set_verbosity_error()
    try:
        result = args._module.run(args)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, tuple):
        result, human = result
    else:
        human = None
    emit(result, args.json, human)
    return 0


def main_entry() -> None:
    """Console-script entry point (``flexigpt ...``)."""
    sys.exit(main())
