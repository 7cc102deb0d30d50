"""`mm1`'s exit statuses (tools/errors.py): each mistake a user can make is one message on stderr
with exit 2 and no traceback; a run that keeps nothing, or with a stage that drops every row of
at least 20, exits 5 naming the stage; Ctrl-C exits 130 saying how to resume. In process through
`tools.cli.main`, except where the real process is the thing tested (a signal, a module missing at
import)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tools.cli import main
from tools.errors import (EXIT_CODES, EXIT_DAMAGED, EXIT_EMPTY, EXIT_INPUT, EXIT_INTERRUPTED, OPTIONAL_EXTRAS,
                          kept_nothing, missing_extra, retry_kept_nothing)

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = 24  # rows: more than the 20 a stage must see before dropping all of them is judged


def _recipe(tmp: Path, name: str, column: str = "link", **parts) -> str:
    """A url_list recipe over `tmp/urls.csv` (columns link, caption: BLOCKED loopback URLs)."""
    urls = tmp / "urls.csv"
    if not urls.exists():
        with open(urls, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["link", "caption"])
            w.writerows([f"http://127.0.0.1:9/{i}.jpg", f"photo {i}"] for i in range(BLOCKED))
    recipe = {"name": name, "sources": [{"kind": "url_list", "name": "urls", "path": str(urls), "url_column": column}],
              "output": {"path": str(tmp / f"out-{name}")}, **parts}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fails(capsys, argv: list[str], code: int, *says: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for text in says:
        assert text in err, err
    return err


def test_help_shows_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert EXIT_CODES in capsys.readouterr().out
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(OPTIONAL_EXTRAS.values()) <= set(extras)


def test_a_column_not_in_the_file(tmp_path, capsys):
    _fails(capsys, ["curate", _recipe(tmp_path, "badcol", column="url")], EXIT_INPUT,
           f"{tmp_path / 'urls.csv'} has no column 'url'", "['caption', 'link']", "set url_column")


def test_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    _fails(capsys, ["curate", _recipe(tmp_path, "file"), "--output", str(tmp_path / "taken")], EXIT_INPUT,
           f"{tmp_path / 'taken'} is a file, not a folder")


def test_a_bad_byte_size(tmp_path, capsys):
    recipe = _recipe(tmp_path, "mem", cluster={"memory_limit": "2 gigs"})
    _fails(capsys, ["curate", recipe], EXIT_INPUT, "cluster.memory_limit", "expected a byte size", "'2 gigs'")
    assert main(["-v", "curate", recipe]) == EXIT_INPUT  # -v: the traceback too
    assert "Traceback" in capsys.readouterr().err


def test_an_unreachable_scheduler_fails_within_its_timeout(tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    recipe = _recipe(tmp_path, "sched", cluster={"address": address, "connect_timeout_s": 1})
    _fails(capsys, ["curate", recipe], EXIT_INPUT, f"cannot reach the Dask scheduler at {address}",
           "dask scheduler", "cluster.address")


def test_a_missing_optional_extra_names_it(tmp_path):
    """A stage whose extra is not installed fails the recipe's load (exit 2) naming the extra:
    open_clip (clip_score: the clip extra) and spaCy (datatrove's text filters: the text extra).
    The modules are blocked in a fresh interpreter (sys.modules[name] = None), as when absent."""
    clip = _recipe(tmp_path, "clip", stages=[{"kind": "clip_score", "model": "ViT-B-32", "pretrained": None}])
    text = _recipe(tmp_path, "text", stages=[{"kind": "gopher_repetition"}])
    code = ("import sys; sys.modules['open_clip'] = sys.modules['spacy'] = None; from tools.cli import main; "
            f"codes = [main(['curate', r]) for r in ({clip!r}, {text!r})]; print(codes)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == f"[{EXIT_INPUT}, {EXIT_INPUT}]" and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "needs the optional dependency open_clip: pip install 'mm1-pipeline[clip]'" in proc.stderr
    assert "stages.0" in proc.stderr and \
        "gopher_repetition splits words with spaCy, which is not installed: pip install 'mm1-pipeline[text]'" in proc.stderr
    # the trainer's commands name the train extra for the modules it shares with clip
    assert missing_extra(ModuleNotFoundError("no", name="torch"), "train").endswith("'mm1-pipeline[train]'")
    assert missing_extra(ModuleNotFoundError("no", name="torch"), "curate").endswith("'mm1-pipeline[clip]'")


def test_a_run_that_keeps_nothing_names_the_stage(tmp_path, capsys, shared_cluster):
    address = ["--address", shared_cluster.cluster.scheduler_address, "--no-progress"]
    # URLs on 127.0.0.1 without allow_networks: every row download/blocked
    blocked = _recipe(tmp_path, "blocked", stages=[{"kind": "download", "respect_robots_txt": False}])
    _fails(capsys, ["curate", blocked, *address], EXIT_EMPTY,
           f"kept no pair of {BLOCKED} inputs: stage 'download' dropped all {BLOCKED}", "'blocked'",
           "urls:urls.csv#0 (http://127.0.0.1:9/0.jpg)", "--allow-empty")
    err = _fails(capsys, ["curate", blocked, *address, "--allow-empty"], 0, "warning: kept no pair")
    assert "--allow-empty accepts" not in err
    # and `mm1 verify` on that output once its manifest disagrees with its ledger: damage, exit 4
    manifest = tmp_path / "out-blocked" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"inputs": {BLOCKED}', f'"inputs": {BLOCKED + 1}'))
    assert main(["verify", str(manifest.parent)]) == EXIT_DAMAGED
    assert "FAIL ledger: 24 inputs, manifest counts.inputs says 25" in capsys.readouterr().out
    # a filter of image sizes with no stage that decodes the images
    sizes = _recipe(tmp_path, "sizes", stages=[{"kind": "image_size_filter", "min_width": 8}])
    _fails(capsys, ["curate", sizes, *address], EXIT_EMPTY,
           f"stage 'image_size_filter' dropped all {BLOCKED}", "'stage_error'",
           "run the image stage before this filter")


def test_a_stage_that_dropped_all_of_its_rows_is_named(curated, edit_manifest):
    """Every kind of the synthetic output kept rows, yet its manifest says `download` let none of
    the 25 rows that reached it through: that stage is named with its top reason and an example
    from the ledger. At exactly 20 rows too (here with no drops in the ledger to show); not under
    20, nor where one row got through, nor for an output whose manifest records no stage rows."""
    out = curated["out"]
    assert kept_nothing(out, {}) == []

    def timed(**rows: tuple[int, int]) -> None:
        edit_manifest(out, lambda m: m.update(stages={
            name: {"order": i, "pass": "rows", "wall_s": 0.1, "cpu_s": 0.1, "rows_in": n, "rows_out": kept}
            for i, (name, (n, kept)) in enumerate(rows.items())}))

    timed(download=(25, 0), image_filter=(19, 0), lang=(30, 1), caption_filter=(20, 0))
    assert kept_nothing(out, {}) == [
        "stage 'download' dropped all 25 rows that reached it, most for 'http_404' (2), "
        "e.g. laion:5 (https://img.example.com/c.jpg): 404 Not Found",
        "stage 'caption_filter' dropped all 20 rows that reached it, and the ledger records none of its drops"]
    timed(download=(25, 1), image_filter=(19, 0))
    assert kept_nothing(out, {}) == []


def test_a_retry_round_is_judged_on_what_it_retried():
    assert retry_kept_nothing({"round": 1, "retried": 0, "recovered": 0}) == []
    assert retry_kept_nothing({"round": 2, "retried": 30, "recovered": 1}) == []
    assert retry_kept_nothing({"round": 2, "retried": 30, "recovered": 0, "failed_again": 30, "dropped": 0}) == [
        "retry round 2 recovered none of the 30 rows it retried: 30 failed again (transient), 0 dropped for other "
        "reasons"]
    assert missing_extra(ModuleNotFoundError("no", name="yaml")) is None  # not an extra's: a bug, exit 1


def test_ctrl_c_exits_130_saying_how_to_resume(tmp_path):
    """SIGINT while `mm1 curate` waits on its scheduler (a socket that accepts and never answers)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        recipe = _recipe(tmp_path, "interrupted", cluster={"address": f"tcp://127.0.0.1:{silent.getsockname()[1]}",
                                                           "connect_timeout_s": 60})
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "curate", recipe], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = silent.accept()  # the run is connecting: it waits
            # Under load a first SIGINT has been lost while the Dask client connects (its cleanup
            # blocked and swallowed later ones: 12 presses in one run): a second Ctrl-C now exits at
            # once (tools/cli.py `_on_sigint`); press again, as a user would, until it exits
            # (bounded: 12 presses, 5 s apart)
            err = ""
            for _ in range(12):
                proc.send_signal(signal.SIGINT)
                try:
                    _, err = proc.communicate(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            conn.close()
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, "no exit after 12 presses of Ctrl-C"
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted; run `mm1 curate RECIPE` again to resume" in err, err
