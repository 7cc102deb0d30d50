"""`mm1 curate RECIPE --retry-failed`: fetch again only what an earlier run lost to transient
failures (timeouts, connection errors, 429, 5xx), and fold what comes back into the finished
output without rewriting a finished shard.

A round of retries, `r` (1 for the first, then 2, ...), works under `_work/retry<r>/` and runs
the run's own steps (`curate.engine.steps`, driven by `curate.engine.driver.run_segments` and
`run_plans`) on a `Job` whose `round` is r, over the partitions it retries:

    select  per partition: the ledger rows dropped for a transient reason -> ids/<p>.parquet
    seg*    per partition with ids: the source read again, only those ids, through every row
            stage of the recipe (the stages before the failing one pass them again: they are
            deterministic and passed them the first time)
    global  each global stage at or after the segment where the retried rows were dropped
            decides again over ALL the rows that reach it: the rows that reached it before
            (kept from the run: `Job.global_input_dir`) plus the recovered ones. Its new drops
            apply to the recovered rows, and may change earlier rows' outcomes: a recovered
            image whose id is smaller than an already shipped duplicate's makes the shipped one
            a duplicate (exact dedup keeps the smallest id). Such a shipped sample is
            *withdrawn*: its tar is not rewritten, the manifest lists its (shard, key) under
            `kinds.<kind>.withdrawn`, its ledger row says dropped with the stage's reason, and
            readers skip it (`curate.contract.withdrawn_refs`). Global stages before that
            segment saw the retried rows the first time (they were dropped later) and are not
            run again.
    plan, pack per partition touched: the recovered kept rows go into NEW shards, numbered after
            the kind's last shard and cut over the round's partitions as the run cuts them
            (each round's last shard of a kind may be short); the partition's ledger file is
            written anew (a new name, `ledger/<p>.r<r>.parquet`) with the retried and the changed rows updated and the
            attempts of both runs added up (the run's pack step, `steps.run_pack`, with
            `amend_ledger` as its ledger writer).
    manifest  written last, the round's amendment of the committed one (`curate.engine.manifest`):
            the commit point of the round (new shards, ledger files, withdrawn samples, counts,
            the global stages' new results and where their state lives, and a `retries` entry).
            Files of the round that the manifest does not name yet are ignored by readers, and a
            killed round resumes from its task markers when run again.

Equal to a run where everything succeeded the first time: the same kept set, the same image
bytes per sample, and the same ledger outcome (kept, or dropped at the same stage with the same
reason and detail) per id; shard names, keys and attempts differ. That holds for global stages
whose drops only grow when rows are added, as dedup's do (keep the smallest id). A stage whose
decision over more rows would keep a row it dropped before (a percentile threshold) cannot be
honoured -- that row's bytes were never kept -- and the round stops with RetryError saying so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.engine.cluster import connect, run_tasks
from curate.storage import dask_url, parquet_file, parquet_files, read_table, relative
from curate.contract import LEDGER_DIR, LEDGER_SCHEMA, inside, read_manifest
from curate.engine.driver import (
    EXACT_INTEGERS,
    count_rows,
    decide_global,
    global_state,
    live_schema,
    plan_job,
    prepare_output,
    read_live,
    rows_removed,
    run_plans,
    run_segments,
    shuffle_method,
)
from curate.engine.manifest import LEDGER_NAME, RETRY_COUNTS, ledger_by_partition, write_manifest
from curate.engine.pack import Cut, LedgerRows, cut_shards
from curate.recipe import Recipe
from curate.stages.base import GlobalStage, build_stage
from curate.stages.download import is_transient
from curate.engine.steps import PARTITION_COLUMN, Job, commit, finished, run_pack
from curate.engine.timing import GlobalPassClock

__all__ = ["RetryError", "amend_ledger", "retry_failed"]

log = logging.getLogger("mm1.curate")


class RetryError(RuntimeError):
    """The output cannot take a retry round (no finished run, an older format, a stage whose
    decision cannot be redone)."""


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def select_retry(job: Job, p: int, ledger: str) -> dict[str, Any]:
    """Per-partition task: list the ids of partition p that were dropped for a transient reason
    (with their attempts so far and the stage that dropped them)."""
    done = finished(job, "select", p)
    if done is not None:
        return done
    table = read_table(inside(job.out, ledger), columns=["id", "outcome", "stage", "drop_reason", "attempts"])
    reasons = table.column("drop_reason").to_pylist()
    mask = pa.array([is_transient(r) for r in reasons], pa.bool_())
    picked = table.filter(pc.and_(mask, pc.equal(table.column("outcome"), "dropped")))
    stages = sorted(set(picked.column("stage").to_pylist()))
    if picked.num_rows:
        storage = job.storage
        final = job.retry_ids(p)
        tmp = storage.attempt_path(final, deterministic=True)  # a function of the ledger
        with storage.open_write(tmp) as fh:
            pq.write_table(picked.select(["id", "stage", "attempts"]), fh)
        storage.publish(tmp, final)
    return commit(job, "select", p, count=picked.num_rows, stages=stages)


def _changes(job: Job, p: int) -> dict[str, tuple[str, str, str]]:
    """What this round's global passes decided anew about partition p's earlier rows:
    id -> (stage, reason, detail), the earliest stage first."""
    out: dict[str, tuple[str, str, str]] = {}
    for seg in range(len(job.segments)):
        d = _changes_dir(job, seg) / f"{PARTITION_COLUMN}={p}"
        if not parquet_files(d):
            continue
        for r in read_table(d, columns=["id", "drop_stage", "drop_reason", "drop_detail"]).to_pylist():
            out.setdefault(r["id"], (r["drop_stage"], r["drop_reason"], r["drop_detail"]))
    return out


def _changes_dir(job: Job, seg: int) -> Path:
    """This round's changes to earlier rows at segment `seg`'s global stage, as the stage's
    round marker names them."""
    marker = job.storage.read_marker(job.marker(f"global{seg}")) or {}
    return inside(job.out, marker["changes"]) if marker.get("changes") else job.round_dir / f"changes{seg}"


def _outcome_key(row: dict[str, Any]) -> str | None:
    return f"{row['stage']}/{row['drop_reason']}" if row["outcome"] == "dropped" else None


def amend_ledger(job: Job, p: int, rows: Iterator[dict[str, Any]], *, source: str) -> dict[str, Any]:
    """A retry round's ledger writer (`steps.run_pack`'s `ledger`): partition p's ledger file
    `source` (as the manifest names it) written anew under the round's name, in the same order,
    the retried ids' rows replaced by `rows` (their attempts added up) and the rows this round's
    global passes changed marked dropped. Returns what the pack marker records: the ledger, the
    shipped samples now withdrawn, the deltas to the manifest's totals and the round's counts."""
    storage = job.storage
    new_rows = {row["id"]: row for row in rows}  # (the recovered rows' shards are written here)
    changes = _changes(job, p)
    delta: Counter[str] = Counter()  # "kept", "dropped", and "drop:<stage>/<reason>"
    withdrawn: list[dict[str, str]] = []
    counts: Counter[str] = Counter()
    final = job.ledger_file(p)
    tmp = storage.attempt_path(final, deterministic=True)
    with storage.open_write(tmp) as fh, pq.ParquetWriter(fh, LEDGER_SCHEMA) as out:
        ledger_rows = LedgerRows(out)
        earlier = parquet_file(inside(job.out, source))
        for g in range(earlier.num_row_groups):
            for old in earlier.read_row_group(g).to_pylist():
                row = old
                if old["id"] in new_rows:
                    row = new_rows.pop(old["id"])
                    row["attempts"] = (old["attempts"] or 0) + (row["attempts"] or 0)
                    counts["retried"] += 1
                    counts["recovered" if row["outcome"] == "kept" else
                           "failed_again" if is_transient(row["drop_reason"]) else "dropped"] += 1
                elif old["id"] in changes:
                    stage, reason, detail = changes[old["id"]]
                    row = {**old, "outcome": "dropped", "stage": stage, "drop_reason": reason,
                           "drop_detail": detail, "shard": None, "key": None}
                    counts["changed"] += 1
                    if old["outcome"] == "kept":
                        withdrawn.append({"id": old["id"], "shard": old["shard"], "key": old["key"]})
                if row is not old:
                    for sign, r in ((-1, old), (1, row)):
                        delta[r["outcome"]] += sign
                        if (k := _outcome_key(r)) is not None:
                            delta[f"drop:{k}"] += sign
                ledger_rows.append(row)
        ledger_rows.close()
    if new_rows:  # an id the retry read that the ledger lacks: the source changed under us
        raise RuntimeError(f"partition {p}: retried ids not in its ledger: {sorted(new_rows)[:5]}")
    ledger_at = storage.publish(tmp, final)
    return {"ledger": relative(ledger_at, job.out), "withdrawn": withdrawn,
            "delta": {k: v for k, v in sorted(delta.items()) if v}, **{k: counts[k] for k in RETRY_COUNTS}}


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def _ledgers(manifest: dict[str, Any]) -> dict[int, str]:
    try:
        return ledger_by_partition(manifest)
    except ValueError as exc:
        raise RetryError(str(exc)) from None


def _global_entries(manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """segment -> the manifest's record of that segment's global stage."""
    return {g["segment"]: g for g in manifest.get("global", {}).values() if "segment" in g}


def _read_dir(path: Path, columns: list[str] | None = None) -> Any:
    """A parquet folder written by dask as a dask dataframe (`_partition` as int64), or None
    when it holds no file (a stage that had no rows)."""
    if not parquet_files(path):
        return None
    url, opts = dask_url(path)
    ddf = dd.read_parquet(url, columns=columns, arrow_to_pandas=EXACT_INTEGERS, storage_options=opts)
    if PARTITION_COLUMN in ddf.columns:
        ddf[PARTITION_COLUMN] = ddf[PARTITION_COLUMN].astype(str).astype("int64")
    return ddf


def _without(ddf: Any, ids: Any) -> Any:
    """`ddf` without the rows whose id is in the dataframe `ids` (an anti-join through dask)."""
    if ids is None:
        return ddf
    marked = ddf.merge(ids[["id"]].assign(_gone=True), on="id", how="left")
    return marked[marked["_gone"].isnull()].drop(columns=["_gone"])


def retry_global(job: Job, seg: int, state: dict[str, str], parts: list[int]) -> dict[str, Any]:
    """A global stage decided again over the rows that reached it before (minus those this
    round's earlier global passes dropped) plus the retried rows that reach it now. Publishes
    the new decisions and input under the round's folder, and this round's changes to earlier
    rows under `changes<seg>`; returns the stage's new record for the manifest."""
    storage = job.storage
    marker_path = job.marker(f"global{seg}")
    done = storage.read_marker(marker_path)
    if done is not None:
        return done
    # the run's shuffle for every join here too: p2p on a cluster (curate.engine.driver.decide_global)
    with dask.config.set({"dataframe.shuffle.method": shuffle_method()}), GlobalPassClock() as clock:
        marker = _retry_global(job, seg, state, parts)
    # its time and the rows that reached it this round, as the run's pass records them (the
    # round's `stages` in the manifest)
    decisions, inputs = (inside(job.out, marker["state"][k]) for k in ("decisions", "input"))
    rows_in = count_rows(inputs) if inputs.exists() else 0
    marker.update(wall_s=clock.wall_s, cpu_s=clock.cpu_s, rows_in=rows_in,
                  rows_out=rows_in - rows_removed(decisions) if decisions.exists() else rows_in)
    storage.write_marker(marker_path, marker)
    return marker


def _retry_global(job: Job, seg: int, state: dict[str, str], parts: list[int]) -> dict[str, Any]:
    storage = job.storage
    stage = build_stage(job.segments[seg].global_stage)
    assert isinstance(stage, GlobalStage)
    columns = ["id", PARTITION_COLUMN, *stage.columns]
    before = _read_dir(inside(job.out, state["input"]), columns)
    earlier = [_changes_dir(job, s) for s in range(seg)]
    for folder in earlier:
        before = _without(before, _read_dir(folder, ["id"])) if before is not None else None
    staged = [p for p in parts if job.kinds[p] in stage.kinds]
    files = job.seg_files(seg, staged)
    pieces = [x for x in (before, read_live(files, stage.columns, [job.kinds[p] for p in staged]) if files else None)
              if x is not None]
    dropped = changed = 0
    decisions, inputs, changes = job.decisions_dir(seg), job.global_input_dir(seg), None
    if pieces:
        live = dd.concat(pieces) if len(pieces) > 1 else pieces[0]
        # a retried row dropped at a later segment the first time reached this stage then too:
        # it is in both pieces, with the same values
        live = live.drop_duplicates(subset=["id"], split_out=max(1, live.npartitions))
        schema = live_schema(files if files else inside(job.out, state["input"]), stage.columns)
        dropped, decisions, inputs = decide_global(stage, live, decisions, inputs, schema)
        changed, changes = _publish_changes(job, seg, stage, state, parts, decisions, inputs)
    else:
        storage.remove(decisions)
        storage.remove(inputs)
    return {
        "step": f"global{seg}",
        "stage": stage.name,
        "segment": seg,
        "dropped": dropped,
        "changed": changed,
        **({"summary": stage.summary()} if stage.summary() else {}),
        "state": global_state(job, decisions, inputs),
        **({"changes": relative(changes, job.out)} if changes is not None else {}),
    }


def _publish_changes(job: Job, seg: int, stage: GlobalStage, state: dict[str, str],
                     parts: list[int], decisions: Path, inputs: Path) -> tuple[int, Path | None]:
    """Earlier rows whose decision at this stage changed: dropped now and not before, or dropped
    with another detail (the id a duplicate is kept for). Written per partition under
    `changes<seg>`; raises RetryError for a row the stage dropped before and would keep now."""
    storage = job.storage
    cols = ["id", PARTITION_COLUMN, "drop_reason", "drop_detail"]
    new = _read_dir(decisions, cols)
    old = _read_dir(inside(job.out, state["decisions"]), ["id", "drop_detail"])
    retried_urls = [dask_url(job.retry_ids(p)) for p in parts]
    retried = dd.read_parquet([u for u, _ in retried_urls], columns=["id"],
                              storage_options=retried_urls[0][1]) if retried_urls else None
    final = job.round_dir / f"changes{seg}"
    if old is not None:
        # dropped before, still reaching the stage, kept now: cannot be undone
        back = old.merge(new[["id"]].assign(_now=True), on="id", how="left") if new is not None \
            else old.assign(_now=None)
        reaching = _read_dir(inputs, ["id"])  # what the stage decided over now
        back = back[back["_now"].isnull()][["id"]].merge(reaching, on="id", how="inner")
        resurrected = back["id"].head(5, npartitions=-1).tolist()
        if resurrected:
            raise RetryError(
                f"global stage {stage.name!r} would now keep rows it dropped in an earlier run "
                f"(e.g. {resurrected}); their bytes were not kept, so --retry-failed cannot give "
                "what a full run would. Rerun the recipe with --restart instead."
            )
    if new is None:
        storage.remove(final)
        return 0, None
    if old is not None:
        joined = new.merge(old.rename(columns={"drop_detail": "_before"}), on="id", how="left")
        changes = joined[joined["_before"].isnull() | (joined["_before"] != joined["drop_detail"])]
        changes = changes.drop(columns=["_before"])
    else:
        changes = new
    changes = _without(changes, retried).assign(drop_stage=stage.name)
    tmp = storage.attempt_path(final)
    url, opts = dask_url(tmp)
    changes.to_parquet(url, partition_on=[PARTITION_COLUMN], write_index=False, storage_options=opts)
    files = parquet_files(tmp)
    if not files:
        return 0, None
    return sum(parquet_file(f).metadata.num_rows for f in files), storage.publish_dir(tmp, final)


def retry_failed(recipe: Recipe, *, progress: bool = True, client: Any = None) -> dict[str, Any]:
    """Run one retry round over a finished output of `recipe` (see the module docstring) and
    return the new manifest; with nothing to retry, the manifest as it is."""
    job0 = plan_job(recipe)
    try:
        manifest = read_manifest(job0.out)
    except FileNotFoundError:
        raise RetryError(
            f"{job0.out}: no finished run to retry; run `mm1 curate` on the recipe first "
            "(it resumes unfinished work)"
        ) from None
    if manifest.get("recipe_hash") != job0.recipe_hash or manifest.get("input_fingerprint") != job0.input_fingerprint():
        raise RetryError(
            f"{job0.out} holds a run of another recipe or input (recipe {manifest.get('recipe_hash')}, "
            f"now {job0.recipe_hash}): --retry-failed retries the same recipe on the same inputs"
        )
    prepare_output(job0, restart=False)
    ledgers = _ledgers(manifest)
    if sorted(ledgers) != list(range(len(job0.partitions))):
        raise RetryError(f"{job0.out}: the manifest's ledger files do not cover the {len(job0.partitions)} partitions")
    job = dataclasses.replace(job0, round=len(manifest.get("retries", [])) + 1)
    _cleanup(job, manifest)
    with connect(recipe, client) as client:
        n = len(job.partitions)
        retries = recipe.execution.task_retries
        selected = run_tasks(client, select_retry, [(job, p, ledgers[p]) for p in range(n)], "select", progress,
                             retries=retries)
        parts = [p for p in range(n) if selected[p]["count"]]
        if not parts:
            log.info("nothing to retry: no transient drop in %s", job.out)
            job.storage.remove(job.round_dir)
            return manifest
        first_seg = min(_segment_of(job, stage) for p in parts for stage in selected[p]["stages"])
        entries = _global_entries(manifest)

        def global_pass(job: Job, seg: int) -> dict[str, Any] | None:
            """Global stages at or after the first segment a retried row was dropped in decide again."""
            if seg < first_seg:
                return None
            entry = entries.get(seg)
            if entry is None or "state" not in entry:
                raise RetryError(
                    f"{job.out}: the manifest keeps no state for global stage "
                    f"{build_stage(job.segments[seg].global_stage).name!r} "
                    "(an output written before --retry-failed existed); rerun with --restart"
                )
            return retry_global(job, seg, entry["state"], parts)

        globals_ = run_segments(client, job, parts, progress, global_pass)
        touched = sorted(set(parts) | _changed_partitions(job))
        plans = run_plans(client, job, parts, progress)
        cuts = cut_shards(job.kinds, plans, recipe.output, after={
            kind: max((s["shard"] for s in entry["shards"]), default=-1) + 1
            for kind, entry in manifest["kinds"].items()
        }, kept=plans.kept)
        calls = [(job, p, cuts.get(p, Cut()), partial(amend_ledger, source=ledgers[p]), p in plans)
                 for p in touched]
        packs = run_tasks(client, run_pack, calls, "retry pack", progress, retries=retries)
    manifest = write_manifest(job, packs, globals_, earlier=manifest)
    _cleanup(job, manifest)
    return manifest


def _segment_of(job: Job, stage_name: str) -> int:
    for seg, segment in enumerate(job.segments):
        if any(build_stage(cfg).name == stage_name for cfg in segment.row_stages):
            return seg
    raise RetryError(f"ledger rows were dropped by stage {stage_name!r}, which the recipe has no row stage for")


def _changed_partitions(job: Job) -> set[int]:
    out: set[int] = set()
    for seg in range(len(job.segments)):
        folder = _changes_dir(job, seg)
        if folder.exists():
            out |= {int(d.name.split("=", 1)[1]) for d in folder.iterdir() if d.name.startswith(f"{PARTITION_COLUMN}=")}
    return out


def _cleanup(job: Job, manifest: dict[str, Any]) -> None:
    """Remove what the committed manifest no longer names: superseded ledger files, global
    state of earlier rounds, and the working files of committed rounds. The round in progress
    (`job.round`, not yet in the manifest) keeps its files, so a killed round resumes."""
    storage = job.storage
    named = set(manifest["ledger"])
    committed = len(manifest.get("retries", []))
    ledger_dir = job.out / LEDGER_DIR
    if ledger_dir.exists():
        for f in ledger_dir.iterdir():
            rel = f"{LEDGER_DIR}/{f.name}"
            m = LEDGER_NAME.match(rel)
            if m and rel not in named and int(m.group(2) or 0) <= committed:
                storage.remove(f)
    keep = {v for g in manifest.get("global", {}).values() for v in g.get("state", {}).values()}
    for r in range(0, committed + 1):
        root = job.work / f"retry{r}" if r else job.work
        if not root.exists():
            continue
        for entry in root.iterdir():
            rel = relative(entry, job.out)
            if entry.name.startswith("global") and entry.is_dir() and rel not in keep:
                storage.remove(entry)
            elif r and entry.name != "done" and not entry.name.startswith("global"):
                storage.remove(entry)  # a committed round's ids, rows and changes
