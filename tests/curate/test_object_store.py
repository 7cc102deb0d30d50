"""Curation outputs on an object store (DESIGN.md, "Resumability and determinism"; curate/engine/commit.py).

The store is a real S3-compatible server process, moto's server mode, on 127.0.0.1 (the `s3`
fixture, tests/conftest.py); s3fs talks to it through the standard AWS_* environment, as it
would to AWS. There is no rename there: intermediates keep their attempt's own names and the
marker that names them publishes them; shards, sidecars and ledger files (functions of marked
inputs) are uploaded to their final names, each upload atomic.

The killed-and-resumed run is compared byte for byte with the session's clean local run (the
`reference` fixture, tests/curate/conftest.py): the store changes where bytes go, not which.
Waits are generous bounds against hangs, never timings.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from curate.engine.commit import ATTEMPT_NAME, storage_for
from curate.contract import fs_path, image_digest, location, read_table, record_schema
from curate.engine.pack import ShardWriter
from curate.recipe import RecipeError, parse_recipe
from tools.bench.partition_memory import build_folder
from tools.stats import compute_stats

pytestmark = pytest.mark.usefixtures("loopback_only")

BIN = Path(sys.executable).parent
MM1 = str(BIN / "mm1") if (BIN / "mm1").exists() else shutil.which("mm1") or "mm1"
WAIT = 300  # seconds: many times what any step here takes; only a hang reaches it


def _download(url: str, dst: Path) -> Path:
    where, fs = fs_path(location(url))
    fs.get(where, str(dst), recursive=True)
    return dst


def _markers(out, step: str) -> dict[str, str]:
    """{marker name: its LastModified} of one step's done markers on the store."""
    done = location(out) / "_work" / "done"
    where, fs = fs_path(done)
    try:
        infos = fs.ls(where, detail=True)
    except FileNotFoundError:
        return {}
    return {i["name"].rsplit("/", 1)[-1]: str(i.get("LastModified")) for i in infos
            if i["name"].rsplit("/", 1)[-1].startswith(f"{step}-")}


@pytest.mark.slow
def test_a_run_on_s3_killed_and_resumed_equals_the_clean_local_run(reference, s3, tmp_path):
    """`mm1 curate` writing to s3:// is SIGKILLed inside segment 0 and run again: the output is
    byte-identical to the clean local run (tars, sidecars, sizes.json, ledger, manifest kinds),
    `mm1 verify s3://...` passes, `mm1 stats` reads it, finished partitions were not redone, and
    no attempt object is left that no marker names. (The trainer's reader on s3:// objects:
    tests/train/test_object_store_training.py.) Both runs start a LocalCluster of ONE worker
    process (two threads; the reference ran on two processes): its workers inherit the store's
    AWS_* environment, and the output does not depend on the cluster's shape."""
    out = f"{s3}/curated"
    data = reference.data(out)
    data["cluster"] = {**data["cluster"], "n_workers": 1, "threads_per_worker": 2}
    recipe_file = reference.write_recipe(tmp_path / "recipe.yaml", data)
    cmd = [MM1, "curate", str(recipe_file), "--no-progress"]
    n = reference.manifest["counts"]["partitions"]

    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + WAIT
        while len(_markers(out, "seg0")) < 3:
            assert proc.poll() is None, (
                f"the run ended (rc {proc.returncode}) before it could be killed: "
                + (tmp_path / "killed.log").read_text()[-3000:])
            assert time.monotonic() < deadline, "segment 0 never got going"
            time.sleep(0.1)  # each look is a LIST request the S3 server answers on our 2 cores
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=WAIT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(2)  # let the killed driver's workers notice and exit (they may finish a task)
    before = _markers(out, "seg0")
    assert 3 <= len(before) < n, f"the kill should land inside segment 0 ({len(before)}/{n} done)"
    assert not (location(out) / "manifest.json").exists()
    time.sleep(1.1)  # S3's LastModified has one-second resolution: a rewrite must be visible

    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=WAIT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"manifest: {out}/manifest.json" in rerun.stdout

    after = _markers(out, "seg0")
    assert len(after) == n
    assert {k: after[k] for k in before} == before, "the rerun redid partitions finished before the kill"

    verified = subprocess.run([MM1, "verify", out], capture_output=True, text=True, timeout=WAIT)
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]
    assert verified.stdout.startswith(f"OK: {out} ")

    copy = _download(out, tmp_path / "copy")
    reference.assert_same_output(copy)
    reference.check_ledger_invariant(copy)
    stats, expected = compute_stats(out), compute_stats(reference.out)

    def untimed(s: dict) -> dict:  # each run times its own stages: their rows must agree, not seconds
        return {**s, "out": 0, "stages": [{**t, "wall_s": 0, "cpu_s": 0, "rows_per_s": 0} for t in s["stages"]]}

    assert stats["out"] == out and untimed(stats) == untimed(expected)

    # every attempt-named object left under _work is one a marker names (the global stage's
    # decisions and inputs); the segments' rows are gone (keep_intermediate is off)
    work = copy / "_work"
    named = set()
    for m in (work / "done").glob("global*.json"):
        named |= set(json.loads(m.read_text())["state"].values())
    attempts = {p.relative_to(copy).as_posix() for p in work.iterdir() if ATTEMPT_NAME.match(p.name)}
    assert attempts and attempts <= named, (attempts, named)
    assert not [p for p in work.iterdir() if p.name.startswith("seg")]


def _pair_row(i: int) -> dict:
    """A real pair row: a JPEG crop of scikit-image's astronaut, a caption."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[i * 16:i * 16 + 64, :64]).save(buf, format="JPEG", quality=85)
    img = buf.getvalue()
    return {"id": f"src:{i}", "source": "src", "url": f"http://127.0.0.1/{i}.jpg",
            "caption": f"caption number {i}", "image": img, "image_format": "jpg",
            "image_sha256": image_digest(img), "image_nbytes": len(img), "width": 64, "height": 64}


def test_object_storage_commits_without_rename(s3):
    """The store's side of the commit protocol, against the server: attempts get their own names,
    deterministic outputs go to their final names, an upload that raises leaves no object (not a
    partial one), markers round-trip, and the sweep removes only unnamed attempts."""
    root = location(f"{s3}/out")
    storage = storage_for(root)
    assert storage.remote and storage_for(Path("/tmp")).remote is False

    final = root / "_work" / "seg0" / "00000.parquet"
    a, b = storage.attempt_path(final), storage.attempt_path(final)
    assert a != b and a.parent == final.parent and ATTEMPT_NAME.match(a.name) and a.name.endswith(".parquet")
    assert storage.attempt_path(final, deterministic=True) == final
    with storage.open_write(a) as f:
        f.write(b"rows")
    assert storage.publish(a, final) == a  # no rename: the marker will name `a`
    assert a.read_bytes() == b"rows" and not final.exists()

    broken = root / "ledger" / "00000.parquet"
    with pytest.raises(RuntimeError):
        with storage.open_write(broken) as f:
            f.write(b"x" * (1 << 20))
            raise RuntimeError("the task fails mid-upload")
    assert not broken.exists()

    marker = root / "_work" / "done" / "seg0-00000.json"
    assert storage.read_marker(marker) is None
    storage.write_marker(marker, {"data": "_work/seg0/" + a.name, "rows": 1})
    assert storage.read_marker(marker) == {"data": "_work/seg0/" + a.name, "rows": 1}

    with storage.open_write(b) as f:  # a twin attempt of the same task, that no marker names
        f.write(b"other rows")
    keep = root / "_work" / "seg0" / "notes.txt"
    keep.write_text("not an attempt name")
    assert storage.remove_unnamed(final.parent, {fs_path(a)[0]}) == 1
    assert a.exists() and not b.exists() and keep.exists()


def test_a_shard_on_s3_is_whole_or_absent_and_equals_the_local_one(s3, tmp_path):
    """ShardWriter on the store: an aborted shard leaves neither tar nor sidecar at their final
    names; a closed one is there, byte-identical to the same shard written on a local disk, with
    the sha256s its manifest entry records."""
    root = location(f"{s3}/out")
    storage = storage_for(root)
    record = record_schema("pair")
    w = ShardWriter(storage, root, "pair", 0, record)
    w.write(_pair_row(1))
    w.abort()
    assert not (root / "pairs" / "00000.tar").exists() and not (root / "pairs" / "00000.parquet").exists()

    entries = []
    for where in (root, tmp_path):
        w = ShardWriter(storage_for(where), where, "pair", 0, record)
        for i in range(3):
            w.write(_pair_row(i))
        entries.append(w.close())
    remote, local = entries
    assert remote == local and remote["name"] == "pairs/00000.tar" and remote["count"] == 3
    tar = (root / remote["name"]).read_bytes()
    assert tar == (tmp_path / "pairs" / "00000.tar").read_bytes()
    assert hashlib.sha256(tar).hexdigest() == remote["sha256"] and len(tar) == remote["bytes"]
    assert hashlib.sha256((root / remote["sidecar"]).read_bytes()).hexdigest() == remote["sidecar_sha256"]
    assert read_table(root / remote["sidecar"]).num_rows == 3


@pytest.mark.parametrize("path,expected", [
    ("http://127.0.0.1:1/out", "http:// cannot be written to"),
    ("nosuchstore://bucket/out", "no fsspec filesystem is known for nosuchstore://"),
])
def test_an_output_url_that_cannot_be_written_fails_at_load(path, expected):
    data = {"name": "x", "sources": [{"kind": "url_list", "name": "u", "path": "urls.parquet"}],
            "stages": [], "output": {"path": path}}
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "recipe.yaml")
    assert "output.path" in str(err.value) and expected in str(err.value)
    data["output"]["path"] = "s3://bucket/out"
    assert parse_recipe(data, "recipe.yaml").output.path == "s3://bucket/out"


def _texts(folder: Path) -> None:
    """A small text corpus in three encodings, with a malformed record and an empty text."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    lines = [json.dumps({"id": i, "text": f"document number {i}: " + "words of a text " * (i + 3)})
             for i in range(8)]
    (folder / "a.jsonl").write_text("\n".join(lines[:4] + ["{not json", json.dumps({"text": ""})]) + "\n")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[4:]) + "\n")
    pq.write_table(pa.table({"id": [10, 11, 12], "text": ["a parquet text one", "and two", "and three"]}),
                   folder / "c.parquet", row_group_size=2)


def test_inputs_on_s3_read_as_the_same_files_on_a_local_disk(s3, shared_cluster, tmp_path):
    """WebDataset tars (the demo's, corrupt ones included) and a text corpus (jsonl split at
    byte offsets, jsonl.gz, parquet row groups) read from s3:// give the same ledger and the
    same shard bytes as the same files read from a local disk. The local run uses the session's
    cluster; the s3:// one starts its own, whose workers inherit the store's AWS_* environment."""
    from curate.engine.driver import run_recipe
    from curate.contract import read_ledger
    from tools.demo.data import build_demo_inputs

    inputs = tmp_path / "inputs"
    build_demo_inputs(inputs)
    _texts(inputs / "texts")
    where, fs = fs_path(location(f"{s3}/inputs"))
    fs.put(str(inputs) + "/", where, recursive=True)

    def recipe(base: str, out: Path):
        return parse_recipe({
            "name": "inputs-on-s3",
            "sources": [
                {"kind": "webdataset", "name": "wds", "path": f"{base}/wds"},
                {"kind": "text_corpus", "name": "texts", "path": f"{base}/texts", "records_per_partition": 3},
            ],
            "stages": [
                {"kind": "caption_length_filter", "min_chars": 5, "max_chars": 1000},
                {"kind": "image", "resize_mode": "keep_ratio", "image_size": 128, "format": "jpg", "quality": 90},
                {"kind": "exact_dedup"},
            ],
            "output": {"path": str(out), "shard_max_samples": 5},
            "cluster": {"n_workers": 1, "threads_per_worker": 2, "dashboard": False},
        }, "<test recipe>")

    local = shared_cluster.run(recipe(str(inputs), tmp_path / "from_disk"))
    remote = run_recipe(recipe(f"{s3}/inputs", tmp_path / "from_s3"), progress=False)
    assert local["counts"] == remote["counts"] and local["counts"]["kept"] >= 10
    assert local["kinds"] == remote["kinds"] and set(local["kinds"]) == {"pair", "text"}
    columns = ["id", "outcome", "stage", "drop_reason", "drop_detail", "shard", "key"]
    assert read_ledger(tmp_path / "from_s3", columns).to_pylist() == read_ledger(tmp_path / "from_disk", columns).to_pylist()
    assert remote["drops"] == local["drops"] and any(k.endswith("malformed_row") for k in local["drops"])
    assert remote["input_fingerprint"] != local["input_fingerprint"]  # ETags, not mtimes


def test_a_folder_source_refuses_a_url_at_load():
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "x", "sources": [{"kind": "image_folder", "name": "f", "path": "s3://bucket/images"}],
                      "stages": [], "output": {"path": "out"}}, "recipe.yaml")
    assert "sources.0" in str(err.value) and "reads a local folder" in str(err.value)


def test_on_s3_the_first_marker_of_twin_attempts_stands(s3, tmp_path):
    """Two attempts of one segment task (Dask may run one twice): on the store the first
    marker stands, so the rows the next task reads never change under it; the second
    attempt's object is unnamed and the sweep removes it."""
    from curate.engine.driver import plan_job
    from curate.engine.steps import commit, run_segment

    folder = tmp_path / "images"
    build_folder(folder, 6)
    recipe = parse_recipe({"name": "twins", "sources": [{"kind": "image_folder", "name": "f", "path": str(folder)}],
                           "stages": [{"kind": "caption_length_filter", "min_chars": 1, "max_chars": 100}],
                           "output": {"path": f"{s3}/twins"}}, "<test recipe>")
    job = plan_job(recipe)
    first = run_segment(job, 0, 0)
    data = location(f"{s3}/twins") / first["data"]
    assert ATTEMPT_NAME.match(data.name) and data.exists()
    twin = job.storage.attempt_path(job.seg_data(0, 0))
    with job.storage.open_write(twin) as f:
        f.write(b"a twin's rows")
    second = commit(job, "seg0", 0, rows=first["rows"], dropped=first["dropped"], data=twin.name)
    assert second == first and job.seg_file(0, 0) == data
    assert job.storage.remove_unnamed(data.parent, {fs_path(data)[0]}) == 1
    assert data.exists() and not twin.exists()
