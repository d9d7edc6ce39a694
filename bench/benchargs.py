"""What the ``bench/`` scripts share on the command line (not a benchmark itself).

Each script parses with ``bagjax.cli.ArgumentParser`` (a usage mistake is one ``error: ...`` line, exit status 1)
and checks its numbers with ``at_least`` right after parsing, before any model is built or anything is timed.
"""
from __future__ import annotations

import argparse


def at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, **minimums: int) -> None:
    """``parser.error`` for the first argument below its minimum: ``at_least(p, args, batch=1)`` checks ``--batch``
    (every item of a list; an argument left at None is not checked)."""
    for name, low in minimums.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < low:
                parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {v}")


def positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """``parser.error`` for the first of ``names`` (float arguments, e.g. a compute budget) that is not above 0
    (an argument left at None is not checked)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value:g}")
