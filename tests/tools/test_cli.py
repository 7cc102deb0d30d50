"""Freeze the command line: flags do not grow by accident (torchtitan's habit). The commands people
and scripts type keep working: `mm1 <command> --help`, `python -m tools.bench.<name> --help`, the
loopback servers' `--help`; and `mm1` starts without importing the libraries its commands use."""

from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.engine.driver import plan_job
from curate.recipe import SCHEDULER_ENV, load_recipe
from curate.sources.base import build_source
from tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
# python -m entry points with an argparse `main(argv)`: the benches, the loopback servers, the tiny models
ENTRY_POINTS = sorted(
    [f"tools.bench.{p.stem}" for p in (ROOT / "tools" / "bench").glob("*.py") if p.stem != "__init__"]
    + ["tools.servers.s3", "tools.servers.chat", "tools.demo.tiny_models", "tools.reference"])

FROZEN = {
    "curate": ["--address", "--allow-empty", "--limit", "--no-progress", "--output", "--override", "--restart",
               "--retry-failed", "--workers", "recipe"],
    "stats": ["--json", "--top-domains", "out"],
    "verify": ["out"],
    "sources": ["kind"],
    "stages": ["kind"],
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


def test_curate_overrides_and_checks_inputs_at_load(tmp_path, capsys, monkeypatch):
    """`mm1 curate --override` sets recipe keys as `mm1 train`'s does; an input path that does not
    exist fails at load (exit 2, at once), naming the key and the absolute path tried from the
    working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsources: [{kind: image_folder, name: a, path: imgs}]\n"
                      "stages: [{kind: image}]\noutput: {path: out}\n")
    assert main(["curate", str(recipe), "--override", "stages.0.image_size=0"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.image.image_size: Input should be greater than or equal to 1 (got 0)" in err
    started = time.monotonic()
    assert main(["curate", str(recipe), "--override", "sources.0.path=nowhere",
                 "--override", "sources.0.captions=caps.csv"]) == 2
    assert time.monotonic() - started < 2
    err = capsys.readouterr().err
    assert f"  sources.0.path: {tmp_path / 'nowhere'}\n" in err
    assert f"  sources.0.captions: {tmp_path / 'nowhere' / 'caps.csv'}\n" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_shipped_cluster_recipe_takes_the_scheduler_from_address_or_environment(tmp_path, capsys, monkeypatch):
    """A shipped cluster recipe copied as is, with neither --address nor the environment set, fails
    at once saying so; the environment variable or --address gives the scheduler."""
    for name in SCHEDULER_ENV:
        monkeypatch.delenv(name, raising=False)
    shipped = ROOT / "recipes" / "curate" / "pairs-cluster.yaml"
    assert main(["curate", str(shipped)]) == 2
    err = capsys.readouterr().err
    assert "cluster.address is 'env', but neither MM1_SCHEDULER nor DASK_SCHEDULER_ADDRESS is set" in err
    assert "--address" in err and "Traceback" not in err
    (tmp_path / "urls.csv").write_text("url,caption\n")
    inputs = {"sources.0.path": str(tmp_path / "urls.csv")}
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.5:8786")
    assert load_recipe(shipped, inputs).cluster.address == "tcp://10.0.0.5:8786"
    recipe = load_recipe(shipped, {**inputs, "cluster.address": "tcp://10.0.0.6:8786"})  # what --address sets
    assert recipe.cluster.address == "tcp://10.0.0.6:8786"


def test_limit_is_a_dry_run_of_the_first_inputs_into_its_own_output(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):  # the source reads bytes and captions; nothing decodes them before the image stage
        (folder / f"{i}.jpg").write_bytes(b"not decoded here")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nsources: [{{kind: image_folder, name: a, path: {folder}, files_per_partition: 2}}]\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    full = load_recipe(path)
    recipe = full.limited(3)
    assert recipe.output.path == f"{tmp_path / 'out'}.limit-3" and recipe.hash() != full.hash()
    job = plan_job(recipe)  # the listing, on the client: the partitions that hold the first 3 inputs
    source = build_source(recipe.sources[0])
    ids = [i for part in job.partitions for table in source.read(part, 1) for i in table.column("id").to_pylist()]
    assert ids == ["a:0.jpg", "a:1.jpg", "a:2.jpg"] and len(job.partitions) == 2
    assert main(["curate", str(path), "--limit", "0"]) == 2
    assert "--limit 0: give a number of inputs, 1 or more" in capsys.readouterr().err
