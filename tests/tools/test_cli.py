"""Freeze the command line: flags do not grow by accident (torchtitan's habit)."""

from __future__ import annotations

import argparse

from tools.cli import build_parser

FROZEN = {
    "curate": ["--address", "--no-progress", "--output", "--restart", "--retry-failed", "--workers", "recipe"],
    "stats": ["--json", "out"],
    "verify": ["out"],
    "demo": ["--dir"],
    "export": ["--dtype", "--no-hf", "checkpoint", "out"],
    "report": ["--output", "--samples", "--seed", "out"],
    "train": ["--override", "--run-dir", "--steps", "recipe"],
}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names.extend(action.option_strings[-1:] or [action.dest])
    return sorted(names)


def test_cli_is_frozen():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    got = {name: _options(p) for name, p in sub.choices.items()}
    assert got == FROZEN, "the CLI changed: update FROZEN deliberately if that was meant"
    assert _options(parser) == ["--verbose", "command"]
