"""The Dask runner: turns a recipe into per-partition futures and global passes, and accounts for
every input.

A run is a fixed sequence of steps, each committed per partition (see `curate.engine.commit` and the
tasks in `curate.engine.steps`), on the cluster of `curate.engine.cluster`:

    seg0   per partition: source -> row stages up to the first global stage -> intermediate
    global per global stage: a Dask dataframe pass over small columns -> drop decisions
    seg1.. per partition: previous intermediate + decisions -> next row stages -> intermediate
    plan   per partition: its kept rows' tar footprints; the driver cuts each kind's shards
           over consecutive partitions (full shards: only a kind's last may be short)
    pack   per partition: the tars + sidecars of the shards it starts, + its ledger file
    manifest, written last by the driver from the pack markers (`curate.engine.manifest`)

A `--retry-failed` round (`curate.engine.retry`) runs the same steps through `run_segments` and
`run_plans` over the partitions it retries.

Everything a task writes is deterministic, so reruns skip finished work and give byte-identical
shards; the recipe hash and the input fingerprint guard against resuming a different run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import dask
from dask.distributed import default_client
import pandas as pd
import pyarrow as pa

from curate.engine.commit import ObjectStorage, storage_for
from curate.storage import (
    dask_url, fs_path, is_url, location, parquet_file, parquet_files, read_schema, read_table, relative,
)
from curate.contract import KIND_DIRS, LEDGER_DIR, MANIFEST, inside
from curate.engine.cluster import Step, StepLine, check_resources, connect, run_tasks, segment_resources
from curate.engine.manifest import write_manifest
from curate.engine.pack import cut_shards
from curate.engine.timing import GlobalPassClock
from curate.recipe import Recipe
from curate.sources.base import build_source
from curate.stages.base import GlobalStage, build_stage
from curate.engine.steps import (
    PARTITION_COLUMN,
    SEGMENTS_COLUMN,
    WORK,
    Job,
    ResumeError,
    plan_kept,
    run_pack,
    run_segment,
    split_segments,
    valid_marker,
)

__all__ = ["PlanFootprints", "ResumeError", "plan_job", "prepare_output", "run_global", "run_plans", "run_recipe", "run_segments"]


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


def count_rows(folder: Path) -> int:
    """Rows in the parquet files under `folder`, from their footers."""
    return sum(parquet_file(f).metadata.num_rows for f in parquet_files(folder))


def live_schema(sources: Path | str | list[Path], columns: list[str]) -> pa.Schema:
    """The arrow schema of `id`, `_partition` and `columns` in parquet data at `sources` (files,
    or a file or folder of files): what a global stage's input is written with (dask cannot infer
    list columns such as embeddings from pandas). A column is typed as the first file holding it
    has it (a stage over two record kinds reads columns one kind lacks); null in none."""
    if isinstance(sources, list):
        files = [location(f) for f in sources]
    else:
        path = location(sources)
        files = [path] if path.is_file() else parquet_files(path)
    fields: dict[str, pa.Field] = {}
    for f in files:
        schema = read_schema(f)
        fields.update({c: schema.field(c) for c in schema.names if c not in fields})
        if all(c in fields for c in ["id", PARTITION_COLUMN, *columns]):
            break
    return pa.schema([fields.get(c, pa.field(c, pa.null())) for c in ["id", PARTITION_COLUMN, *columns]])


DECISION_GROUP = 16  # runner partitions whose decisions one task writes
SHUFFLE_METHOD = "p2p"  # the global passes' shuffles (decide_global says why)


def shuffle_method() -> str:
    """SHUFFLE_METHOD on a distributed cluster; p2p needs one, so a pass computed by dask's local
    scheduler (a test's, one process) shuffles with tasks."""
    try:
        default_client()
    except ValueError:
        return "tasks"
    return SHUFFLE_METHOD


def decide_global(stage: GlobalStage, live: Any, decisions_dir: Path, input_dir: Path,
                  schema: pa.Schema) -> tuple[int, Path, Path]:
    """Run a global stage over `live` (a dask dataframe of the rows that reach it: `id`,
    `_partition` and the stage's columns, written with `schema`) and publish its drops under
    `decisions_dir`, one `_partition=<p>` folder per partition, and `live` itself under
    `input_dir`, in one pass over the input. Returns the number of drops and the two folders
    as published (on an object store, the attempt's own names: the marker must record them)."""
    storage = storage_for(decisions_dir)
    tmp, tmp_input = storage.attempt_path(decisions_dir), storage.attempt_path(input_dir)
    (tmp_url, opts), (input_url, _) = dask_url(tmp), dask_url(tmp_input)
    # The p2p shuffle (SHUFFLE_METHOD), chosen by measurement (tools/bench/global_passes.py,
    # BENCHMARKS.md): against the task-based shuffle at 1M rows on 2 workers, near_dedup took
    # 48.7 s instead of 72.5, a quarter of the tasks and 486 MiB of peak worker memory instead of
    # 1,154 (p2p streams its pieces through disk; the task shuffle holds them all in memory, so
    # its peak grows with the rows). An early dask's p2p once hung under repeated worker deaths;
    # this one finishes a pass with three workers killed in it (tests/curate/test_faults.py).
    with dask.config.set({"dataframe.shuffle.method": shuffle_method()}):
        # Decisions grouped by the runner's partition before they are written: a stage's output
        # partitions each hold drops of every runner partition, and `partition_on` would write a
        # file for every (output partition, runner partition) pair: P^2 files of a few rows (160,000
        # at 4M rows in 400 partitions), a cost growing faster than the rows. Shuffled on
        # `_partition` into one partition per DECISION_GROUP runner partitions: at most P files.
        decisions = stage.decide(live)
        decisions = decisions.shuffle(on=PARTITION_COLUMN,
                                      npartitions=max(1, -(-live.npartitions // DECISION_GROUP)))
        dask.compute(
            live.to_parquet(input_url, write_index=False, compute=False, schema=schema,
                            storage_options=opts),
            decisions.to_parquet(tmp_url, partition_on=[PARTITION_COLUMN], write_index=False, compute=False,
                                 schema=decision_schema(decisions.columns, schema), storage_options=opts),
        )
    dropped = count_rows(tmp)
    published = []
    for folder, final in ((tmp, decisions_dir), (tmp_input, input_dir)):
        published.append(storage.publish_dir(folder, final) if parquet_files(folder) else final)
    return dropped, published[0], published[1]


def decision_schema(columns: Any, live: pa.Schema) -> pa.Schema:
    """The arrow schema a global stage's decisions are written with: `id` and `_partition` as
    its input holds them, the rest text (dask would infer it from its own sample rows, which are
    no strings for an object column on pandas 3)."""
    return pa.schema([live.field(c) if c in live.names else pa.field(c, pa.string()) for c in columns])


def _nullable_int64(dtype: pa.DataType) -> Any:
    return pd.Int64Dtype() if dtype == pa.int64() else None


# pandas reads an int64 column holding a null as float64, which keeps 53 bits: a 64-bit hash
# (image_phash) would be rounded. Read int64 as pandas' nullable Int64 instead.
EXACT_INTEGERS: dict[str, Any] = {"types_mapper": _nullable_int64}


def read_live(files: list[Path], columns: list[str], kinds: list[str] | None = None) -> Any:
    """The rows of these intermediate files that no stage dropped, with `columns` (+ id and
    partition): what a global stage decides over. `kinds`: each file's record kind, for a stage
    over several: a kind's files may lack some of `columns` (a pair has no `segments`), which are
    read as nulls, typed as where another kind has them (one footer read per kind)."""
    import dask.dataframe as dd  # ~0.9 s of import: a run with no global stage never pays it

    wanted = ["id", PARTITION_COLUMN, "drop_reason", *columns]
    by_kind: dict[str, list[Path]] = {}
    for f, kind in zip(files, kinds or [""] * len(files)):
        by_kind.setdefault(kind, []).append(f)
    groups: dict[tuple[str, ...], list[Path]] = {}
    for group in by_kind.values():
        names = set(read_schema(group[0]).names) if kinds and len(by_kind) > 1 else set(wanted)
        groups.setdefault(tuple(c for c in wanted if c in names), []).extend(group)
    parts = []
    for present, group in groups.items():
        urls = [dask_url(f) for f in group]
        parts.append(dd.read_parquet([u for u, _ in urls], columns=list(present), split_row_groups=False,
                                     arrow_to_pandas=EXACT_INTEGERS, storage_options=urls[0][1] if urls else None))
    if len(parts) > 1:
        dtypes = {c: dtype for p in parts for c, dtype in p.dtypes.items()}
        parts = [p.map_partitions(_with_nulls, {c: dtypes.get(c, object) for c in wanted if c not in p.columns},
                                  wanted, meta=_with_nulls(p._meta, {c: dtypes.get(c, object) for c in wanted
                                                                     if c not in p.columns}, wanted))
                 for p in parts]
        ddf = dd.concat(parts)
    else:
        ddf = parts[0]
        missing = {c: object for c in wanted if c not in ddf.columns}
        if missing:
            ddf = ddf.map_partitions(_with_nulls, missing, wanted, meta=_with_nulls(ddf._meta, missing, wanted))
    return ddf[ddf["drop_reason"].isnull()].drop(columns=["drop_reason"])


def _with_nulls(part: pd.DataFrame, missing: dict[str, Any], order: list[str]) -> pd.DataFrame:
    """`part` with the `missing` columns as nulls of their dtypes, columns in `order`."""
    return part.assign(**{c: pd.Series([None] * len(part), index=part.index, dtype=dtype)
                          for c, dtype in missing.items()})[order]


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
    parts = [p for p, k in enumerate(job.kinds) if k in stage.kinds]
    files = job.seg_files(seg, parts)
    dropped, decisions, inputs = 0, job.decisions_dir(seg), job.global_input_dir(seg)
    with GlobalPassClock() as clock:
        if files:
            dropped, decisions, inputs = decide_global(
                stage, read_live(files, stage.columns, [job.kinds[p] for p in parts]), decisions, inputs,
                live_schema(files, stage.columns))
    rows_in = count_rows(inputs) if files else 0
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
        # the pass's time (curate.engine.timing) and the rows that reached it and that it kept
        # whole (a stage removing segments keeps the rows it only takes segments from)
        "wall_s": clock.wall_s, "cpu_s": clock.cpu_s, "rows_in": rows_in,
        "rows_out": rows_in - rows_removed(decisions),
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


def rows_removed(decisions: Path) -> int:
    """The rows a global stage's decisions drop whole (not those it removes segments from)."""
    if not _removes_segments(decisions):
        return count_rows(decisions)
    # file by file: a folder read skips the `_partition=<p>` folders (a leading underscore)
    return sum(1 for f in parquet_files(decisions)
               for s in read_table(f, columns=[SEGMENTS_COLUMN]).column(0).to_pylist() if not s)


def global_state(job: Job, decisions: Path, inputs: Path) -> dict[str, str]:
    """Where a global stage's decisions and inputs live, relative to the output (its manifest
    entry's `state`: the next segment and a retry round read them)."""
    return {"decisions": relative(decisions, job.out), "input": relative(inputs, job.out)}


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
    with connect(recipe, client) as client:
        manifest = _execute(job, client, progress)
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


def _seg_tally(call: tuple, result: dict[str, Any]) -> tuple[int, int, int]:
    """A segment task's partition: its rows, those still kept, those dropped by now."""
    dropped = sum(result["dropped"].values())
    return result["rows"], result["rows"] - dropped, dropped


def _stage_names(configs: Any) -> str:
    return " > ".join(build_stage(cfg).name for cfg in configs) or "copy"


def run_segments(client: Any, job: Job, parts: list[int], progress: bool,
                 global_pass: Callable[[Job, int], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Every segment's row stages over partitions `parts`, each segment followed by its global
    stage through `global_pass(job, seg)` (None: the stage is not run in this round). Returns
    the global passes' markers, in segment order. Each step shows its line (`Step`): samples
    done (of the first segment's rows, once known), kept and dropped so far."""
    retries = job.recipe.execution.task_retries
    label = "retry " if job.round else ""
    globals_: list[dict[str, Any]] = []
    total: int | None = None
    for seg, segment in enumerate(job.segments):
        resources = segment_resources(job, seg)
        check_resources(client, resources)
        step = Step(f"{label}segment {seg}: {_stage_names(segment.row_stages)}", _seg_tally, total)
        results = run_tasks(client, run_segment, [(job, seg, p) for p in parts], step, progress, resources, retries)
        total = sum(r["rows"] for r in results)
        if segment.global_stage is None:
            continue
        kept = sum(_seg_tally((), r)[1] for r in results)
        line = StepLine(Step(f"{label}global {seg}: {_stage_names([segment.global_stage])}", _seg_tally, total),
                        len(parts), quiet=not progress)
        try:
            marker = global_pass(job, seg)
            if marker is not None:
                globals_.append(marker)
                kept -= marker["rows_in"] - marker["rows_out"] if "rows_in" in marker else marker["dropped"]
            line.add(total, kept, total - kept, len(parts))
        finally:
            line.close()
    return globals_


def segment_rows(job: Job, parts: list[int]) -> dict[int, int]:
    """Partition -> its rows (kept and dropped), as its last segment's marker counts them."""
    markers = job.storage.read_markers([job.marker(f"seg{len(job.segments) - 1}", p) for p in parts])
    return {p: m["rows"] for p, m in zip(parts, markers)}


class PlanFootprints(Mapping[int, list[int]]):
    """Each planned partition's kept rows' footprints, read back from its plan marker when
    `cut_shards` reaches it, PLAN_BATCH markers at a time; `kept[p]`: the counts. The driver
    holds one batch, not every kept row of the run (a Python int a row: ~36 GB at a billion)."""

    def __init__(self, job: Job, kept: dict[int, int]):
        self.job, self.kept = job, kept
        self._order = sorted(kept, key=lambda p: (job.kinds[p], p))  # as cut_shards asks: kind by kind
        self._place = {p: i for i, p in enumerate(self._order)}
        self._batch: dict[int, list[int]] = {}

    def __getitem__(self, p: int) -> list[int]:
        if p not in self.kept:
            raise KeyError(p)
        if p not in self._batch:
            i = self._place[p]
            parts = self._order[i:i + PLAN_BATCH]
            markers = self.job.storage.read_markers([self.job.marker("plan", q) for q in parts])
            self._batch = {}
            for q, marker in zip(parts, markers):
                if marker is None or len(marker.get("footprints", ())) != self.kept[q]:
                    raise ResumeError(f"{self.job.marker('plan', q)}: the plan marker is missing or changed "
                                      "during the run")
                self._batch[q] = marker["footprints"]
        return self._batch[p]

    def __contains__(self, p: object) -> bool:
        return p in self.kept

    def __iter__(self) -> Iterator[int]:
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)


PLAN_BATCH = 256  # plan markers read at once by PlanFootprints (concurrent GETs on an object store)


def run_plans(client: Any, job: Job, parts: list[int], progress: bool) -> PlanFootprints:
    """Plans each partition (`run_plan`: its kept rows' footprints, in its marker) and returns
    the footprints for `cut_shards`, read back from the markers as it goes."""
    rows = segment_rows(job, parts)

    def tally(call: tuple, result: dict[str, Any]) -> tuple[int, int, int]:
        return rows[call[1]], result["kept"], rows[call[1]] - result["kept"]

    step = Step("retry plan" if job.round else "plan", tally, sum(rows.values()))
    plans = run_tasks(client, plan_kept, [(job, p) for p in parts], step, progress,
                      retries=job.recipe.execution.task_retries)
    return PlanFootprints(job, {p: plan["kept"] for p, plan in zip(parts, plans)})


def _pack_tally(call: tuple, result: dict[str, Any]) -> tuple[int, int, int]:
    return result["inputs"], result["kept"], result["dropped"]


def _execute(job: Job, client: Any, progress: bool) -> dict[str, Any]:
    n = len(job.partitions)
    storage = job.storage
    packs = storage.read_markers([job.marker("pack", p) for p in range(n)])
    if all(packs):  # finished earlier: only the manifest is (re)written, unless it exists
        manifest = storage.read_marker(job.out / MANIFEST)
        if manifest is not None and manifest.get("recipe_hash") == job.recipe_hash and \
                manifest.get("input_fingerprint") == job.input_fingerprint():
            return manifest  # may hold --retry-failed rounds: never rebuilt from round 0's packs
        globals_ = [storage.read_marker(job.marker(f"global{seg}")) or {}
                    for seg, s in enumerate(job.segments) if s.global_stage is not None]
        return write_manifest(job, packs, globals_)
    parts = list(range(n))
    globals_ = run_segments(client, job, parts, progress, run_global)
    plans = run_plans(client, job, parts, progress)
    cuts = cut_shards(job.kinds, plans, job.recipe.output, kept=plans.kept)
    step = Step("pack", _pack_tally, sum(segment_rows(job, parts).values()))
    packs = run_tasks(client, run_pack, [(job, p, cuts[p]) for p in parts], step, progress,
                      retries=job.recipe.execution.task_retries)
    return write_manifest(job, packs, globals_)
