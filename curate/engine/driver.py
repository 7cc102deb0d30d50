"""The Dask runner: turns a recipe into per-partition futures and global passes, and accounts for
every input.

A run is a fixed sequence of steps, each committed per partition (see `curate.engine.commit` and the
tasks in `curate.engine.steps`):

    seg0   per partition: source -> row stages up to the first global stage -> intermediate
    global per global stage: a Dask dataframe pass over small columns -> drop decisions
    seg1.. per partition: previous intermediate + decisions -> next row stages -> intermediate
    plan   per partition: how many shards its kept rows fill
    pack   per partition: tars + sidecars + the ledger file
    manifest, written last by the driver from the pack markers

Everything a task writes is deterministic, so reruns skip finished work and give byte-identical
shards; the recipe hash and the input fingerprint guard against resuming a different run.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.engine.commit import (
    ObjectStorage,
    dask_url,
    fs_path,
    is_url,
    location,
    parquet_file,
    parquet_files,
    read_schema,
    relative,
    storage_for,
)
from curate.contract import FORMAT_VERSION, KIND_DIRS, LEDGER_DIR, MANIFEST, SIZES_JSON, inside, sizes_json
from curate.recipe import Recipe
from curate.sources.base import build_source
from curate.stages.base import GlobalStage, build_stage
from curate.engine.steps import (
    PARTITION_COLUMN,
    SEGMENTS_COLUMN,
    WORK,
    Job,
    ResumeError,
    run_pack,
    run_plan,
    run_segment,
    split_segments,
    valid_marker,
)

__all__ = ["ResumeError", "plan_job", "prepare_output", "run_global", "run_recipe", "write_manifest"]

log = logging.getLogger("mm1.curate")
def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("mm1-pipeline")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


def plan_job(recipe: Recipe, out: Path | None = None) -> Job:
    """List every source's partitions (on the client: names and sizes only)."""
    out = location(out or recipe.output.path)
    job = Job(recipe=recipe, out=out, recipe_hash=recipe.hash(), segments=split_segments(recipe))
    for cfg in recipe.sources:
        source = build_source(cfg)
        for part in source.partitions():
            job.partitions.append(part)
            job.kinds.append(source.record_kind)
    return job


_OUTPUT_ENTRIES = (WORK, LEDGER_DIR, MANIFEST, *KIND_DIRS.values())


def prepare_output(job: Job, restart: bool) -> None:
    """Refuse to resume a different recipe or input; --restart clears our own entries only."""
    storage = job.storage
    run_json = job.work / "run.json"
    current = {"recipe_hash": job.recipe_hash, "input_fingerprint": job.input_fingerprint()}
    previous = storage.read_marker(run_json)
    if previous is not None and previous != current and not restart:
        what = "recipe" if previous.get("recipe_hash") != job.recipe_hash else "input"
        raise ResumeError(
            f"{job.out} holds a run of a different {what} "
            f"(recipe {previous.get('recipe_hash')}, inputs {previous.get('input_fingerprint')}; "
            f"now recipe {current['recipe_hash']}, inputs {current['input_fingerprint']}). "
            "Rerun with --restart to start over, or choose another output."
        )
    if restart:
        for name in _OUTPUT_ENTRIES:
            storage.remove(job.out / name)
    elif previous is None and job.out.exists() and any(job.out.iterdir()):
        foreign = [e.name for e in job.out.iterdir() if e.name not in _OUTPUT_ENTRIES]
        if foreign:
            raise ResumeError(f"{job.out} is not empty and holds no curation run ({foreign[:3]}...)")
    storage.write_marker(run_json, current)
    storage.remove_temporaries(job.out)


# Dask settings for the workers of the LocalCluster we start (BENCHMARKS.md, download vs
# img2dataset, measures each). dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers,
# which turns off glibc's dynamic mmap threshold: every buffer over 128 KiB (each downloaded body,
# each decoded picture) is then mmap'ed and unmapped again, 20x the page faults and +16% wall on
# the download + resize path. `None` unsets it (glibc keeps freed memory for reuse instead: a
# higher but flat RSS). The worker's sampling profiler (a stack sample of every thread each
# 10 ms) costs CPU on stages with many I/O threads and we do not read its output.
# External clusters: start `dask worker` with the same (DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED
# =False, and MALLOC_TRIM_THRESHOLD_ unset in `distributed.nanny.pre-spawn-environ`); README.
WORKER_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
}


class _Cluster:
    """A client on the recipe's scheduler, or on a LocalCluster we start (127.0.0.1 only)."""

    def __init__(self, recipe: Recipe):
        from dask.distributed import Client, LocalCluster

        cfg = recipe.cluster
        self.cluster = None
        if cfg.address:
            self.client = Client(cfg.address, timeout="30s")
        else:
            import dask

            # The nannies copy the config when they start: these settings reach our workers only.
            with dask.config.set(WORKER_CONFIG):
                self.cluster = LocalCluster(
                    n_workers=cfg.n_workers,
                    threads_per_worker=cfg.threads_per_worker,
                    processes=True,
                    host="127.0.0.1",
                    # The scheduler's HTTP server (health, metrics) starts even without the
                    # dashboard: keep it on loopback, on a free port.
                    dashboard_address="127.0.0.1:0",
                    scheduler_kwargs={"dashboard": cfg.dashboard},
                    memory_limit=cfg.memory_limit,
                )
            self.client = Client(self.cluster)
        log.info("dask dashboard: %s", self.client.dashboard_link)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _check_resources(client: Any, needed: dict[str, float]) -> None:
    if not needed:
        return
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    for name, amount in needed.items():
        if not any(w.get("resources", {}).get(name, 0) >= amount for w in workers):
            raise RuntimeError(
                f"a stage needs worker resource {name}={amount}, and no worker advertises it; "
                f"start workers with `dask worker ... --resources {name}={amount}`"
            )


def _map(client: Any, fn: Any, calls: list[tuple], desc: str, progress: bool,
         resources: dict[str, float] | None = None, retries: int = 0) -> list[dict[str, Any]]:
    """Submit `fn(*args)` for each call as futures, wait for all, return the results in order.

    The futures are released on return, so a worker that dies later does not make the scheduler
    recompute finished tasks. A task's exception is a bug in a stage: it stops the run."""
    from dask.distributed import as_completed
    from tqdm import tqdm

    futures = [
        client.submit(fn, *args, key=f"{fn.__name__}-r{args[0].round}-{'-'.join(map(str, args[1:3]))}-{args[0].recipe_hash}",
                      resources=resources or None, retries=retries, pure=False)
        for args in calls
    ]
    results: dict[Any, dict[str, Any]] = {}
    bar = tqdm(total=len(futures), desc=desc, unit="part", disable=not progress, file=sys.stderr)
    try:
        for fut in as_completed(futures):
            results[fut.key] = fut.result()
            bar.update(1)
        return [results[f.key] for f in futures]
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()


def _segment_resources(job: Job, seg: int) -> dict[str, float]:
    needed: dict[str, float] = {}
    for cfg in job.segments[seg].row_stages:
        for k, v in cfg.resources.items():
            needed[k] = max(needed.get(k, 0), v)
    return needed


def _count_rows(folder: Path) -> int:
    return sum(parquet_file(f).metadata.num_rows for f in parquet_files(folder))


def live_schema(source: Path | str, columns: list[str]) -> pa.Schema:
    """The arrow schema of `id`, `_partition` and `columns` in parquet data at `source` (a file
    or a folder of files): what a global stage's input is written with (dask cannot infer list
    columns such as embeddings from pandas)."""
    path = location(source)
    first = path if path.is_file() else parquet_files(path)[0]
    schema = read_schema(first)
    return pa.schema([schema.field(c) for c in ["id", PARTITION_COLUMN, *columns]])


def decide_global(stage: GlobalStage, live: Any, decisions_dir: Path, input_dir: Path,
                  schema: pa.Schema) -> tuple[int, Path, Path]:
    """Run a global stage over `live` (a dask dataframe of the rows that reach it: `id`,
    `_partition` and the stage's columns, written with `schema`) and publish its drops under
    `decisions_dir`, one `_partition=<p>` folder per partition, and `live` itself under
    `input_dir`, in one pass over the input. Returns the number of drops and the two folders
    as published (on an object store, the attempt's own names: the marker must record them)."""
    import dask

    storage = storage_for(decisions_dir)
    tmp, tmp_input = storage.attempt_path(decisions_dir), storage.attempt_path(input_dir)
    (tmp_url, opts), (input_url, _) = dask_url(tmp), dask_url(tmp_input)
    # The task-based shuffle, not p2p: it recovers from workers dying mid-shuffle by
    # recomputing, where p2p was seen to hang under repeated worker deaths (tests/curate/
    # test_resume.py's chaos run). Only small columns move, so its overhead is affordable.
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        decisions = stage.decide(live)
        dask.compute(
            live.to_parquet(input_url, write_index=False, compute=False, schema=schema,
                            storage_options=opts),
            decisions.to_parquet(tmp_url, partition_on=[PARTITION_COLUMN], write_index=False,
                                 compute=False, storage_options=opts),
        )
    dropped = _count_rows(tmp)
    published = []
    for folder, final in ((tmp, decisions_dir), (tmp_input, input_dir)):
        published.append(storage.publish_dir(folder, final) if parquet_files(folder) else final)
    return dropped, published[0], published[1]


def _nullable_int64(dtype: pa.DataType) -> Any:
    import pandas as pd

    return pd.Int64Dtype() if dtype == pa.int64() else None


# pandas reads an int64 column holding a null as float64, which keeps 53 bits: a 64-bit hash
# (image_phash) would be rounded. Read int64 as pandas' nullable Int64 instead.
EXACT_INTEGERS: dict[str, Any] = {"types_mapper": _nullable_int64}


def read_live(files: list[Path], columns: list[str]) -> Any:
    """The rows of these intermediate files that no stage dropped, with `columns` (+ id and
    partition): what a global stage decides over."""
    import dask.dataframe as dd

    urls = [dask_url(f) for f in files]
    ddf = dd.read_parquet([u for u, _ in urls], columns=["id", PARTITION_COLUMN, "drop_reason", *columns],
                          split_row_groups=False, arrow_to_pandas=EXACT_INTEGERS,
                          storage_options=urls[0][1] if urls else None)
    return ddf[ddf["drop_reason"].isnull()].drop(columns=["drop_reason"])


def run_global(job: Job, seg: int) -> dict[str, Any]:
    """A global stage over the intermediate of segment `seg`, as a Dask dataframe pass."""
    storage = job.storage
    cfg = job.segments[seg].global_stage
    stage = build_stage(cfg)
    assert isinstance(stage, GlobalStage)
    marker_path = job.marker(f"global{seg}")
    fp = job.input_fingerprint()
    done = valid_marker(storage, marker_path, job, fp)
    if done is not None:
        return done
    files = job.seg_files(seg, [p for p, k in enumerate(job.kinds) if k in stage.kinds])
    dropped, decisions, inputs = 0, job.decisions_dir(seg), job.global_input_dir(seg)
    if files:
        dropped, decisions, inputs = decide_global(
            stage, read_live(files, stage.columns), decisions, inputs, live_schema(files[0], stage.columns))
    marker = {
        "step": f"global{seg}",
        "stage": stage.name,
        "recipe_hash": job.recipe_hash,
        "fingerprint": fp,
        "segment": seg,
        # rows the stage dropped, or, for a stage that removes segments (paragraph and image
        # dedup), documents it removed segments from
        "dropped": dropped,
        "decides_on": "segments" if _removes_segments(decisions) else "rows",
        **({"summary": stage.summary()} if stage.summary() else {}),
        # where its decisions and inputs live, relative to the output: the next segment and a
        # retry round read them
        "state": global_state(job, decisions, inputs),
    }
    storage.write_marker(marker_path, marker)
    return marker


def _removes_segments(decisions: Path) -> bool:
    files = parquet_files(decisions)
    return bool(files) and SEGMENTS_COLUMN in read_schema(files[0]).names


def global_state(job: Job, decisions: Path, inputs: Path) -> dict[str, str]:
    return {"decisions": relative(decisions, job.out), "input": relative(inputs, job.out)}


def write_manifest(job: Job, packs: list[dict[str, Any]], globals_: list[dict[str, Any]]) -> dict[str, Any]:
    storage = job.storage
    kinds: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(job.kinds)):
        shards = sorted(
            (s for m in packs if m["kind"] == kind for s in m["shards"]), key=lambda s: s["shard"]
        )
        kinds[kind] = {
            "shards": shards,
            "count": sum(s["count"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        }
        if kind == "pair":
            storage.write_json(job.out / KIND_DIRS[kind] / SIZES_JSON, sizes_json(shards))
    drops: Counter[str] = Counter()
    for m in packs:
        drops.update(m["drops"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": job.recipe.name,
        "code_version": code_version(),
        "recipe": job.recipe.model_dump(mode="json"),
        "recipe_hash": job.recipe_hash,
        "input_fingerprint": job.input_fingerprint(),
        "kinds": kinds,
        "ledger": sorted(m["ledger"] for m in packs),
        "counts": {
            "partitions": len(job.partitions),
            "inputs": sum(m["inputs"] for m in packs),
            "kept": sum(m["kept"] for m in packs),
            "dropped": sum(m["dropped"] for m in packs),
        },
        "drops": dict(sorted(drops.items())),  # "stage/reason" -> count
        "global": {g["stage"]: {k: v for k, v in g.items() if k not in ("recipe_hash", "fingerprint", "step")}
                   for g in globals_},
    }
    storage.write_json(job.out / MANIFEST, manifest)
    return manifest


def run_recipe(
    recipe: Recipe,
    *,
    restart: bool = False,
    progress: bool = True,
    client: Any = None,
) -> dict[str, Any]:
    """Run a recipe to completion (resuming whatever an earlier run finished); return the manifest.

    `client`: an existing dask Client to use instead of the recipe's cluster block.
    """
    job = plan_job(recipe)
    if not is_url(job.out):
        job.out.mkdir(parents=True, exist_ok=True)
    prepare_output(job, restart)
    own = None
    if client is None:
        own = _Cluster(recipe)
        client = own.client
    try:
        manifest = _execute(job, client, progress)
    finally:
        if own is not None:
            own.close()
    job.storage.remove_temporaries(job.out)
    if not recipe.execution.keep_intermediate:
        # the row data goes; global stages' decisions and inputs (small columns) stay for
        # `--retry-failed`
        for seg in range(len(job.segments)):
            job.storage.remove(job.seg_data(seg, 0).parent)
    remove_unnamed(job, manifest)
    return manifest


def remove_unnamed(job: Job, manifest: dict[str, Any]) -> None:
    """On an object store, delete the attempts of killed or twin tasks that no marker names
    (what `remove_temporaries` does on a local disk). Only call when no task is running."""
    storage = job.storage
    if not isinstance(storage, ObjectStorage):
        return
    named = {fs_path(inside(job.out, v))[0] for g in manifest.get("global", {}).values()
             for v in g.get("state", {}).values()}
    if job.recipe.execution.keep_intermediate:  # (otherwise the segments' folders are gone)
        for seg in range(len(job.segments)):
            named |= {fs_path(f)[0] for f in job.seg_files(seg, list(range(len(job.partitions))))}
            storage.remove_unnamed(job.seg_data(seg, 0).parent, named)
    storage.remove_unnamed(job.round_dir, named)


def _execute(job: Job, client: Any, progress: bool) -> dict[str, Any]:
    n = len(job.partitions)
    retries = job.recipe.execution.task_retries
    storage = job.storage
    globals_: list[dict[str, Any]] = []
    packs = storage.read_markers([job.marker("pack", p) for p in range(n)])
    if all(packs):  # finished earlier: only the manifest is (re)written, unless it exists
        manifest = storage.read_marker(job.out / MANIFEST)
        if manifest is not None and manifest.get("recipe_hash") == job.recipe_hash and \
                manifest.get("input_fingerprint") == job.input_fingerprint():
            return manifest  # may hold --retry-failed rounds: never rebuilt from round 0's packs
        for seg, s in enumerate(job.segments):
            if s.global_stage is not None:
                globals_.append(storage.read_marker(job.marker(f"global{seg}")) or {})
        return write_manifest(job, packs, globals_)
    for seg in range(len(job.segments)):
        resources = _segment_resources(job, seg)
        _check_resources(client, resources)
        _map(client, run_segment, [(job, seg, p) for p in range(n)], f"segment {seg}", progress,
             resources, retries)
        if job.segments[seg].global_stage is not None:
            globals_.append(run_global(job, seg))
    plans = _map(client, run_plan, [(job, p) for p in range(n)], "plan", progress, retries=retries)
    first: list[int] = []
    next_shard: Counter[str] = Counter()
    for p, plan in enumerate(plans):
        first.append(next_shard[job.kinds[p]])
        next_shard[job.kinds[p]] += len(plan["shard_counts"])
    packs = _map(client, run_pack, [(job, p, first[p], plans[p]["shard_counts"]) for p in range(n)],
                 "pack", progress, retries=retries)
    return write_manifest(job, packs, globals_)
