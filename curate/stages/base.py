"""The stage contract.

A stage is a small class with a typed config (pydantic), a `name`, the resources it needs, a batch
size, a lazy `setup()` (models load once per worker process, never in `__init__`) and
`process(table) -> table`. Stages never delete rows: a rejected row gets `drop_stage`,
`drop_reason` (a short stable code) and `drop_detail`. Scoring stages only add columns, declared
in `output_columns` so the runner knows the schema before any data flows. Only the image stage
and face_blur (which re-encodes only the images it blurred faces in) rewrite image bytes, besides
the download stage that fetches them; only the pack step writes tars.

Two shapes:
- `RowStage` (and `Filter`): per-partition work, run on bounded batches inside one Dask task.
- `GlobalStage`: a decision over the whole intermediate dataset (dedup, percentile thresholds),
  expressed on a Dask dataframe of small columns; it returns the ids to drop.

A new stage is one class plus `@register` and its test.
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, NamedTuple

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from curate.contract import conform
from curate.documents import (
    EMPTY_DOCUMENT,
    image_segment_index,
    image_views,
    is_empty,
    remove_segments,
    store_image_views,
    table_kind,
)


class StageConfig(BaseModel):
    """Base of every stage config. `kind` is the discriminator used in recipes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    # Error policy (webdataset's handler=): "drop" turns an unexpected per-sample exception into
    # a `stage_error` drop with the exception in the detail; "raise" fails the task (debugging).
    on_error: Literal["drop", "raise"] = "drop"
    # Named Dask worker resources a task running this stage holds, e.g. {"GPU": 1}. CPU stages
    # leave it empty: every worker runs them, its thread count bounds their concurrency.
    resources: dict[str, float] = Field(default_factory=dict)
    # The stage's name in the ledger (`stage` of a drop) and the manifest; defaults to the kind's
    # name. Set it to use one kind twice in a recipe (two CLIP models scoring the same pairs).
    name: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$")


class Drop(NamedTuple):
    """A decision to drop one sample: a stable code and the specifics."""

    reason: str
    detail: str = ""


STAGE_ERROR = "stage_error"


class Stage:
    """Common base: holds the config; subclasses set `name` and `Config`."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    kinds: ClassVar[tuple[str, ...]] = ("pair",)  # record kinds it applies to
    output_columns: ClassVar[dict[str, pa.DataType]] = {}
    # Sets `image_sha256` of every pair it keeps from the bytes it keeps (the image stage): a
    # digest the stage just before it computed would be thrown away unread.
    rewrites_image_digest: ClassVar[bool] = False

    def __init__(self, config: StageConfig):
        self.config = config
        self._ready = False
        if config.name:
            self.name = config.name  # type: ignore[misc]  # the recipe's name for this instance

    @property
    def resources(self) -> dict[str, float]:
        return dict(self.config.resources)

    @property
    def input_columns(self) -> list[str]:
        """Columns this stage reads beyond the record schema's own (checked when a recipe loads:
        an earlier stage must add them). Global stages read their `columns`."""
        return list(getattr(self, "columns", [])) if isinstance(self, GlobalStage) else []

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def setup(self) -> None:
        """Load models or other heavy state. Called once per worker process, lazily."""

    def check_recipe(self, earlier: list[Stage]) -> None:
        """Checks across stages, when the recipe loads: raise ValueError (saying what to change) if
        this stage cannot follow `earlier`, the recipe's stages before it in order (a score head
        reading the embeddings of another model's clip_score stage). Default: nothing to check."""

    # Per-partition facts beyond counts (download: DNS and connections per domain): a segment task
    # starts each partition with `begin_partition`, puts `partition_summary()` in its marker's
    # entry for the stage, and the manifest merges the partitions' entries with `merge_summaries`.
    def begin_partition(self) -> None:
        """Start this partition's facts from zero (in the task's thread)."""

    def partition_summary(self) -> dict[str, Any]:
        """This partition's facts, for its segment marker; {}: none."""
        return {}

    def followed_by(self, stage: Stage | None) -> None:
        """Which stage runs next on this stage's batches in a segment task (None: the segment's
        rows are written next), told before each partition (download skips a digest the next
        stage rewrites). Default: nothing."""

    @staticmethod
    def merge_summaries(measured: list[dict[str, Any]]) -> dict[str, Any]:
        """The run's facts from the partitions' marker entries (bounded in size); {}: none."""
        return {}

    def count(self, key: str, n: int = 1) -> None:
        """Add `n` to this stage's count `key` (faces blurred, emails replaced, rows a blocklist
        matched): a segment task sums them per stage into its marker, and the manifest's
        `stages.<name>.counts` over the run. Counted in the thread that runs `process` (see
        `counting`); a count made elsewhere (a pool thread) is not recorded."""
        counter = getattr(_COUNTING, "counter", None)
        if counter is not None and n:
            counter[key] += n


class RowStage(Stage):
    """A per-sample stage. Subclasses implement `process_row`, mutating the row dict in place
    (adding or updating columns) and returning None, or returning a `Drop`.

    Rows already dropped by an earlier stage pass through untouched.

    `per_image` stages (the image stage, the image filters) also apply to docs: `process_row`
    then runs once per image of a doc, on a pair-shaped view of it (`image`, `image_format`,
    `width`, ...; curate/documents.py), and a `Drop` removes that image's segment, not the
    document (recorded in its `segment_drops`). A doc left with no segment is dropped
    (`empty_document`); how many images a doc needs is for the document rules to say.
    """

    per_image: ClassVar[bool] = False
    # The record kind of the batch being processed: one stage instance serves batches of every
    # kind it applies to, one kind at a time, and `process_row` may need to know which.
    batch_kind: str = "pair"

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        raise NotImplementedError

    def _guarded(self, row: dict[str, Any]) -> Drop | None:
        try:
            return self.process_row(row)
        except Exception as exc:  # per-sample failure: the error policy decides
            if self.config.on_error == "raise":
                raise
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            return Drop(STAGE_ERROR, f"{type(exc).__name__}: {exc} ({tb.filename}:{tb.lineno})")

    def _each_image(self, row: dict[str, Any]) -> Drop | None:
        views = image_views(row)
        failed = {i: d for i, view in enumerate(views) if (d := self._guarded(view)) is not None}
        store_image_views(row, views)
        where = image_segment_index(row)
        remove_segments("doc", row, {where[i]: (d.reason, d.detail) for i, d in failed.items() if i in where},
                        self.name)
        if is_empty("doc", row):
            return Drop(EMPTY_DOCUMENT, "every segment removed")
        return None

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        self.batch_kind = table_kind(table.schema)
        each_image = self.per_image and self.batch_kind == "doc"
        rows = table.to_pylist()
        for row in rows:
            if row.get("drop_reason"):
                continue
            decision = self._each_image(row) if each_image else self._guarded(row)
            if decision is not None:
                mark_dropped(row, self.name, decision)
        schema = table.schema
        for name, dtype in self.output_columns.items():
            if schema.get_field_index(name) < 0:
                schema = schema.append(pa.field(name, dtype))
        return conform(pa.Table.from_pylist(rows, schema=schema), schema)


class Filter(RowStage):
    """Decides keep or drop; never changes a row otherwise (datatrove's filter shape)."""

    def check(self, row: dict[str, Any]) -> Drop | None:
        raise NotImplementedError

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        return self.check(row)


class GlobalStage(Stage):
    """A decision over all rows that reach it, computed through Dask, never on the client.

    `decide` receives a dask dataframe of the live (not yet dropped) rows with the columns
    `["id", "_partition", *self.columns]` and returns a dask dataframe with columns
    `["id", "_partition", "drop_reason", "drop_detail"]`: the rows to drop. It must be
    deterministic whatever the partitioning (tie rules on `id`). `summary` may return facts for
    the manifest (a cutoff, a group count), computed on the cluster.
    """

    columns: ClassVar[list[str]] = []

    def decide(self, live: Any) -> Any:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Facts of the last `decide` for the manifest (a cutoff, counts): small, JSON-able."""
        return {}


_COUNTING = threading.local()


@contextmanager
def counting() -> Iterator[Counter[str]]:
    """Collect the `Stage.count` calls this thread makes inside the block (one stage's `process`
    of one batch). Thread-local, so tasks sharing a worker process and its stage instances keep
    their counts apart."""
    outer = getattr(_COUNTING, "counter", None)
    _COUNTING.counter = counter = Counter()
    try:
        yield counter
    finally:
        _COUNTING.counter = outer


def mark_dropped(row: dict[str, Any], stage: str, drop: Drop) -> None:
    row["drop_stage"] = stage
    row["drop_reason"] = drop.reason
    row["drop_detail"] = drop.detail


# ---------------------------------------------------------------------------------------------
# Registry: recipe `kind` -> stage class
# ---------------------------------------------------------------------------------------------

STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    kind_field = cls.Config.model_fields["kind"]
    kind = kind_field.default
    if not isinstance(kind, str) or kind in STAGES:
        raise TypeError(f"{cls.__name__}: Config.kind must be a unique Literal default, got {kind!r}")
    STAGES[kind] = cls
    return cls


def build_stage(config: StageConfig) -> Stage:
    return STAGES[config.kind](config)
