"""The source contract.

A source turns an input (a folder, tar shards, URL lists...) into deterministic partitions and
streams each partition as bounded Arrow tables in its kind's record schema.

- `partitions()` runs on the client: a cheap listing (names, sizes, mtimes; never the payloads).
  The same input yields the same partitions in the same order, and each partition carries a
  fingerprint of the inputs it covers, so a resumed run can tell that an input changed.
- `read(partition, batch_size)` runs on a worker and yields tables of at most `batch_size` rows,
  in a deterministic order. Every input sample appears exactly once, with a unique `id`
  ("<source name>:<locator>"). An input that cannot be read (a malformed mapping row, a member
  of a broken tar) still yields a row, dropped at stage "source" with a reason: nothing entering
  the system is lost silently.

A config's `limit` (a dry run) makes `build_source` return its first `limit` inputs only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from curate.contract import record_schema

SOURCE_STAGE = "source"


class SourceConfig(BaseModel):
    """Base of every source config; `kind` is the discriminator used in recipes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    name: str  # unique within a recipe; prefixes every sample id
    limit: int | None = Field(None, ge=1)  # a dry run: only the first `limit` inputs (`mm1 curate --limit N`)


@dataclass(frozen=True)
class Partition:
    """One unit of per-partition work: JSON-able, cheap to send to a worker."""

    source: str  # the source's name
    index: int  # position within its source
    payload: dict[str, Any] = field(default_factory=dict)  # what `read` needs (files, ranges)
    fingerprint: str = ""  # hash of the inputs covered (names, sizes, mtimes)


def fingerprint(items: Any) -> str:
    """A stable hash of JSON-able listing facts."""
    blob = json.dumps(items, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class Source:
    kind: ClassVar[str]  # recipe discriminator
    record_kind: ClassVar[str] = "pair"
    # Stage kinds a recipe must run on this source's rows (checked at load): a source of raw
    # HTML needs `html_extract` before its docs have segments.
    requires_stages: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[SourceConfig]]

    def __init__(self, config: SourceConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def partitions(self) -> list[Partition]:
        raise NotImplementedError

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        raise NotImplementedError

    # helpers for subclasses -------------------------------------------------------------------

    def schema(self) -> pa.Schema:
        return record_schema(self.record_kind)

    def batches(self, rows: Iterator[dict[str, Any]], batch_size: int) -> Iterator[pa.Table]:
        """Group row dicts into tables of at most `batch_size` rows in the record schema."""
        schema = self.schema()
        buf: list[dict[str, Any]] = []
        for row in rows:
            row.setdefault("source", self.name)
            buf.append(row)
            if len(buf) >= batch_size:
                yield pa.Table.from_pylist(buf, schema=schema)
                buf = []
        if buf:
            yield pa.Table.from_pylist(buf, schema=schema)

    def dropped_row(self, locator: str, reason: str, detail: str, **columns: Any) -> dict[str, Any]:
        """A row for an input that could not be read: it still reaches the ledger."""
        return {
            "id": f"{self.name}:{locator}",
            "source": self.name,
            "drop_stage": SOURCE_STAGE,
            "drop_reason": reason,
            "drop_detail": detail,
            **columns,
        }


SOURCES: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    kind = cls.Config.model_fields["kind"].default
    if not isinstance(kind, str) or kind in SOURCES:
        raise TypeError(f"{cls.__name__}: Config.kind must be a unique Literal default, got {kind!r}")
    cls.kind = kind
    SOURCES[kind] = cls
    return cls


# the rows a partition of a limited source yields (set by `Limited.partitions`)
LIMIT_KEY = "limit_rows"


class Limited:
    """The first `limit` inputs of a source, in its order: its partitions up to the one where the
    count is reached, that one cut short. Listing them reads those inputs on the client (only
    those: a dry run's few), since a listing does not say how many rows a partition holds."""

    def __init__(self, source: Source, limit: int):
        self.source, self.limit = source, limit

    def __getattr__(self, name: str) -> Any:  # everything else is the source's own
        if name == "source":  # not set yet (unpickling): no recursion through this method
            raise AttributeError(name)
        return getattr(self.source, name)

    def partitions(self) -> list[Partition]:
        kept: list[Partition] = []
        seen = 0
        for part in self.source.partitions():
            rows = 0
            for table in self.source.read(part, self.limit - seen):
                rows += table.num_rows
                if seen + rows >= self.limit:
                    break
            rows = min(rows, self.limit - seen)
            kept.append(Partition(part.source, part.index, {**part.payload, LIMIT_KEY: rows}, part.fingerprint))
            seen += rows
            if seen >= self.limit:
                break
        return kept

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        payload = dict(partition.payload)
        left = payload.pop(LIMIT_KEY)
        inner = Partition(partition.source, partition.index, payload, partition.fingerprint)
        for table in self.source.read(inner, batch_size):
            if left <= 0:
                return
            yield table.slice(0, left)
            left -= min(left, table.num_rows)


def build_source(config: SourceConfig) -> Source:
    """The source of `config`; with `limit`, its first `limit` inputs only (`Limited`)."""
    source = SOURCES[config.kind](config)
    return Limited(source, config.limit) if config.limit else source  # type: ignore[return-value]
