"""tools/bench/gpu_suite.py: `--dry-run` runs every default row for real, at tiny sizes on the
CPU, each in its own process, and writes one JSON line per row after the machine line. Every
default row's child entry (`--child NAME --dry-run`) runs here in this process (the row's own
code; its imports are paid once by the session), and one dry run of the suite starts the real
child processes for the machine line and one row; the suite's own machinery (a row subset,
appending, a row killed at its cap with its progress kept, a failing row) is checked with
stand-in rows that cost nothing."""

from __future__ import annotations

import json
import sys

import pytest

from tools.bench import gpu_suite

DEFAULT_ROWS = ["train_mfu_3b", "clip_vith378", "recaption_local"]


def _lines(out):
    return [json.loads(line) for line in (out / gpu_suite.RESULTS).read_text().splitlines()]


def test_dry_run_runs_every_row(capsys):
    assert [n for n, r in gpu_suite.ROWS.items() if r.default] == DEFAULT_ROWS
    results = {}
    for name in DEFAULT_ROWS:
        assert gpu_suite.main(["--child", name, "--dry-run"]) == 0
        result, _ = gpu_suite._parse(capsys.readouterr().out)
        assert result["status"] == "ok", result
        results[name] = result
    t = results["train_mfu_3b"]
    assert {"model", "tower", "batch", "accum", "seq_len", "compile", "activation_checkpointing", "tokens_per_s",
            "mfu", "hfu", "tower_share", "memory_gib", "attempts"} <= set(t)
    assert (t["model"], t["tower"], t["activation_checkpointing"], t["losses_finite"]) == ("tiny", "trained",
                                                                                            "selective", True)
    assert t["attempts"] == [{"batch": 2, "activation_checkpointing": "selective", "status": "ok"}]
    c = results["clip_vith378"]
    assert {"bare_images_per_s", "stage_images_per_s", "ratio", "meets_goal"} <= set(c) and c["device"] == "cpu"
    r = results["recaption_local"]
    assert [x["batch_size"] for x in r["results"]] == [1, 4] and r["results"][0]["ratio"] == 1.0


def test_a_dry_run_starts_each_row_in_its_own_process(tmp_path):
    """The suite itself, real child processes: the machine line, then the row's line."""
    assert gpu_suite.main(["--dry-run", "--rows", "recaption_local", "--out", str(tmp_path)]) == 0
    lines = _lines(tmp_path)
    assert [r["row"] for r in lines] == ["machine", "recaption_local"]
    assert all(r["status"] == "ok" and r["dry_run"] and r["seconds"] <= r["cap_s"] for r in lines)
    machine, recaption = lines
    assert {"gpu", "torch", "cuda", "python", "packages", "rows"} <= set(machine)
    assert machine["rows"] == ["recaption_local"] and machine["packages"]["open_clip_torch"]
    assert [x["batch_size"] for x in recaption["result"]["results"]] == [1, 4]


@pytest.fixture
def stand_ins(monkeypatch):
    """Rows whose process is a one-line Python program: `ok` reports a result, `slow` reports
    progress and then sleeps past its cap, `broken` exits with an error."""
    programs = {
        "machine": "print('RESULT ' + json.dumps({'status': 'ok', 'gpu': None, 'torch': 't', 'python': 'p'}))",
        "ok": "print('RESULT ' + json.dumps({'status': 'ok', 'value': 1}))",
        "oom": "print('RESULT ' + json.dumps({'status': 'out of memory'}))",
        "slow": "print('PROGRESS ' + json.dumps({'step': 1}), flush=True); time.sleep(60)",
        "broken": "import sys; print('boom', file=sys.stderr); sys.exit(3)",
    }
    monkeypatch.setattr(gpu_suite, "_child_argv",
                        lambda name, dry: [sys.executable, "-c", f"import json, time\n{programs[name]}"])
    monkeypatch.setattr(gpu_suite, "ROWS", {name: gpu_suite.Row(cap_s=1.5 if name == "slow" else 30, run=None)
                                            for name in programs if name != "machine"})


def test_a_subset_of_rows_is_appended(stand_ins, tmp_path):
    assert gpu_suite.main(["--rows", "ok", "--out", str(tmp_path)]) == 0
    assert gpu_suite.main(["--rows", "ok,oom", "--out", str(tmp_path)]) == 1  # a row that is not ok
    lines = _lines(tmp_path)
    assert [(r["row"], r["status"]) for r in lines] == [("machine", "ok"), ("ok", "ok"), ("machine", "ok"),
                                                         ("ok", "ok"), ("oom", "out of memory")]
    assert lines[1]["result"] == {"status": "ok", "value": 1} and lines[2]["rows"] == ["ok", "oom"]
    with pytest.raises(SystemExit):
        gpu_suite.main(["--rows", "ok,nope", "--out", str(tmp_path)])


def test_a_row_past_its_cap_is_killed_and_its_progress_kept(stand_ins, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))  # the device machine's results folder is the default
    assert gpu_suite.main(["--rows", "slow,broken,ok"]) == 1
    machine, slow, broken, ok = _lines(tmp_path)
    assert slow["status"] == "timeout" and slow["progress"] == [{"step": 1}] and slow["seconds"] < 30
    assert broken["status"] == "error" and broken["returncode"] == 3 and "boom" in broken["stderr_tail"]
    assert ok["status"] == "ok"  # the rows after a failed one still run
