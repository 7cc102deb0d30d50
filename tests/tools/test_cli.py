"""Freeze the command line: flags do not grow by accident (torchtitan's habit). The commands people
and scripts type keep working: `mm1 <command> --help`, `python -m tools.bench.<name> --help`, the
loopback servers' `--help`; and `mm1` starts without importing the libraries its commands use."""

from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
# python -m entry points with an argparse `main(argv)`: the benches, the loopback servers, the tiny models
ENTRY_POINTS = sorted(
    [f"tools.bench.{p.stem}" for p in (ROOT / "tools" / "bench").glob("*.py") if p.stem != "__init__"]
    + ["tools.servers.s3", "tools.servers.chat", "tools.demo.tiny_models"])

FROZEN = {
    "curate": ["--address", "--allow-empty", "--no-progress", "--output", "--restart", "--retry-failed", "--workers",
               "recipe"],
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


def test_every_command_has_help(capsys):
    for command in [None, *FROZEN]:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"] if command else ["--help"])
        assert done.value.code == 0, command
        assert capsys.readouterr().out.startswith(f"usage: mm1 {command or ''}".rstrip()), command


def test_mm1_starts_without_its_commands_libraries():
    """`mm1 --help` stays well under 0.5 s: the subcommands import what they need when they run."""
    code = ("import sys, tools.cli; "
            "heavy = sorted(m for m in ('curate', 'train', 'dask', 'distributed', 'pyarrow', 'pydantic', 'yaml', "
            "'torch', 'numpy') if m in sys.modules); print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_answer_help(module, capsys):
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert any(isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"
               for n in ast.parse(source).body), f"{module}: no `if __name__ == '__main__':` block"
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage:"), module
