"""Per-partition tasks: what a Dask worker runs, and the job description they share.

Each task commits its outputs by the protocol of `curate.engine.commit` and ends by writing its done
marker; run again, it returns the marker without doing anything (Dask may run a task twice,
even at once: every write is idempotent). The three tasks, per partition:

    run_segment  source (or the previous intermediate + global decisions) -> row stages ->
                 intermediate parquet, one row group per batch
    run_plan     how many shards the partition's kept rows fill (count and byte caps)
    run_pack     tars + sidecars, globally numbered from the plan, and the partition's ledger file

Rows are never deleted: dropped rows travel to the end with their payload cleared and become
ledger rows. Memory per task is bounded by the batch size, not by the partition's length.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.engine.commit import Storage, parquet_file, parquet_files, read_schema, read_table, relative, storage_for
from curate.documents import EMPTY_DOCUMENT, is_empty, load_segments, remove_segments, segment_counts
from curate.contract import (
    HEAVY_COLUMNS,
    inside,
    LEDGER_DIR,
    LEDGER_SCHEMA,
    PACK_STAGE,
    UNSUPPORTED_FORMAT,
    conform,
    domain_of,
    encode_sample,
    record_schema,
    sample_key,
    unpackable,
)
from curate.engine.pack import ShardWriter, plan_shards, sample_footprint, shard_label
from curate.recipe import Recipe
from curate.tokens import TokenCounter
from curate.sources.base import Partition, build_source, fingerprint
from curate.stages.base import GlobalStage, Stage, build_stage

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


def commit(job: Job, step: str, p: int, **content: Any) -> dict[str, Any]:
    """Write a task's done marker, last: from now on readers trust its outputs. On an object
    store the first marker stands: a twin attempt that finishes later returns it, and its own
    attempt objects stay unnamed (swept at the end of the run)."""
    if job.storage.remote:
        earlier = finished(job, step, p)
        if earlier is not None:
            return earlier
    marker = {
        "step": step,
        "partition": p,
        "recipe_hash": job.recipe_hash,
        "fingerprint": job.partitions[p].fingerprint,
        **content,
    }
    job.storage.write_marker(job.marker(step, p), marker)
    return marker


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
        row["drop_stage"], row["drop_reason"], row["drop_detail"] = stage, reason, detail
        return
    remove_segments(kind, row, {int(i): (reason, detail) for i in segments}, stage)
    if is_empty(kind, row):
        row["drop_stage"], row["drop_reason"] = stage, EMPTY_DOCUMENT
        row["drop_detail"] = f"every segment removed ({reason}: {detail})"


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
    """Per-partition task: read, run the segment's row stages, commit the intermediate."""
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
    data = storage.publish(tmp, final)
    return commit(job, f"seg{seg}", p, rows=rows, dropped=dict(sorted(drops.items())),
                  data=relative(data, job.out))


def _final_rows(job: Job, p: int, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
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
                row["drop_stage"], row["drop_reason"], row["drop_detail"] = (
                    PACK_STAGE, EMPTY_DOCUMENT, "nothing left to write")
            if not row.get("drop_reason"):
                problem = unpackable(kind, row)
                if problem:
                    row["drop_stage"], row["drop_reason"], row["drop_detail"] = (
                        PACK_STAGE, UNSUPPORTED_FORMAT, problem)
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
            row["drop_stage"], row["drop_reason"], row["drop_detail"] = (
                PACK_STAGE, EMPTY_DOCUMENT, "every segment removed (images never fetched)")


def _footprint(kind: str, row: dict[str, Any]) -> int:
    """Bytes the sample takes in a tar, from the row without its payload bytes."""
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
    done = finished(job, "plan", p)
    if done is not None:
        return done
    kind = job.kinds[p]
    schema = read_schema(job.seg_file(len(job.segments) - 1, p))
    columns = [n for n in schema.names if n not in HEAVY_COLUMNS]
    footprints = (
        _footprint(kind, row) for row in _final_rows(job, p, columns) if not row.get("drop_reason")
    )
    out = job.recipe.output
    counts = plan_shards(footprints, out.shard_max_samples, out.shard_max_bytes)
    return commit(job, "plan", p, shard_counts=counts)


def _ledger_row(kind: str, row: dict[str, Any], shard: str | None, key: str | None) -> dict[str, Any]:
    segments_total, segments_dropped = segment_counts(kind, row)
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


class LedgerRows:
    """Ledger rows written to an open parquet writer in row groups of LEDGER_ROWS_PER_GROUP, so a
    ledger file's bytes never depend on the batch size. `close()` writes what is left."""

    def __init__(self, writer: pq.ParquetWriter):
        self.writer, self.buffer = writer, []

    def append(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= LEDGER_ROWS_PER_GROUP:
            self.close()

    def close(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=LEDGER_SCHEMA))
            self.buffer = []


def run_pack(job: Job, p: int, first_shard: int, shard_counts: list[int]) -> dict[str, Any]:
    """Per-partition task: write this partition's shards and its ledger file."""
    done = finished(job, "pack", p)
    if done is not None:
        return done
    storage = job.storage
    kind = job.kinds[p]
    last = len(job.segments) - 1
    record = read_schema(job.seg_file(last, p))
    ledger_final = job.out / LEDGER_DIR / f"{p:05d}.parquet"
    ledger_tmp = storage.attempt_path(ledger_final, deterministic=True)
    shards: list[dict[str, Any]] = []
    plan = list(shard_counts)
    tokens = job.token_counter()
    writer: ShardWriter | None = None
    kept = dropped = 0
    drops: Counter[str] = Counter()
    with storage.open_write(ledger_tmp) as fh, pq.ParquetWriter(fh, LEDGER_SCHEMA) as out:
        ledger = LedgerRows(out)
        for row in _final_rows(job, p):
            if row.get("drop_reason"):
                ledger.append(_ledger_row(kind, row, None, None))
                dropped += 1
                drops[f"{row['drop_stage']}/{row['drop_reason']}"] += 1
            else:
                if writer is None:
                    writer = ShardWriter(storage, job.out, kind, first_shard + len(shards), record, tokens)
                key = writer.write(row)
                ledger.append(_ledger_row(kind, row, shard_label(kind, writer.shard), key))
                kept += 1
                if writer.count == plan[len(shards)]:
                    shards.append(writer.close())
                    writer = None
        ledger.close()
    if writer is not None or len(shards) != len(plan):
        raise RuntimeError(f"partition {p}: packed {len(shards)} shards, planned {len(plan)}")
    ledger_at = storage.publish(ledger_tmp, ledger_final)
    return commit(
        job, "pack", p,
        kind=kind,
        shards=shards,
        ledger=relative(ledger_at, job.out),
        inputs=kept + dropped,
        kept=kept,
        dropped=dropped,
        drops=dict(sorted(drops.items())),
    )
