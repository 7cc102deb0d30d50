"""Per-partition tasks: what a Dask worker runs, and the job description they share.

Each task commits its outputs by the protocol of `curate.engine.commit` and ends by writing its done
marker; run again, it returns the marker without doing anything (Dask may run a task twice,
even at once: every write is idempotent). The three tasks, per partition:

    run_segment  source (or the previous intermediate + global decisions) -> row stages ->
                 intermediate parquet, one row group per batch
    run_plan     the tar footprint of each kept row (the driver cuts each kind's rows, over
                 consecutive partitions, into full shards: `pack.cut_shards`)
    run_pack     the tars + sidecars of the shards the partition starts (the last one filled
                 from the next partitions' rows), keyed by the cut, and the partition's ledger file, through a ledger writer: `write_ledger` writes it anew
                 (the run), `curate.engine.retry.amend_ledger` amends the earlier one (a retry round)

A `--retry-failed` round runs the same tasks on a `Job` whose `round` is r > 0 (its files under
`_work/retry<r>/`, its source reads limited to the ids it retries).

Rows are never deleted: dropped rows travel to the end with their payload cleared and become
ledger rows. Memory per task is bounded by the batch size, not by the partition's length.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.engine.commit import Storage, storage_for
from curate.storage import parquet_file, parquet_files, read_schema, read_table, relative
from curate.documents import EMPTY_DOCUMENT, is_empty, load_segments, remove_segments
from curate.contract import (
    HEAVY_COLUMNS,
    inside,
    LEDGER_DIR,
    LEDGER_SCHEMA,
    PACK_STAGE,
    UNSUPPORTED_FORMAT,
    conform,
    record_schema,
    sample_key,
    unpackable,
)
from curate.engine.timing import StageTimes
from curate.engine.pack import Cut, LedgerRows, ShardWriter, ledger_row, row_footprint, shard_label
from curate.recipe import Recipe
from curate.tokens import TokenCounter
from curate.sources.base import Partition, build_source, fingerprint
from curate.stages.base import Drop, GlobalStage, Stage, build_stage, mark_dropped

WORK = "_work"
PARTITION_COLUMN = "_partition"


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
    # 0: the run itself; r > 0: the r-th `--retry-failed` round (curate/engine/retry.py), whose tasks
    # read only the ids listed in `retry_ids(p)` and keep their files under _work/retry<r>/
    round: int = 0

    @property
    def storage(self) -> Storage:
        """The storage that commits under `out` (a local disk or an object store)."""
        return storage_for(self.out)

    @property
    def work(self) -> Path:
        return self.out / WORK

    @property
    def round_dir(self) -> Path:
        return self.work / f"retry{self.round}" if self.round else self.work

    def seg_data(self, seg: int, p: int) -> Path:
        return self.round_dir / f"seg{seg}" / f"{p:05d}.parquet"

    def marker(self, step: str, p: int | None = None) -> Path:
        return self.round_dir / "done" / (f"{step}.json" if p is None else f"{step}-{p:05d}.json")

    def seg_file(self, seg: int, p: int) -> Path:
        """Segment `seg`'s committed rows of partition p: the file its done marker names (on an
        object store an attempt's own name; `seg_data` where the marker names none)."""
        return self.seg_files(seg, [p])[0]

    def seg_files(self, seg: int, parts: list[int]) -> list[Path]:
        """`seg_file` of many partitions, their markers read at once."""
        markers = self.storage.read_markers([self.marker(f"seg{seg}", p) for p in parts])
        return [inside(self.out, m["data"]) if m and m.get("data") else self.seg_data(seg, p)
                for p, m in zip(parts, markers)]

    def global_dirs(self, seg: int) -> tuple[Path, Path]:
        """(decisions, input) folders of the global stage ending segment `seg` in this round,
        as its done marker names them (the default names where it names none)."""
        marker = self.storage.read_marker(self.marker(f"global{seg}")) or {}
        state = marker.get("state") or {}
        return (inside(self.out, state["decisions"]) if "decisions" in state else self.decisions_dir(seg),
                inside(self.out, state["input"]) if "input" in state else self.global_input_dir(seg))

    def decisions_dir(self, seg: int) -> Path:
        """The drops a global stage decided, one `_partition=<p>` folder per partition."""
        return self.round_dir / f"global{seg}"

    def global_input_dir(self, seg: int) -> Path:
        """The small columns of every row that reached a global stage (kept after the run:
        a `--retry-failed` round decides again over them plus the recovered rows)."""
        return self.round_dir / f"global{seg}-input"

    def retry_ids(self, p: int) -> Path:
        return self.round_dir / "ids" / f"{p:05d}.parquet"

    def ledger_file(self, p: int) -> Path:
        """Partition p's ledger file as this round writes it: `ledger/<p>.parquet`, and
        `ledger/<p>.r<round>.parquet` in a retry round (the manifest names which one counts)."""
        return self.out / LEDGER_DIR / (f"{p:05d}.r{self.round}.parquet" if self.round else f"{p:05d}.parquet")

    def token_counter(self) -> TokenCounter | None:
        """The recipe's tokenizer, for the sidecars' token counts (None: no counts)."""
        tok = self.recipe.tokenizer
        return TokenCounter(tok.path, tok.id) if tok is not None else None

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


def loaded_stages() -> list[Stage]:
    """The stages this process has built for tasks (a worker's: which work it did)."""
    return list(_STAGE_CACHE.values())


def valid_marker(storage: Storage, path: Path, job: Job, fp: str) -> dict | None:
    """The done marker at `path` if the task finished for this recipe and input, else None."""
    marker = storage.read_marker(path)
    if marker is None:
        return None
    if marker.get("recipe_hash") != job.recipe_hash or marker.get("fingerprint") != fp:
        raise ResumeError(
            f"{path} was written by another recipe or input "
            f"(recipe {marker.get('recipe_hash')} vs {job.recipe_hash}); rerun with --restart"
        )
    return marker


def finished(job: Job, step: str, p: int) -> dict | None:
    """The marker of a task that already ran for this recipe and input (then it is skipped)."""
    return valid_marker(job.storage, job.marker(step, p), job, job.partitions[p].fingerprint)


def commit(job: Job, step: str, p: int, attempt: tuple[Path, Path] | None = None,
           **content: Any) -> dict[str, Any]:
    """Publish the task's `attempt` (its file, the final name) and write its done marker, last:
    from now on readers trust its outputs. The first marker stands (`Storage.commit`): a twin
    attempt, which the network may have fed otherwise, returns it and drops its own file, so a
    marker's counts are always those of the file it names."""
    marker = {"step": step, "partition": p, "recipe_hash": job.recipe_hash,
              "fingerprint": job.partitions[p].fingerprint, **content}
    return job.storage.commit(job.marker(step, p), marker, lambda: finished(job, step, p), attempt, job.out)


# A global stage's decision on one row: (stage, reason, detail, segments). `segments` None drops
# the row; a list of indices (a JSON string in the decisions' `segments` column) removes those segments of a doc or paragraphs of a text instead
# (exact-paragraph dedup), and drops the row only when nothing is left of it.
Decision = tuple[str, str, str, list[int] | None]
SEGMENTS_COLUMN = "segments"


def _decisions(job: Job, seg: int, p: int) -> dict[str, Decision]:
    """The global stage's decisions for one partition, by id."""
    gcfg = job.segments[seg].global_stage
    if gcfg is None:
        return {}
    d = job.global_dirs(seg)[0] / f"{PARTITION_COLUMN}={p}"
    files = parquet_files(d)
    if not files:
        return {}
    name = build_stage(gcfg).name
    columns = ["id", "drop_reason", "drop_detail"]
    if SEGMENTS_COLUMN in read_schema(files[0]).names:
        columns.append(SEGMENTS_COLUMN)
    table = read_table(d, columns=columns)
    return {
        r["id"]: (name, r["drop_reason"], r["drop_detail"],
                  json.loads(r[SEGMENTS_COLUMN]) if r.get(SEGMENTS_COLUMN) else None)
        for r in table.to_pylist()
    }


def apply_decision(kind: str, row: dict[str, Any], hit: Decision | None) -> None:
    """Apply a global decision to a live row (a dropped row stays as it was dropped)."""
    if hit is None or row.get("drop_reason"):
        return
    stage, reason, detail, segments = hit
    if segments is None:
        mark_dropped(row, stage, Drop(reason, detail))
        return
    remove_segments(kind, row, {int(i): (reason, detail) for i in segments}, stage)
    if is_empty(kind, row):
        mark_dropped(row, stage, Drop(EMPTY_DOCUMENT, f"every segment removed ({reason}: {detail})"))


def _apply_decisions(kind: str, table: pa.Table, decisions: dict[str, Decision]) -> pa.Table:
    if not decisions:
        return table
    rows = table.to_pylist()
    for row in rows:
        apply_decision(kind, row, decisions.get(row["id"]))
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
    f = parquet_file(path)
    for i in range(f.num_row_groups):
        yield f.read_row_group(i, columns=columns)


def _segment_input(job: Job, seg: int, p: int) -> Iterator[pa.Table]:
    if seg == 0:
        batch_size = job.recipe.execution.batch_size
        part = job.partitions[p]
        source = build_source(next(s for s in job.recipe.sources if s.name == part.source))
        if not job.round:
            yield from source.read(part, batch_size)
            return
        # a retry round: the source read again, only the listed ids kept (url lists are cheap
        # to re-read; what costs is the download, and only these rows are fetched again)
        wanted = read_table(job.retry_ids(p), columns=["id"]).column("id")
        for table in source.read(part, batch_size):
            table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
            if table.num_rows:
                yield table
        return
    decisions = _decisions(job, seg - 1, p)
    for table in iter_row_groups(job.seg_file(seg - 1, p)):
        yield _apply_decisions(job.kinds[p], table, decisions)


def run_segment(job: Job, seg: int, p: int) -> dict[str, Any]:
    """Per-partition task: read, run the segment's row stages, commit the intermediate. The
    marker counts its rows and the drops so far, and each stage's time (`stages`: StageTimes)."""
    done = finished(job, f"seg{seg}", p)
    if done is not None:
        return done
    storage = job.storage
    kind = job.kinds[p]
    stages = [_stage(c) for c in job.segments[seg].row_stages]
    stages = [s for s in stages if kind in s.kinds]
    schema = segment_schema(job, kind, seg)
    final = job.seg_data(seg, p)
    tmp = storage.attempt_path(final)
    rows = 0
    drops: Counter[str] = Counter()
    times = StageTimes()
    for stage, after in zip(stages, [*stages[1:], None]):  # per-partition facts start at zero
        stage.begin_partition()
        stage.followed_by(after)
    codecs = {n: "NONE" if n in ("image", "images") else "ZSTD" for n in schema.names}  # images don't compress
    with storage.open_write(tmp) as fh, pq.ParquetWriter(fh, schema, compression=codecs) as writer:
        for table in _segment_input(job, seg, p):
            for stage in stages:
                table = times.run(stage.name, stage.process, table)
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
    for stage in stages:  # into its marker entry (manifest.stage_times merges them)
        times.totals.get(stage.name, {}).update(stage.partition_summary())
    return commit(job, f"seg{seg}", p, (tmp, final), rows=rows, dropped=dict(sorted(drops.items())),
                  stages=times.totals)


def final_rows(job: Job, p: int, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of partition p after the last segment and the last global decisions, with rows
    that cannot be written as samples dropped at stage "pack" (plan and pack both see this)."""
    last = len(job.segments) - 1
    kind = job.kinds[p]
    decisions = _decisions(job, last, p)
    for table in iter_row_groups(job.seg_file(last, p), columns):
        for row in table.to_pylist():
            apply_decision(kind, row, decisions.get(row["id"]))
            if kind == "doc" and not row.get("drop_reason"):
                unfetched_images(row)
            if not row.get("drop_reason") and is_empty(kind, row):
                mark_dropped(row, PACK_STAGE, Drop(EMPTY_DOCUMENT, "nothing left to write"))
            if not row.get("drop_reason"):
                problem = unpackable(kind, row)
                if problem:
                    mark_dropped(row, PACK_STAGE, Drop(UNSUPPORTED_FORMAT, problem))
            yield row


NOT_FETCHED = "image_not_fetched"


def unfetched_images(row: dict[str, Any]) -> None:
    """A doc's image segments that still have no bytes (a recipe without the download stage, an
    OBELICS source) cannot be written: they are removed at stage "pack", each recorded, and a
    doc left with nothing is dropped."""
    gone = {i: (NOT_FETCHED, f"no stage fetched {s.get('url')!r}") for i, s in enumerate(load_segments(row))
            if s.get("type") == "image" and s.get("image") is None}
    if gone:
        remove_segments("doc", row, gone, PACK_STAGE)
        if is_empty("doc", row):
            mark_dropped(row, PACK_STAGE, Drop(EMPTY_DOCUMENT, "every segment removed (images never fetched)"))


def run_plan(job: Job, p: int) -> dict[str, Any]:
    """The footprint (bytes in a tar) of each of partition p's kept rows, in order, from the small
    columns only, in its marker: the driver cuts its kind's shards from them (`cut_shards`)."""
    done = finished(job, "plan", p)
    if done is not None:
        if "footprints" in done:
            return done
        job.storage.remove(job.marker("plan", p))  # a marker of the per-partition cut: plan again
    columns = [n for n in read_schema(job.seg_file(len(job.segments) - 1, p)).names if n not in HEAVY_COLUMNS]
    footprints = [row_footprint(job.kinds[p], row) for row in final_rows(job, p, columns) if not row.get("drop_reason")]
    return commit(job, "plan", p, footprints=footprints)


def plan_kept(job: Job, p: int) -> dict[str, int]:
    """`run_plan` as the driver's task: only the count comes back (`driver.PlanFootprints`)."""
    return {"kept": len(run_plan(job, p)["footprints"])}


def pack_rows(job: Job, p: int, cut: Cut, shards: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The ledger rows of partition p's final rows, in order, each kept one keyed by its place
    in `cut`. The shards p starts are written on the way (their last samples read from the
    partitions in `cut.then` when p's rows run out), each closed shard's manifest entry
    appended to `shards`. Raises when the rows do not fill the cut."""
    kind = job.kinds[p]
    record = read_schema(job.seg_file(len(job.segments) - 1, p))
    tokens = job.token_counter()
    writer: ShardWriter | None = None
    at, index = 0, cut.skip  # the shard of `cut.shards` the next kept row goes to, and its index there
    for row in final_rows(job, p):
        if row.get("drop_reason"):
            yield ledger_row(kind, row, None, None)
            continue
        if at >= len(cut.shards):
            raise RuntimeError(f"partition {p}: more kept rows than its cut ({cut})")
        shard, count = cut.shards[at]
        if index == 0:
            writer = ShardWriter(job.storage, job.out, kind, shard, record, tokens)
        key = writer.write(row) if writer is not None else sample_key(shard, index)
        yield ledger_row(kind, row, shard_label(kind, shard), key)
        index += 1
        if index == count:
            if writer is not None:
                shards.append(writer.close())
            writer, at, index = None, at + 1, 0
    if writer is not None:  # the last shard p starts: filled from the next partitions' kept rows
        count = cut.shards[at][1]
        more = (row for q in cut.then for row in final_rows(job, q) if not row.get("drop_reason"))
        for row in islice(more, count - writer.count):
            writer.write(row)
        if writer.count != count:
            raise RuntimeError(f"partition {p}: shard {writer.shard} got {writer.count} of {count} planned samples")
        shards.append(writer.close())
        at += 1
    elif index:  # the last shard holding p's rows is written by the partition that starts it
        at += 1
    if at != len(cut.shards):
        raise RuntimeError(f"partition {p}: its kept rows filled {at} of the {len(cut.shards)} shards of its cut")


def write_ledger(job: Job, p: int, rows: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The run's ledger writer: partition p's ledger file written from `rows` (the ledger rows of
    every input of the partition, in order); returns what the pack marker records about it."""
    storage = job.storage
    final = job.ledger_file(p)
    tmp = storage.attempt_path(final, deterministic=True)
    kept = dropped = 0
    drops: Counter[str] = Counter()
    with storage.open_write(tmp) as fh, pq.ParquetWriter(fh, LEDGER_SCHEMA) as out:
        ledger = LedgerRows(out)
        for row in rows:
            ledger.append(row)
            if row["outcome"] == "kept":
                kept += 1
            else:
                dropped += 1
                drops[f"{row['stage']}/{row['drop_reason']}"] += 1
        ledger.close()
    ledger_at = storage.publish(tmp, final)
    return {"ledger": relative(ledger_at, job.out), "inputs": kept + dropped, "kept": kept,
            "dropped": dropped, "drops": dict(sorted(drops.items()))}


# (job, partition, the partition's ledger rows) -> what the pack marker records of its ledger
LedgerWriter = Callable[[Job, int, Iterator[dict[str, Any]]], dict[str, Any]]


def run_pack(job: Job, p: int, cut: Cut, ledger: LedgerWriter = write_ledger,
             has_rows: bool = True) -> dict[str, Any]:
    """Per-partition task: write the shards this partition starts and its ledger file.

    The same step serves the run and a retry round: `cut` (from `cut_shards`) numbers and cuts
    the shards, `ledger` writes the ledger file from the rows' ledger rows, and
    `has_rows` False packs no row (a retry round amending the ledger of a partition it read
    no row of, for decisions its global passes changed)."""
    done = finished(job, "pack", p)
    if done is not None:
        return done
    shards: list[dict[str, Any]] = []
    rows = pack_rows(job, p, cut, shards) if has_rows else iter(())
    written = ledger(job, p, rows)  # the shards are written as it consumes the rows
    return commit(job, "pack", p, kind=job.kinds[p], shards=shards, **written)
