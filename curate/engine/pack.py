"""Packing records into WebDataset tars + parquet sidecars (the only code that writes tars), and
the ledger rows the pack step writes beside them.

A shard is written under an attempt-unique temporary name, hashed while it is written, and then
published (see `curate.engine.commit`). Tars are deterministic: members in sample order, fixed
mtime/uid/gid/mode, ustar format, regular files with safe names only. Shard boundaries are
planned before writing (`plan_shards`), by sample count and bytes, so shard numbers can be
assigned globally before any shard exists.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from curate.engine.commit import Storage
from curate.recipe import OutputConfig
from curate.storage import location, relative
from curate.tokens import TokenCounter
from curate.contract import (
    KIND_DIRS,
    LEDGER_SCHEMA,
    domain_of,
    encode_sample,
    is_safe_member,
    member_footprint,
    sample_key,
    shard_stem,
    sidecar_path,
    sidecar_row,
    sidecar_table,
    tar_path,
)
from curate.documents import segment_counts

TAR_MTIME = 0  # fixed, so a rerun gives byte-identical tars
TAR_END = 2 * 512
# Rows per row group of a ledger file: fixed, so the ledger's bytes do not depend on the
# execution-only batch size (a run resumed with another batch size stays byte-identical).
LEDGER_ROWS_PER_GROUP = 1024


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._raw.write(data)
        self.sha256.update(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int = TAR_MTIME) -> None:
    """Append a regular file with fixed metadata, so the same content gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def sample_footprint(sizes: Iterable[int]) -> int:
    return sum(member_footprint(s) for s in sizes)


def row_footprint(kind: str, row: dict[str, Any]) -> int:
    """Bytes the sample takes in a tar, from the row without its payload bytes (the plan reads
    no image: their sizes are columns)."""
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


def plan_shards(footprints: Iterable[int], max_samples: int, max_bytes: int) -> list[int]:
    """Greedy split of an ordered stream of sample footprints into shards.

    Returns the number of samples per shard. A shard never holds more than `max_samples`
    samples, nor more than `max_bytes` bytes of members (a single larger sample gets a shard of
    its own). Pure: the pack step calls it again on the same footprints to find the same cuts.
    """
    counts: list[int] = []
    n = size = 0
    for fp in footprints:
        if n and (n >= max_samples or size + fp > max_bytes):
            counts.append(n)
            n = size = 0
        n += 1
        size += fp
    if n:
        counts.append(n)
    return counts


@dataclass(frozen=True)
class Cut:
    """Where partition p's kept rows go. A kind's kept rows, in partition order, are one stream
    cut into full shards (`plan_shards`), so a shard may hold the end of one partition and the
    start of the next ones; the partition holding a shard's first sample writes it.

    `shards`: (shard number, samples) of each shard holding a kept row of p, in order; `skip`:
    the samples of the first one that earlier partitions hold (p writes it only when 0);
    `then`: the kind's later partitions whose kept rows fill the last shard p starts."""

    shards: tuple[tuple[int, int], ...] = ()
    skip: int = 0
    then: tuple[int, ...] = ()


def cut_shards(kinds: Sequence[str], footprints: Mapping[int, Sequence[int]], out: OutputConfig,
               after: Mapping[str, int] | None = None, kept: Mapping[int, int] | None = None) -> dict[int, Cut]:
    """Each partition's `Cut` from the footprints of its kept rows (`kinds[p]`: partition p's
    kind): every kind's kept rows over the partitions in `footprints`, in partition order, cut
    by the output's caps, its shards numbered from `after[kind]` (a retry round: after the kind's
    last shard; the run starts at 0). Pure: the same footprints give the same cuts, so a resumed
    run packs the same shards. With `kept` (each partition's count of footprints), each
    partition's footprints are asked for once, in partition order (`driver.PlanFootprints` reads
    them from the plan markers as they are reached)."""
    sizes = kept if kept is not None else {p: len(f) for p, f in footprints.items()}
    cuts: dict[int, Cut] = {}
    for kind in sorted({kinds[p] for p in footprints}):
        parts = [p for p in sorted(footprints) if kinds[p] == kind]
        counts = plan_shards((f for p in parts for f in footprints[p]), out.shard_max_samples, out.shard_max_bytes)
        starts = list(accumulate(counts, initial=0))  # each shard's first sample in the stream
        first = (after or {}).get(kind, 0)
        offset = 0
        for i, p in enumerate(parts):
            n = sizes[p]
            if not n:
                cuts[p] = Cut()
                continue
            s0, s1 = bisect_right(starts, offset) - 1, bisect_right(starts, offset + n - 1) - 1
            end = starts[s1 + 1]  # the stream position where p's last shard ends
            then, filled = [], offset + n
            for q in parts[i + 1:]:
                if filled >= end:
                    break
                if sizes[q]:
                    then.append(q)
                    filled += sizes[q]
            cuts[p] = Cut(tuple((first + s, counts[s]) for s in range(s0, s1 + 1)), offset - starts[s0],
                          tuple(then) if starts[s1] >= offset else ())
            offset += n
    return cuts


class ShardWriter:
    """Writes one shard (tar + sidecar) of one kind. Use as a context manager or call close().

    `write(row)` assigns the next key, writes the members and returns the key. `close()`
    publishes both files and returns the shard's manifest entry. With `tokens`, each sidecar
    row gets the sample's `token_count` and the tokenizer's id. The sidecar's schema is known at
    `close()`: its carried `meta_` columns are typed over the shard's rows (`sidecar_table`).
    """

    def __init__(self, storage: Storage, out: str | Path, kind: str, shard: int, record_schema: pa.Schema,
                 tokens: TokenCounter | None = None):
        self.storage = storage
        self.out = location(out)
        self.kind = kind
        self.shard = shard
        self.final_tar = tar_path(self.out, kind, shard)
        self.final_sidecar = sidecar_path(self.out, kind, shard)
        # a shard's bytes follow from the marked rows it packs: every attempt writes the same
        self.tmp_tar = storage.attempt_path(self.final_tar, deterministic=True)
        self._file = storage.open_write(self.tmp_tar)
        self._hash = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)
        self._record = record_schema
        self._rows: list[dict[str, Any]] = []
        self.count = 0
        self.tokens = tokens

    def write(self, row: dict[str, Any]) -> str:
        key = sample_key(self.shard, self.count)
        members = []
        for name, data in encode_sample(self.kind, row, key):
            if not is_safe_member(name):
                raise ValueError(f"unsafe tar member name {name!r}")
            header_at = self._hash.tell()
            add_member(self._tar, name, data)
            members.append({"name": name, "offset": header_at + 512, "size": len(data)})
        if self.tokens is not None:  # the sidecar's, not KEY.json's: the plan's byte cut stays true
            row = {**row, "token_count": self.tokens.count(self.kind, row), "tokenizer": self.tokens.id}
        self._rows.append(sidecar_row(self.kind, row, key, members))
        self.count += 1
        return key

    def close(self) -> dict[str, Any]:
        self._tar.close()
        self._file.close()
        tar_bytes = self._hash.position
        tar_sha = self._hash.sha256.hexdigest()
        table = sidecar_table(self.kind, self._record, self._rows)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        sidecar = buffer.getvalue()
        tmp_sidecar = self.storage.attempt_path(self.final_sidecar, deterministic=True)
        with self.storage.open_write(tmp_sidecar) as f:
            f.write(sidecar)
        tar = self.storage.publish(self.tmp_tar, self.final_tar)
        sidecar_at = self.storage.publish(tmp_sidecar, self.final_sidecar)
        return {
            "name": relative(tar, self.out),
            "sidecar": relative(sidecar_at, self.out),
            "kind": self.kind,
            "shard": self.shard,
            "count": self.count,
            "bytes": tar_bytes,
            "sha256": tar_sha,
            "sidecar_sha256": hashlib.sha256(sidecar).hexdigest(),
        }

    def abort(self) -> None:
        self.storage.discard(self._file, self.tmp_tar)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def shard_label(kind: str, shard: int) -> str:
    """The shard's name in the ledger: `<kind dir>/<shard>.tar`."""
    return f"{KIND_DIRS[kind]}/{shard_stem(shard)}.tar"


def ledger_row(kind: str, row: dict[str, Any], shard: str | None, key: str | None) -> dict[str, Any]:
    """The ledger's record of one row's outcome: kept in `shard` under `key`, or dropped."""
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
