"""The runner resumes exactly and survives failures (DESIGN.md, "Resumability and determinism").

Every run here is compared with the session's clean, uninterrupted run (the `reference` fixture in
conftest.py): the pairs shards (tars, sidecars, sizes.json) and the ledger must be byte-identical,
no attempt file (`*.tmp`) may survive, and the ledger accounts for every input exactly once.

Failures are real: the driver is SIGKILLed, workers segfault (distributed's chaos plugin), the same
task runs twice at once in two processes. Waits are bounded generously (only a hang fails them);
nothing asserts on timings.

Runs that finish or resume an output run on the session's LocalCluster (`shared_cluster`,
tests/conftest.py); a run starts a cluster of its own where its workers are the point: the
killed driver's (they must die with it), the segfaulting ones, and the one-worker resume.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dask
import psutil
import pytest
from distributed import Client, LocalCluster
from distributed.chaos import KillWorker

from curate.recipe import parse_recipe
from curate.engine.driver import ResumeError, plan_job, prepare_output, run_global, run_recipe
from curate.engine.pack import cut_shards
from curate.engine.steps import run_pack, run_plan, run_segment
from tools.verify import verify

BIN = Path(sys.executable).parent
MM1 = str(BIN / "mm1") if (BIN / "mm1").exists() else shutil.which("mm1") or "mm1"
WAIT = 300  # seconds: many times what any step here takes; only a hang reaches it


def _recipe(data: dict[str, Any]):
    return parse_recipe(data, "<test recipe>")


def _markers(out: Path, step: str) -> list[Path]:
    done = out / "_work" / "done"
    return sorted(done.glob(f"{step}-*.json")) if done.exists() else []


def _mtimes(paths: list[Path]) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in paths}


def _copy_output(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)  # keeps mtimes: "nothing rewrote it" is checkable
    return dst


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Processes still running (a zombie is dead: it only waits to be reaped by its parent)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_until(predicate, timeout: float = WAIT, every: float = 0.05, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------------------------------------
# 1. The driver is SIGKILLed mid-run; the same recipe run again finishes it exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_driver_mid_run_then_rerun_is_byte_identical(reference, shared_cluster, tmp_path):
    out = tmp_path / "curated"
    recipe_file = tmp_path / "recipe.yaml"
    reference.write_recipe(recipe_file, reference.data(out))
    cmd = [MM1, "curate", str(recipe_file), "--no-progress"]
    n = reference.manifest["counts"]["partitions"]

    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        driver = psutil.Process(proc.pid)
        deadline = time.monotonic() + WAIT
        while len(_markers(out, "seg0")) < 3:
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "segment 0 never got going"
            time.sleep(0.005)
        family = driver.children(recursive=True)  # the LocalCluster's workers (and helpers)
        os.kill(proc.pid, signal.SIGKILL)
        seg0_at_kill = len(_markers(out, "seg0"))
        assert proc.wait(timeout=WAIT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 3 <= seg0_at_kill < n, f"the kill should land inside segment 0 ({seg0_at_kill}/{n} done)"
    assert len(family) >= 2, f"expected the LocalCluster's worker processes, found {family}"

    # No orphans: the workers die with their driver (a worker may finish the task in hand first).
    _wait_until(lambda: not _alive(family), what="the killed driver's worker processes to exit")
    assert not (out / "manifest.json").exists()
    assert not _markers(out, "pack")
    finished = _mtimes(_markers(out, "seg0"))
    assert len(finished) < n, "the workers outlived the driver and finished segment 0"

    # The rerun: the same recipe (`mm1 curate`'s own resume through the CLI: tests/curate/
    # test_download_pipeline.py, test_object_store.py).
    shared_cluster.run(_recipe(reference.data(out)))

    reference.assert_same_output(out)
    reference.check_ledger_invariant(out)
    assert not list(out.rglob("*.tmp"))
    # The rerun resumed: partitions finished before the kill were not processed again.
    after = _mtimes(_markers(out, "seg0"))
    assert {k: after[k] for k in finished} == finished
    assert len(after) == n
    report = verify(out)
    assert report.ok, report.format()


# ---------------------------------------------------------------------------------------------
# 2. Workers segfault mid-stage (distributed's chaos plugin); the nanny restarts them
# ---------------------------------------------------------------------------------------------


def _worker_deaths(client: Client) -> list[dict[str, Any]]:
    """The scheduler's record of workers lost unexpectedly, with the tasks each was running."""
    return [
        msg for _, msg in client.get_events("all")
        if isinstance(msg, dict) and msg.get("action") == "remove-worker" and not msg.get("expected")
    ]


def _mid_task(deaths: list[dict[str, Any]]) -> list[str]:
    return sorted(str(k) for d in deaths for k in d.get("processing-tasks", ()))


def _chaos_while_tasks_run(client: Client, out: Path, stop: threading.Event, errors: list) -> None:
    """Once segment 0 is under way, make every worker segfault after a random (exponential,
    mean 0.5 s) delay; as soon as one died in the middle of a task, unregister the plugin so the
    restarted workers live: the number of deaths stays small and the run's length bounded."""
    try:
        while len(_markers(out, "seg0")) < 2:
            if stop.wait(0.01):
                return
        client.register_plugin(KillWorker(delay="0.5s", mode="segfault"), name="chaos")
        while not _mid_task(_worker_deaths(client)):
            if stop.wait(0.02):
                break
        _unregister(client, "chaos")
    except Exception as exc:  # reported by the test, which must not hang on a dead thread
        errors.append(exc)


def _unregister(client: Client, name: str) -> None:
    """The scheduler drops the plugin first, then tells the workers; telling a worker that is
    dying at that moment fails, which is fine as long as the scheduler no longer has it."""
    for _ in range(20):
        try:
            client.unregister_worker_plugin(name)
            return
        except (OSError, ValueError):  # CommClosedError is an OSError; ValueError: already gone
            registered = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
            if name not in registered:
                return
            time.sleep(0.1)
    raise AssertionError(f"could not unregister worker plugin {name!r}")


@pytest.mark.slow
@pytest.mark.timeout(WAIT * 2)
def test_workers_killed_mid_stage_are_replaced_and_output_is_identical(reference, tmp_path):
    out = tmp_path / "curated"
    recipe = _recipe(reference.data(out))
    n = reference.manifest["counts"]["partitions"]
    with dask.config.set({"distributed.scheduler.allowed-failures": 20}):
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", memory_limit="2GiB",
            # no dashboard; the scheduler's HTTP server still starts: loopback, a free port
            dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False},
        )
        client = Client(cluster)
    stop, errors = threading.Event(), []
    chaos = threading.Thread(target=_chaos_while_tasks_run, args=(client, out, stop, errors), daemon=True)
    try:
        first_pids = set(client.run(os.getpid).values())
        chaos.start()
        manifest = run_recipe(recipe, client=client, progress=False)
        stop.set()
        chaos.join(WAIT)
        assert not chaos.is_alive() and not errors, errors
        deaths = _worker_deaths(client)
        final_pids = set(client.run(os.getpid).values())
    finally:
        stop.set()
        client.close()
        cluster.close()

    # Workers really died while they held tasks, and were replaced by new processes.
    assert deaths, "no worker died: the chaos plugin never fired"
    assert _mid_task(deaths), f"no worker died in the middle of a task: {deaths}"
    assert final_pids - first_pids, "the workers at the end are the original processes"

    assert manifest["counts"]["partitions"] == n
    reference.assert_same_output(out)
    reference.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report.format()


# ---------------------------------------------------------------------------------------------
# 3. The same task run twice at once (Dask may do it) leaves one correct output
# ---------------------------------------------------------------------------------------------

# Each twin is a fresh interpreter running this script over the same task list; before each task
# it waits for the other twin to reach the same task, so both attempts run at the same time.
_TWIN = r"""
import pickle, sys, time
from pathlib import Path

tasks, me, sync, result = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
done = []
for i, (fn, step, job, p, args) in enumerate(pickle.loads(tasks.read_bytes())):
    (sync / f"{i}.{me}").touch()
    deadline = time.monotonic() + float(sys.argv[5])
    while len(list(sync.glob(f"{i}.*"))) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"task {i}: the twin never arrived")
        time.sleep(0.001)
    existed = job.marker(step, p).exists()  # then this attempt does no work
    done.append((existed, fn(job, *args)))
result.write_bytes(pickle.dumps(done))
"""


def _run_twice(tmp: Path, tasks: list[tuple]) -> list[tuple[bool, bool, dict[str, Any]]]:
    """Run every task in two processes at once; per task: (a did work, b did work, marker)."""
    tmp.mkdir()
    (tmp / "sync").mkdir()
    (tmp / "tasks.pkl").write_bytes(pickle.dumps(tasks))
    twins = [
        subprocess.Popen([sys.executable, "-c", _TWIN, str(tmp / "tasks.pkl"), me, str(tmp / "sync"),
                          str(tmp / f"{me}.pkl"), str(WAIT)], stderr=subprocess.PIPE, text=True)
        for me in ("a", "b")
    ]
    for twin in twins:
        _, err = twin.communicate(timeout=WAIT)
        assert twin.returncode == 0, err[-3000:]
    a, b = (pickle.loads((tmp / f"{me}.pkl").read_bytes()) for me in ("a", "b"))

    def untimed(marker: dict[str, Any]) -> dict[str, Any]:  # each attempt times its own stages
        return {k: v for k, v in marker.items() if k != "stages"}

    assert [untimed(m) for _, m in a] == [untimed(m) for _, m in b], "the two attempts of a task disagree"
    return [(not ea, not eb, ma) for (ea, ma), (eb, _) in zip(a, b)]


@pytest.mark.slow
def test_same_task_twice_concurrently_leaves_one_correct_output(reference, shared_cluster, tmp_path):
    out = tmp_path / "curated"
    recipe = _recipe(reference.data(out))
    job = plan_job(recipe)
    prepare_output(job, restart=False)
    n = len(job.partitions)
    assert len(job.segments) == 1  # row stages, then exact_dedup as the (last) global stage

    segs = _run_twice(tmp_path / "seg0", [(run_segment, "seg0", job, p, (0, p)) for p in range(n)])
    run_global(job, 0)  # the driver's step: it never runs twice at once
    cuts = cut_shards(job.kinds, {p: run_plan(job, p)["footprints"] for p in range(n)}, recipe.output)
    packs = _run_twice(tmp_path / "pack", [(run_pack, "pack", job, p, (p, cuts[p])) for p in range(n)])

    # Most tasks really ran twice at once: both attempts did the work and published the same names.
    assert sum(a and b for a, b, _ in segs) >= n // 2, [(a, b) for a, b, _ in segs]
    assert sum(a and b for a, b, _ in packs) >= n // 2, [(a, b) for a, b, _ in packs]
    seg0, pack = _mtimes(_markers(out, "seg0")), _mtimes(_markers(out, "pack"))
    assert len(seg0) == len(pack) == n

    shared_cluster.run(recipe)  # finishes the run: only the manifest is left to write
    assert _mtimes(_markers(out, "seg0")) == seg0 and _mtimes(_markers(out, "pack")) == pack
    reference.assert_same_output(out)
    reference.check_ledger_invariant(out)
    assert not list(out.rglob("*.tmp"))
    report = verify(out)
    assert report.ok, report.format()


# ---------------------------------------------------------------------------------------------
# 4. Resume rules: what resumes, what refuses, what starts over
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_of_finished_output_does_no_work_even_on_another_worker_count(reference, shared_cluster, tmp_path):
    out = _copy_output(reference.out, tmp_path / "curated")
    work = sorted((out / "_work" / "done").iterdir()) + sorted((out / "pairs").glob("*.tar")) \
        + sorted((out / "pairs").glob("*.parquet")) + sorted((out / "ledger").iterdir())
    before = {p: p.stat().st_mtime_ns for p in work}

    data = reference.data(out)
    # execution only: must not refuse (the rerun has no task to give a worker; a resume that
    # does run on one worker: test_interrupted_after_segment0_...)
    data["cluster"]["n_workers"] = 1
    manifest = shared_cluster.run(_recipe(data))

    assert {p: p.stat().st_mtime_ns for p in work} == before, "a finished task ran again"
    assert manifest["counts"] == reference.manifest["counts"]
    reference.assert_same_output(out)


@pytest.mark.slow
def test_changed_recipe_refuses_to_resume_until_restart(reference, shared_cluster, tmp_path):
    out = _copy_output(reference.out, tmp_path / "curated")
    data = reference.data(out)
    data["stages"][1]["image_size"] = 200
    recipe = _recipe(data)
    assert recipe.hash() != reference.manifest["recipe_hash"]
    untouched = reference.manifest_bytes(out)

    with pytest.raises(ResumeError, match="different recipe.*--restart"):
        run_recipe(recipe, progress=False)

    recipe_file = reference.write_recipe(tmp_path / "changed.yaml", data)
    cli = subprocess.run([MM1, "curate", str(recipe_file), "--no-progress"],
                         capture_output=True, text=True, timeout=WAIT)
    assert cli.returncode == 2, cli.stderr[-3000:]
    assert "--restart" in cli.stderr and "different recipe" in cli.stderr
    assert "Traceback" not in cli.stderr
    assert reference.manifest_bytes(out) == untouched, "a refused run changed the output"
    reference.assert_same_output(out)

    manifest = shared_cluster.run(recipe, restart=True)
    assert manifest["recipe_hash"] == recipe.hash()
    assert manifest["counts"]["inputs"] == reference.manifest["counts"]["inputs"]
    changed = reference.pairs_digests(out)
    tars = [k for k in reference.pairs if k.endswith(".tar")]
    assert all(changed.get(k) != reference.pairs[k] for k in tars), "images were not re-resized to 200"
    reference.check_ledger_invariant(out)
    assert not list(out.rglob("*.tmp"))
    report = verify(out)
    assert report.ok, report.format()


@pytest.mark.slow
def test_changed_input_refuses_to_resume(reference, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(reference.inputs, inputs, copy_function=shutil.copy2)
    out = tmp_path / "curated"
    data = reference.data(out)
    for source in data["sources"]:
        source["path"] = source["path"].replace(str(reference.inputs), str(inputs))
    recipe = _recipe(data)
    job = plan_job(recipe)  # an interrupted run: two partitions of segment 0 done
    prepare_output(job, restart=False)
    run_segment(job, 0, 0)
    run_segment(job, 0, 1)
    bulk = inputs / "bulk"

    (bulk / "000200.txt").write_text("a new image added after the run")  # one more input
    shutil.copy2(bulk / "000001.jpg", bulk / "000200.jpg")
    with pytest.raises(ResumeError, match="different input.*--restart"):
        run_recipe(recipe, progress=False)

    (bulk / "000200.txt").unlink()  # back to the same listing, sizes and mtimes: resumable again
    (bulk / "000200.jpg").unlink()
    prepare_output(plan_job(recipe), restart=False)

    (bulk / "000003.txt").write_text("the caption of an input, edited after the run")  # a changed input
    with pytest.raises(ResumeError, match="different input.*--restart"):
        run_recipe(recipe, progress=False)
    assert len(_markers(out, "seg0")) == 2 and not (out / "manifest.json").exists()


@pytest.mark.slow
def test_interrupted_after_segment0_resumes_with_other_workers_and_batch_size(reference, tmp_path, monkeypatch):
    """(The plan markers are also read back two at a time here, `driver.PLAN_BATCH`: the shards
    are still the reference's.)"""
    import curate.engine.driver as driver

    monkeypatch.setattr(driver, "PLAN_BATCH", 2)
    out = tmp_path / "curated"
    job = plan_job(_recipe(reference.data(out)))  # batch_size 4, like the reference
    prepare_output(job, restart=False)
    for p in range(len(job.partitions)):
        run_segment(job, 0, p)
    seg0 = _mtimes(_markers(out, "seg0"))
    assert len(seg0) == len(job.partitions)

    data = reference.data(out, batch_size=5)  # execution only: must not refuse
    data["cluster"]["n_workers"] = 1
    run_recipe(_recipe(data), progress=False)

    assert _mtimes(_markers(out, "seg0")) == seg0, "segment 0 ran again"
    reference.assert_same_output(out)
    reference.check_ledger_invariant(out)


# ---------------------------------------------------------------------------------------------
# 6. Placement by resources: a stage nobody can run fails fast, naming the resource
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(WAIT)
def test_stage_needing_a_resource_no_worker_has_fails_fast(reference, shared_cluster, tmp_path):
    data = reference.data(tmp_path / "curated")
    data["stages"][1]["resources"] = {"GPU": 1}
    recipe = _recipe(data)
    assert recipe.hash() == reference.manifest["recipe_hash"]  # placement is not part of the hash
    with pytest.raises(RuntimeError, match=r"resource GPU=1") as info:
        shared_cluster.run(recipe)  # its workers advertise no resources
    assert "--resources GPU" in str(info.value)
    assert not _markers(tmp_path / "curated", "seg0"), "a task ran although no worker can hold GPU"
