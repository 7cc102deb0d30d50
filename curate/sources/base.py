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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from curate.contract import record_schema

SOURCE_STAGE = "source"


class SourceConfig(BaseModel):
    """Base of every source config; `kind` is the discriminator used in recipes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    name: str  # unique within a recipe; prefixes every sample id


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


def build_source(config: SourceConfig) -> Source:
    return SOURCES[config.kind](config)
