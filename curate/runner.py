"""The Dask runner: turns a recipe into per-partition futures and global passes, and accounts for
every input.

A run is a fixed sequence of steps, each of which commits per partition (see `curate.commit`):

    seg0   per partition: source -> row stages up to the first global stage -> intermediate parquet
    global per stage: a Dask dataframe pass over small columns -> drop decisions, by partition
    seg1.. per partition: previous intermediate + decisions -> next row stages -> intermediate
    plan   per partition: how many shards its kept rows fill (count and byte caps)
    pack   per partition: tars + sidecars (globally numbered from the plan) + the ledger file
    manifest, written last by the driver from the pack markers

Rows are never deleted: dropped rows travel to the end with their payload cleared and become
ledger rows. Memory per task is bounded by the batch size, not by the partition's length.
Everything a task writes is deterministic, so reruns skip finished work and give byte-identical
shards; the recipe hash and the input fingerprint guard against resuming a different run.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.commit import Storage
from curate.contract import (
    FORMAT_VERSION,
    HEAVY_COLUMNS,
    KIND_DIRS,
    LEDGER_DIR,
    LEDGER_SCHEMA,
    MANIFEST,
    PACK_STAGE,
    SIZES_JSON,
    UNSUPPORTED_FORMAT,
    conform,
    domain_of,
    record_schema,
    sizes_json,
    unpackable,
)
from curate.pack import ShardWriter, plan_shards, sample_footprint, shard_label
from curate.recipe import Recipe
from curate.sources.base import Partition, build_source, fingerprint
from curate.stages.base import GlobalStage, RowStage, Stage, build_stage

log = logging.getLogger("mm1.curate")

WORK = "_work"
PARTITION_COLUMN = "_partition"
# Rows per row group of a ledger file: fixed, so the ledger's bytes do not depend on the
# execution-only batch size (a run resumed with another batch size stays byte-identical).
LEDGER_ROWS_PER_GROUP = 1024


class ResumeError(RuntimeError):
    """The output folder holds a run of a different recipe or input."""


# ---------------------------------------------------------------------------------------------
# The plan: what runs where, derived from the recipe (cheap; done on the client)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Row stages run in one task per partition, optionally followed by one global stage."""

    index: int
    row_stages: tuple[Any, ...]  # stage configs
    global_stage: Any | None  # stage config


def split_segments(recipe: Recipe) -> list[Segment]:
    segments, current = [], []
    for cfg in recipe.stages:
        if isinstance(build_stage(cfg), GlobalStage):
            segments.append(Segment(len(segments), tuple(current), cfg))
            current = []
        else:
            current.append(cfg)
    if current or not segments:  # a trailing global stage needs no empty copy pass after it
        segments.append(Segment(len(segments), tuple(current), None))
    return segments


@dataclass
class Job:
    """Everything a task needs; pickled to workers (small: configs and listings)."""

    recipe: Recipe
    out: Path
    recipe_hash: str
    segments: list[Segment]
    partitions: list[Partition] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # record kind per partition

    @property
    def work(self) -> Path:
        return self.out / WORK

    def seg_data(self, seg: int, p: int) -> Path:
        return self.work / f"seg{seg}" / f"{p:05d}.parquet"

    def marker(self, step: str, p: int | None = None) -> Path:
        return self.work / "done" / (f"{step}.json" if p is None else f"{step}-{p:05d}.json")

    def decisions_dir(self, seg: int) -> Path:
        return self.work / f"global{seg}"

    def input_fingerprint(self) -> str:
        return fingerprint([[p.source, p.index, p.fingerprint] for p in self.partitions])


def segment_schema(job: Job, kind: str, seg: int) -> pa.Schema:
    """Record schema after segment `seg` for `kind`: base + every column stages added so far."""
    added: dict[str, pa.DataType] = {}
    for s in job.segments[: seg + 1]:
        for cfg in s.row_stages:
            stage = build_stage(cfg)
            if kind in stage.kinds:
                added.update(stage.output_columns)
    return record_schema(kind, added).append(pa.field(PARTITION_COLUMN, pa.int32()))


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------

_STAGE_CACHE: dict[str, Stage] = {}


def _stage(cfg: Any) -> Stage:
    """One stage instance per worker process, so models load once (lazily, in setup())."""
    key = cfg.model_dump_json()
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = build_stage(cfg)
    return _STAGE_CACHE[key]


def _valid_marker(storage: Storage, path: Path, job: Job, fp: str) -> dict | None:
    marker = storage.read_marker(path)
    if marker is None:
        return None
    if marker.get("recipe_hash") != job.recipe_hash or marker.get("fingerprint") != fp:
        raise ResumeError(
            f"{path} was written by another recipe or input "
            f"(recipe {marker.get('recipe_hash')} vs {job.recipe_hash}); rerun with --restart"
        )
    return marker


def _decisions(job: Job, seg: int, p: int) -> dict[str, tuple[str, str, str]]:
    """The global stage's drops for one partition: id -> (stage, reason, detail)."""
    gcfg = job.segments[seg].global_stage
    d = job.decisions_dir(seg) / f"{PARTITION_COLUMN}={p}"
    if gcfg is None or not d.exists():
        return {}
    name = build_stage(gcfg).name
    table = pq.read_table(d, columns=["id", "drop_reason", "drop_detail"])
    return {
        r["id"]: (name, r["drop_reason"], r["drop_detail"])
        for r in table.to_pylist()
    }


def _apply_decisions(table: pa.Table, decisions: dict[str, tuple[str, str, str]]) -> pa.Table:
    if not decisions:
        return table
    rows = table.to_pylist()
    for row in rows:
        hit = decisions.get(row["id"])
        if hit and not row.get("drop_reason"):
            row["drop_stage"], row["drop_reason"], row["drop_detail"] = hit
    return pa.Table.from_pylist(rows, schema=table.schema)


def _clear_dropped_payload(table: pa.Table) -> pa.Table:
    """Dropped rows keep their metadata but not their bytes: they only feed the ledger."""
    if table.num_rows == 0:
        return table
    live = pc.is_null(table.column("drop_reason"))
    for name in HEAVY_COLUMNS:
        i = table.schema.get_field_index(name)
        if i >= 0:
            col = table.column(i)
            nulls = pa.nulls(table.num_rows, col.type)
            table = table.set_column(i, table.schema.field(i), pc.if_else(live, col, nulls))
    return table


def iter_row_groups(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Read an intermediate file one row group at a time. Each write of a segment task is one
    row group of at most `batch_size` rows, so this bounds memory by the batch size
    (`ParquetFile.iter_batches` reads ahead and grew with the file: see BENCHMARKS.md)."""
    f = pq.ParquetFile(path)
    for i in range(f.num_row_groups):
        yield f.read_row_group(i, columns=columns)


def _segment_input(job: Job, seg: int, p: int) -> Iterator[pa.Table]:
    if seg == 0:
        batch_size = job.recipe.execution.batch_size
        part = job.partitions[p]
        source = build_source(next(s for s in job.recipe.sources if s.name == part.source))
        yield from source.read(part, batch_size)
        return
    decisions = _decisions(job, seg - 1, p)
    for table in iter_row_groups(job.seg_data(seg - 1, p)):
        yield _apply_decisions(table, decisions)


def run_segment(job: Job, seg: int, p: int) -> dict[str, Any]:
    """Per-partition task: read, run the segment's row stages, commit the intermediate."""
    storage = Storage()
    part = job.partitions[p]
    marker_path = job.marker(f"seg{seg}", p)
    done = _valid_marker(storage, marker_path, job, part.fingerprint)
    if done is not None:
        return done
    kind = job.kinds[p]
    stages = [_stage(c) for c in job.segments[seg].row_stages]
    stages = [s for s in stages if kind in s.kinds]
    schema = segment_schema(job, kind, seg)
    final = job.seg_data(seg, p)
    tmp = storage.attempt_path(final)
    rows = 0
    drops: Counter[str] = Counter()
    with storage.open_write(tmp) as fh, pq.ParquetWriter(fh, schema, compression="zstd") as writer:
        for table in _segment_input(job, seg, p):
            for stage in stages:
                table = stage.process(table)
            table = table.append_column(PARTITION_COLUMN, pa.array([p] * table.num_rows, pa.int32())) \
                if PARTITION_COLUMN not in table.column_names else table
            table = _clear_dropped_payload(conform(table, schema))
            writer.write_table(table)
            rows += table.num_rows
            for stage_name, reason in zip(
                table.column("drop_stage").to_pylist(), table.column("drop_reason").to_pylist()
            ):
                if reason:
                    drops[f"{stage_name}/{reason}"] += 1
    storage.publish(tmp, final)
    marker = {
        "step": f"seg{seg}",
        "partition": p,
        "recipe_hash": job.recipe_hash,
        "fingerprint": part.fingerprint,
        "rows": rows,
        "dropped": dict(sorted(drops.items())),
    }
    storage.write_marker(marker_path, marker)
    return marker


def _final_rows(job: Job, p: int, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of partition p after the last segment and the last global decisions, with rows
    that cannot be written as samples dropped at stage "pack" (plan and pack both see this)."""
    last = len(job.segments) - 1
    kind = job.kinds[p]
    decisions = _decisions(job, last, p)
    for table in iter_row_groups(job.seg_data(last, p), columns):
        for row in table.to_pylist():
            hit = decisions.get(row["id"])
            if hit and not row.get("drop_reason"):
                row["drop_stage"], row["drop_reason"], row["drop_detail"] = hit
            if not row.get("drop_reason"):
                problem = unpackable(kind, row)
                if problem:
                    row["drop_stage"], row["drop_reason"], row["drop_detail"] = (
                        PACK_STAGE, UNSUPPORTED_FORMAT, problem)
            yield row


def _footprint(kind: str, row: dict[str, Any]) -> int:
    """Bytes the sample takes in a tar, from the row without its payload bytes."""
    from curate.contract import encode_sample, sample_key

    stub = dict(row)
    if kind == "pair":
        stub["image"] = b""
        payload = [row["image_nbytes"] or 0]
    elif kind == "doc":
        n = len(row.get("image_formats") or [])
        stub["images"] = [b""] * n
        payload = list(row.get("image_nbytes_list") or [0] * n)
    else:
        payload = []
    sizes = [len(data) for _, data in encode_sample(kind, stub, sample_key(0, 0))]
    if kind == "pair":
        sizes[0] = payload[0]
    elif kind == "doc":
        sizes[1:] = payload
    return sample_footprint(sizes)


def run_plan(job: Job, p: int) -> dict[str, Any]:
    """Per-partition task: the shard cut of this partition's kept rows."""
    storage = Storage()
    part = job.partitions[p]
    marker_path = job.marker("plan", p)
    done = _valid_marker(storage, marker_path, job, part.fingerprint)
    if done is not None:
        return done
    kind = job.kinds[p]
    schema = pq.read_schema(job.seg_data(len(job.segments) - 1, p))
    columns = [n for n in schema.names if n not in HEAVY_COLUMNS]
    footprints = (
        _footprint(kind, row) for row in _final_rows(job, p, columns) if not row.get("drop_reason")
    )
    out = job.recipe.output
    counts = plan_shards(footprints, out.shard_max_samples, out.shard_max_bytes)
    marker = {
        "step": "plan",
        "partition": p,
        "recipe_hash": job.recipe_hash,
        "fingerprint": part.fingerprint,
        "shard_counts": counts,
    }
    storage.write_marker(marker_path, marker)
    return marker


def _ledger_row(kind: str, row: dict[str, Any], shard: str | None, key: str | None) -> dict[str, Any]:
    segments_total = segments_dropped = None
    if kind == "doc":
        segments_total = len(json.loads(row.get("segments") or "[]"))
        segments_dropped = len(json.loads(row.get("segment_drops") or "[]"))
        segments_total += segments_dropped
    attempts = row.get("attempts")
    return {
        "id": row["id"],
        "kind": kind,
        "source": row["source"],
        "url": row.get("url"),
        "domain": domain_of(row.get("url")),
        "outcome": "dropped" if row.get("drop_reason") else "kept",
        "stage": row.get("drop_stage"),
        "drop_reason": row.get("drop_reason"),
        "drop_detail": row.get("drop_detail"),
        "attempts": 1 if attempts is None else attempts,
        "shard": shard,
        "key": key,
        "segments_total": segments_total,
        "segments_dropped": segments_dropped,
    }


def run_pack(job: Job, p: int, first_shard: int, shard_counts: list[int]) -> dict[str, Any]:
    """Per-partition task: write this partition's shards and its ledger file."""
    storage = Storage()
    part = job.partitions[p]
    marker_path = job.marker("pack", p)
    done = _valid_marker(storage, marker_path, job, part.fingerprint)
    if done is not None:
        return done
    kind = job.kinds[p]
    last = len(job.segments) - 1
    record = pq.read_schema(job.seg_data(last, p))
    ledger_final = job.out / LEDGER_DIR / f"{p:05d}.parquet"
    ledger_tmp = storage.attempt_path(ledger_final)
    shards: list[dict[str, Any]] = []
    plan = list(shard_counts)
    writer: ShardWriter | None = None
    buffer: list[dict[str, Any]] = []
    kept = dropped = 0
    drops: Counter[str] = Counter()
    with storage.open_write(ledger_tmp) as fh, pq.ParquetWriter(fh, LEDGER_SCHEMA) as ledger:
        for row in _final_rows(job, p):
            if row.get("drop_reason"):
                buffer.append(_ledger_row(kind, row, None, None))
                dropped += 1
                drops[f"{row['drop_stage']}/{row['drop_reason']}"] += 1
            else:
                if writer is None:
                    writer = ShardWriter(storage, job.out, kind, first_shard + len(shards), record)
                key = writer.write(row)
                buffer.append(_ledger_row(kind, row, shard_label(kind, writer.shard), key))
                kept += 1
                if writer.count == plan[len(shards)]:
                    shards.append(writer.close())
                    writer = None
            if len(buffer) >= LEDGER_ROWS_PER_GROUP:
                ledger.write_table(pa.Table.from_pylist(buffer, schema=LEDGER_SCHEMA))
                buffer = []
        if buffer:
            ledger.write_table(pa.Table.from_pylist(buffer, schema=LEDGER_SCHEMA))
    if writer is not None or len(shards) != len(plan):
        raise RuntimeError(f"partition {p}: packed {len(shards)} shards, planned {len(plan)}")
    storage.publish(ledger_tmp, ledger_final)
    marker = {
        "step": "pack",
        "partition": p,
        "kind": kind,
        "recipe_hash": job.recipe_hash,
        "fingerprint": part.fingerprint,
        "shards": shards,
        "ledger": ledger_final.relative_to(job.out).as_posix(),
        "inputs": kept + dropped,
        "kept": kept,
        "dropped": dropped,
        "drops": dict(sorted(drops.items())),
    }
    storage.write_marker(marker_path, marker)
    return marker


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


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
    out = Path(out or recipe.output.path)
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
    storage = Storage()
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


class _Cluster:
    """A client on the recipe's scheduler, or on a LocalCluster we start (127.0.0.1 only)."""

    def __init__(self, recipe: Recipe):
        from dask.distributed import Client, LocalCluster

        cfg = recipe.cluster
        self.cluster = None
        if cfg.address:
            self.client = Client(cfg.address, timeout="30s")
        else:
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


def _gather(client: Any, futures: list, desc: str, progress: bool) -> list[dict[str, Any]]:
    from dask.distributed import as_completed
    from tqdm import tqdm

    results: dict[Any, dict[str, Any]] = {}
    bar = tqdm(total=len(futures), desc=desc, unit="part", disable=not progress, file=sys.stderr)
    try:
        for fut in as_completed(futures):
            results[fut.key] = fut.result()  # a task's exception is a bug: it stops the run
            bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return [results[f.key] for f in futures]


def _segment_resources(job: Job, seg: int) -> dict[str, float]:
    needed: dict[str, float] = {}
    for cfg in job.segments[seg].row_stages:
        for k, v in cfg.resources.items():
            needed[k] = max(needed.get(k, 0), v)
    return needed


def run_global(job: Job, seg: int) -> dict[str, Any]:
    """A global stage over the intermediate of segment `seg`, as a Dask dataframe pass."""
    import dask.dataframe as dd

    storage = Storage()
    cfg = job.segments[seg].global_stage
    stage = build_stage(cfg)
    assert isinstance(stage, GlobalStage)
    marker_path = job.marker(f"global{seg}")
    fp = job.input_fingerprint()
    done = _valid_marker(storage, marker_path, job, fp)
    if done is not None:
        return done
    files = [str(job.seg_data(seg, p)) for p, k in enumerate(job.kinds) if k in stage.kinds]
    final = job.decisions_dir(seg)
    tmp = storage.attempt_path(final)
    dropped = 0
    if files:
        cols = ["id", PARTITION_COLUMN, "drop_reason", *stage.columns]
        ddf = dd.read_parquet(files, columns=cols, split_row_groups=False)
        live = ddf[ddf["drop_reason"].isnull()].drop(columns=["drop_reason"])
        decisions = stage.decide(live)
        decisions.to_parquet(str(tmp), partition_on=[PARTITION_COLUMN], write_index=False)
        if tmp.exists():
            for f in tmp.rglob("*.parquet"):
                dropped += pq.ParquetFile(f).metadata.num_rows
    if tmp.exists():
        storage.publish_dir(tmp, final)
    marker = {
        "step": f"global{seg}",
        "stage": stage.name,
        "recipe_hash": job.recipe_hash,
        "fingerprint": fp,
        "dropped": dropped,
    }
    storage.write_marker(marker_path, marker)
    return marker


def write_manifest(job: Job, packs: list[dict[str, Any]], globals_: list[dict[str, Any]]) -> dict[str, Any]:
    storage = Storage()
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
    Storage().remove_temporaries(job.out)
    if not recipe.execution.keep_intermediate:
        for seg in range(len(job.segments)):
            Storage().remove(job.work / f"seg{seg}")
            Storage().remove(job.decisions_dir(seg))
    return manifest


def _execute(job: Job, client: Any, progress: bool) -> dict[str, Any]:
    n = len(job.partitions)
    retries = job.recipe.execution.task_retries
    globals_: list[dict[str, Any]] = []
    packs_done = all(Storage().read_marker(job.marker("pack", p)) for p in range(n))
    if not packs_done:
        for seg in range(len(job.segments)):
            resources = _segment_resources(job, seg)
            _check_resources(client, resources)
            futures = [
                client.submit(run_segment, job, seg, p, key=f"seg{seg}-{p}-{job.recipe_hash}",
                              resources=resources or None, retries=retries, pure=False)
                for p in range(n)
            ]
            _gather(client, futures, f"segment {seg}", progress)
            if job.segments[seg].global_stage is not None:
                globals_.append(run_global(job, seg))
        futures = [
            client.submit(run_plan, job, p, key=f"plan-{p}-{job.recipe_hash}", retries=retries, pure=False)
            for p in range(n)
        ]
        plans = _gather(client, futures, "plan", progress)
        first: list[int] = []
        next_shard: Counter[str] = Counter()
        for p, plan in enumerate(plans):
            first.append(next_shard[job.kinds[p]])
            next_shard[job.kinds[p]] += len(plan["shard_counts"])
        futures = [
            client.submit(run_pack, job, p, first[p], plans[p]["shard_counts"],
                          key=f"pack-{p}-{job.recipe_hash}", retries=retries, pure=False)
            for p in range(n)
        ]
        packs = _gather(client, futures, "pack", progress)
    else:
        packs = [Storage().read_marker(job.marker("pack", p)) for p in range(n)]
        for seg, s in enumerate(job.segments):
            if s.global_stage is not None:
                globals_.append(Storage().read_marker(job.marker(f"global{seg}")) or {})
    return write_manifest(job, packs, globals_)
