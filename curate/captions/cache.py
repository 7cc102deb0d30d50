"""A cache of generated texts as plain parquet files, so a killed or repeated recaptioning run never
pays twice for the same (image, model, prompt).

On disk::

    ROOT/<namespace>/namespace.json            what the namespace holds: model id, prompt hash, ...
    ROOT/<namespace>/<bb>/<writer>-<uuid>.parquet   rows (key, text, truncated) whose key starts with bb

`namespace` is a hash of the model id and the prompt hash (with the generation settings in it):
another model or prompt is another namespace, never a stale hit. `key` is a hex digest (the
image's sha256 for captions, a hash of the inputs for fusions); its first two hex digits pick one
of 256 buckets.

Concurrency: any number of worker processes read and write at once. A writer puts each batch's
rows into new files (written under a `.tmp` name, then renamed: readers never see half a file)
and never touches another file, so writers cannot collide. Readers list a bucket and read the
files they have not read yet. When a bucket holds more than `compact_after` files, the writer
that notices folds them into one new file and then deletes those it folded; a reader that lists a
file and finds it gone lists again (the folded file holds its rows). Two writers folding at once
only duplicate rows, and equal keys hold equal values under greedy decoding (where a server's
sampling made two workers' answers differ, a reader keeps the first it read: set temperature 0
for reproducible outputs).

Only successes are cached (a text, possibly empty: the guards re-judge it on every read, so a
changed guard applies to cached texts too); failures to ask the model are not.

Memory: a process keeps the rows of at most `max_buckets` buckets (least recently used first
out), about 1/256 of the cache each.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("text", pa.string()), pa.field("truncated", pa.bool_())])


class Cached(NamedTuple):
    text: str
    truncated: bool


def namespace_of(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


class GenerationCache:
    def __init__(self, root: str | Path, namespace: str, describe: dict | None = None, *,
                 compact_after: int = 64, max_buckets: int = 64):
        self.dir = Path(root) / namespace
        self.compact_after, self.max_buckets = compact_after, max_buckets
        self.writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._buckets: OrderedDict[str, tuple[set[str], dict[str, Cached]]] = OrderedDict()
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "namespace.json"
        if describe is not None and not meta.exists():
            self._atomic_write(meta, json.dumps(describe, indent=2, sort_keys=True).encode())

    @staticmethod
    def bucket_of(key: str) -> str:
        return key[:2].lower()

    # reading ---------------------------------------------------------------------------------

    def get_many(self, keys: list[str]) -> dict[str, Cached]:
        found: dict[str, Cached] = {}
        by_bucket: dict[str, list[str]] = {}
        for k in keys:
            by_bucket.setdefault(self.bucket_of(k), []).append(k)
        for b, ks in by_bucket.items():
            index = self._refresh(b)
            for k in ks:
                if k in index:
                    found[k] = index[k]
        return found

    def _refresh(self, bucket: str) -> dict[str, Cached]:
        seen, index = self._buckets.pop(bucket, (set(), {}))
        self._buckets[bucket] = (seen, index)  # most recently used last
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        for _ in range(3):  # a file folded away between listing and reading: list again
            try:
                for f in self._files(bucket):
                    if f.name not in seen:
                        table = pq.read_table(f, schema=SCHEMA)
                        for k, t, tr in zip(*(table.column(c).to_pylist() for c in ("key", "text", "truncated"))):
                            index.setdefault(k, Cached(t or "", bool(tr)))
                        seen.add(f.name)
                return index
            except FileNotFoundError:
                continue
        return index

    def _files(self, bucket: str) -> list[Path]:
        d = self.dir / bucket
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.suffix == ".parquet")

    # writing ---------------------------------------------------------------------------------

    def put_many(self, items: dict[str, Cached]) -> None:
        by_bucket: dict[str, dict[str, Cached]] = {}
        for k, v in items.items():
            by_bucket.setdefault(self.bucket_of(k), {})[k] = v
        for b, rows in by_bucket.items():
            path = self.dir / b / f"{self.writer}-{uuid.uuid4().hex[:12]}.parquet"
            self._write_rows(path, rows)
            if b in self._buckets:
                seen, index = self._buckets[b]
                for k, v in rows.items():
                    index.setdefault(k, v)
                seen.add(path.name)
            if len(self._files(b)) > self.compact_after:
                self._compact(b)

    def _write_rows(self, path: Path, rows: dict[str, Cached]) -> None:
        keys = sorted(rows)
        table = pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array([rows[k].text for k in keys], pa.string()),
                                      pa.array([rows[k].truncated for k in keys], pa.bool_())], schema=SCHEMA)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def _compact(self, bucket: str) -> None:
        files = self._files(bucket)
        rows: dict[str, Cached] = {}
        folded = []
        for f in files:
            try:
                table = pq.read_table(f, schema=SCHEMA)
            except FileNotFoundError:
                continue  # another writer folded it already
            for k, t, tr in zip(*(table.column(c).to_pylist() for c in ("key", "text", "truncated"))):
                rows.setdefault(k, Cached(t or "", bool(tr)))
            folded.append(f)
        self._write_rows(self.dir / bucket / f"0-{uuid.uuid4().hex[:12]}.parquet", rows)
        for f in folded:
            try:
                f.unlink()
            except FileNotFoundError:
                pass

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
