"""CLI subcommands, one module each (see ``flexigpt.cli``)."""
