"""The trainer reads its shards straight from an object store (issue 13): the session's demo
curation (tests/conftest.py `demo_run`) is uploaded to a real S3-compatible server process on
127.0.0.1 (moto's server mode; tests/conftest.py `s3_server`), `mm1 verify` checks it there, the
trainer's reader returns from s3:// exactly what it returns from the local output, and two
torchrun ranks (gloo, CPU; the tiny MM1 with RANDOM weights: mechanics only) train on it. (The
runner writing a run's output onto the store, killed and resumed there: tests/curate/
test_object_store.py.)

The ranks and their DataLoader workers reach the store through the AWS_* environment they
inherit, as they would on a cluster. Timeouts are generous bounds against hangs, not timings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curate.contract import fs_path, location
from tools.verify import verify
from train.data.shards import list_samples, read_sample

pytestmark = pytest.mark.usefixtures("loopback_only")

ROOT = Path(__file__).resolve().parents[2]
DEMO_TRAIN = ROOT / "recipes" / "train" / "demo.yaml"
HANG = 420  # seconds: a bound against hangs on a shared 2-core machine, not a timing


@pytest.fixture(scope="module")
def on_s3(s3_server, demo_run):
    """(s3:// URL of the session's curated demo uploaded to the store, the local output it came
    from, the tokenizer), with this process's environment pointed at the store while the module
    runs."""
    with s3_server.environment():
        url = f"s3://{s3_server.create_bucket()}/curated"
        where, fs = fs_path(location(url))
        fs.put(str(demo_run.out), where, recursive=True)
        yield url, demo_run.out, demo_run.tokenizer


def test_verify_and_the_reader_see_on_s3_what_a_local_copy_holds(on_s3):
    url, copy, _ = on_s3
    report = verify(url)
    assert report.ok, report.format()
    for kind in ("pair", "doc", "text"):
        remote, local = list_samples([url], kind), list_samples([str(copy)], kind)
        assert remote, f"the demo curated no {kind}"
        assert [(r.shard, r.key, r.members) for r in remote] == [(r.shard, r.key, r.members) for r in local]
        for r, l in zip(remote, local):
            assert read_sample(r) == read_sample(l)


def _records(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_two_torchrun_ranks_train_from_s3(on_s3, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), 2 steps, one DataLoader worker a rank: both ranks
    read their shards from s3:// and agree on one finite loss every step."""
    url, _, tokenizer = on_s3
    run_dir = tmp_path / "run"
    overrides = {"data.outs": f"[{url}]", "data.tokenizer": str(tokenizer), "data.workers": 1,
                 "steps": 2, "checkpoint.every": 2}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "tools.cli", "train", str(DEMO_TRAIN), "--run-dir", str(run_dir)]
    for k, v in overrides.items():
        args += ["--override", f"{k}={v}"]
    proc = subprocess.run(args, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = _records(run_dir / "metrics.jsonl"), _records(run_dir / "metrics.rank1.jsonl")
    assert sorted(r0) == sorted(r1) == [1, 2]
    for step in r0:
        assert math.isfinite(r0[step]["loss"]) and r0[step]["loss"] == r1[step]["loss"]
        assert r0[step]["rank_loss"] != r1[step]["rank_loss"]  # each rank read its own samples
    assert (run_dir / "step-00000002").is_dir()
