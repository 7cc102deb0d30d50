"""Record files in img2dataset's input formats, split into spans that workers read on their own.

Formats: `jsonl` (one JSON object a line), `json` (one JSON array of objects), `csv` and `tsv`
(a header row, then records), `txt` (one value a line, under a column the caller names),
`parquet`; the text formats may be gzipped (`.gz`). The format comes from the file's extension
(`pairs.jsonl.gz`) unless given.

The client plans spans of N records with a cheap pass (`RecordFile.spans`); each worker reads its
span (`RecordFile.read`) holding one record at a time (a parquet batch for parquet):

| format                         | planning                         | a worker reaching its span          |
|--------------------------------|----------------------------------|-------------------------------------|
| jsonl, txt, csv, tsv           | one streaming pass over the      | seeks to the span's byte offset     |
|                                | lines, noting every N-th offset  | (csv/tsv re-read their header row)  |
| the same, gzipped              | one streaming pass (decompress)  | decompresses and skips from the     |
|                                |                                  | start: O(span start), so a file of  |
|                                |                                  | P spans costs ~P/2 full passes.     |
|                                |                                  | Prefer few, large spans, or ungzip. |
| parquet                        | footer metadata only (row count) | reads only the row groups it covers |
| json (an array)                | loads the whole file once        | loads the whole file: json has no   |
|                                |                                  | record boundaries to seek to. Use   |
|                                |                                  | jsonl for anything large.           |

A record index is the 0-based ordinal of the record in the file: blank lines are not records and
the csv/tsv header is not a record. Reading yields `(index, record)` where the record is a dict,
or a string saying why the record is malformed (bad JSON, a JSON value that is not an object, a
csv row with the wrong number of fields, a required column missing or null): the caller turns
that string into a dropped row, so one bad row never fails a file. Empty csv/tsv fields read as
None, as pandas (img2dataset's reader) reads them as missing.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from curate.storage import is_url, location, parquet_file
from curate.sources.remote import open_input

FORMATS = ("jsonl", "json", "csv", "tsv", "txt", "parquet")
PARQUET_BATCH_ROWS = 1024  # rows a worker holds at once when reading parquet

Record = dict[str, Any] | str  # a record, or why it is malformed


@dataclass(frozen=True)
class Span:
    """Records `start .. start + count - 1` of a file; `offset` is the byte where `start` begins
    (uncompressed line formats only), so a worker can seek there instead of reading from the top."""

    start: int
    count: int
    offset: int | None = None


@dataclass(frozen=True)
class RecordFile:
    path: str
    format: str
    gzipped: bool = False
    txt_column: str = "url"  # the column a `txt` file's values are read into

    @classmethod
    def at(cls, path: str, format: str | None = None, txt_column: str = "url") -> RecordFile:
        """The record file at `path`; `format` overrides the extension ("csv", "jsonl.gz", ...)."""
        path = str(path)
        spec = (format or "").lower().lstrip(".")
        gzipped = spec.endswith(".gz") or path.lower().endswith(".gz")
        spec = spec.removesuffix(".gz")
        if not spec:
            stem = path.lower().removesuffix(".gz")
            spec = stem.rpartition(".")[2] if "." in stem.rpartition("/")[2] else ""
        if spec not in FORMATS:
            raise ValueError(f"{path}: cannot tell the record format ({spec or 'no extension'!r}); "
                             f"name one of {FORMATS}, optionally with .gz")
        if spec == "parquet" and gzipped:
            raise ValueError(f"{path}: gzipped parquet is not supported (parquet compresses inside)")
        return cls(path, spec, gzipped, txt_column)

    # planning (client) ----------------------------------------------------------------------

    def spans(self, records_per_span: int) -> list[Span]:
        """Consecutive spans of `records_per_span` records covering the file, in order."""
        if records_per_span < 1:
            raise ValueError(f"records_per_span must be >= 1, got {records_per_span}")
        n = records_per_span
        if self.format == "parquet":
            total = parquet_file(location(self.path)).metadata.num_rows
            return [Span(s, min(n, total - s)) for s in range(0, total, n)]
        if self.format == "json":
            total = len(self._json_array())
            return [Span(s, min(n, total - s)) for s in range(0, total, n)]
        offsets: list[int] = []
        total = 0
        with self._open() as fh:
            for offset, _ in self._raw(fh, 0):
                if total % n == 0:
                    offsets.append(offset)
                total += 1
        return [
            Span(i * n, min(n, total - i * n), None if self.gzipped else offset)
            for i, offset in enumerate(offsets)
        ]

    # reading (worker) -----------------------------------------------------------------------

    def read(self, span: Span | None = None, required: Sequence[str] = ()) -> Iterator[tuple[int, Record]]:
        """`(index, record or error)` for the records of `span` (the whole file if None), in order."""
        start = span.start if span else 0
        stop = start + span.count if span else None
        for index, record in self._records(span):
            if index < start:
                continue
            if stop is not None and index >= stop:
                return
            yield index, _check(record, required)

    def _records(self, span: Span | None) -> Iterator[tuple[int, Record]]:
        if self.format == "parquet":
            yield from self._parquet(span)
            return
        if self.format == "json":
            for index, item in enumerate(self._json_array()):
                yield index, item if isinstance(item, dict) else _not_object(item)
            return
        seek = span is not None and span.offset is not None
        with self._open() as fh:
            header = self._header(fh) if self.format in ("csv", "tsv") else None
            if seek:
                fh.seek(span.offset)
            index = span.start if seek else 0
            for _, raw in self._raw(fh, span.offset if seek else 0, skip_header=not seek):
                yield index, self._parse(raw, header)
                index += 1

    # formats ---------------------------------------------------------------------------------

    def _open(self) -> IO[bytes]:
        if not is_url(self.path):
            return gzip.open(self.path, "rb") if self.gzipped else open(self.path, "rb")
        raw = open_input(self.path)
        return _OwnedGzip(raw) if self.gzipped else raw

    def _json_array(self) -> list[Any]:
        with self._open() as fh:
            data = json.load(fh)
        if not isinstance(data, list):
            raise ValueError(f"{self.path}: a json record file must hold an array, got {type(data).__name__}")
        return data

    def _raw(self, fh: IO[bytes], pos: int, skip_header: bool = True) -> Iterator[tuple[int, Any]]:
        """(byte offset where the record starts, its raw form) for each record from `pos` on:
        a line for jsonl/txt, a list of fields (or an error) for csv/tsv."""
        if self.format not in ("csv", "tsv"):
            for line in fh:
                start, pos = pos, pos + len(line)
                if line.strip():
                    yield start, line
            return
        lines = _CountedLines(fh, pos)
        reader = csv.reader(iter(lines), delimiter="," if self.format == "csv" else "\t")
        first = skip_header
        while True:
            start = lines.pos
            try:
                row: Any = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                row = f"csv: {exc}"
            if first:  # the header row, read by `_header`
                first = False
                continue
            if row:  # [] is a blank line
                yield start, row

    def _header(self, fh: IO[bytes]) -> list[str]:
        lines = _CountedLines(fh, 0)
        row = next(csv.reader(iter(lines), delimiter="," if self.format == "csv" else "\t"), [])
        if row:
            row[0] = row[0].removeprefix("\ufeff")
        fh.seek(0)
        return row

    def _parse(self, raw: Any, header: list[str] | None) -> Record:
        if self.format == "txt":
            return {self.txt_column: raw.decode("utf-8", "replace").strip()}
        if self.format == "jsonl":
            try:
                value = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                return f"bad JSON: {exc}"
            return value if isinstance(value, dict) else _not_object(value)
        if isinstance(raw, str):  # a csv error
            return raw
        assert header is not None
        if len(raw) != len(header):
            return f"{len(raw)} fields, the header has {len(header)}"
        return {name: value if value != "" else None for name, value in zip(header, raw)}

    def _parquet(self, span: Span | None) -> Iterator[tuple[int, Record]]:
        pf = parquet_file(location(self.path))
        meta = pf.metadata
        start = span.start if span else 0
        stop = start + span.count if span else meta.num_rows
        groups, first, at = [], None, 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if at < stop and at + rows > start:
                groups.append(g)
                first = at if first is None else first
            at += rows
        if not groups:
            return
        index = first
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups):
            for record in batch.to_pylist():
                yield index, record
                index += 1


class _OwnedGzip(gzip.GzipFile):
    """A gzip stream over a file it closes too (gzip.GzipFile leaves a given file open)."""

    def __init__(self, raw: IO[bytes]):
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


class _CountedLines:
    """Decoded lines of a binary file, counting the bytes handed out so far in `pos`.

    csv.reader pulls lines only until a record is complete, so right after it yields a record,
    `pos` is the byte offset where the next record starts.
    """

    def __init__(self, fh: IO[bytes], pos: int):
        self.fh = fh
        self.pos = pos

    def __iter__(self) -> Iterator[str]:
        for line in self.fh:
            self.pos += len(line)
            yield line.decode("utf-8", "replace")


def _not_object(value: Any) -> str:
    return f"a JSON {type(value).__name__}, not an object"


def _check(record: Record, required: Sequence[str]) -> Record:
    if isinstance(record, str):
        return record
    for column in required:
        if record.get(column) is None:
            return f"missing required column {column!r}"
    return record
