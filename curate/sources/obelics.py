"""OBELICS-style interleaved documents (record kind `doc`) from parquet (or any RecordFile format).

The layout is HuggingFaceM4/OBELICS's: per document, `texts` and `images` are lists of the same
length where each position holds a text or an image URL; `metadata` is a JSON string of a list
aligned with them (a dict for an image position: "src", "document_url", "alt_text" when the page
had one, ...; null for a text position); `general_metadata` a JSON string of a dict with the
page's "url" and where it sits in Common Crawl ("warc_filename", "warc_record_offset", ...).
OBELICS's own extractor writes "" rather than null for the image of a text position, so an empty
image string counts as no image.

Rows get `segments` directly, in the documents.py form before images are fetched:
`{"type": "text", "text": ...}` and `{"type": "image", "url": ..., "alt": ...}` (alt from the
image's metadata entry under `alt_key`, null without one). Empty texts are left out. `html` stays
null: these documents were extracted already. `url` is `general_metadata[url_from]`; `extra`
holds the rest of general_metadata and any other columns of the file.

Files, partitions and ids are planned as for text corpora (`curate.sources.text_corpus`):
`"<source name>:<file>#<row index>"`, `rows_per_partition` rows a partition.

Drop codes (stage "source"): `malformed_row` (an unreadable record; texts/images missing, not
lists, or of different lengths; a position with both a text and an image, or neither; a value
that is not a string; metadata that is not JSON or not a list of the same length;
general_metadata that is not a JSON object), `no_text` (a document with no segment at all).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate.documents import dump_json
from curate.sources.base import Partition, Source, SourceConfig, register
from curate.sources.files import MALFORMED_ROW, NO_TEXT, find_files, json_object, plan_record_files, read_records

FOLDER_PATTERNS = ("*.parquet",)


class ObelicsConfig(SourceConfig):
    kind: Literal["obelics"] = "obelics"
    path: str | list[str] = Field(min_length=1)  # a file, a folder (its *.parquet), a glob, or a list
    format: str | None = None  # default: each file's extension
    texts_column: str = "texts"
    images_column: str = "images"
    metadata_column: str | None = "metadata"  # null: no per-position metadata (no alt texts)
    general_metadata_column: str | None = "general_metadata"
    url_from: str = "url"  # the general_metadata key holding the page's url
    alt_key: str = "alt_text"  # the image metadata key holding its alt text
    rows_per_partition: int = Field(2_000, gt=0)


class _Malformed(Exception):
    """A record that is not an OBELICS document; the message says why."""


@register
class ObelicsSource(Source):
    Config = ObelicsConfig
    record_kind = "doc"
    config: ObelicsConfig

    def partitions(self) -> list[Partition]:
        c = self.config
        files = find_files(self.name, c.path, FOLDER_PATTERNS)
        return plan_record_files(self, files, c.format, c.rows_per_partition,
                                 columns=[c.texts_column, c.images_column])

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        return self.batches(self._rows(partition), batch_size)

    def _rows(self, partition: Partition) -> Iterator[dict[str, Any]]:
        for label, index, record in read_records(partition):
            locator = f"{label}#{index}"
            url, extra = None, None
            try:
                if isinstance(record, str):
                    raise _Malformed(record)
                url, extra = self._general(record)
                segments = self._segments(record)
            except _Malformed as exc:
                yield self.dropped_row(locator, MALFORMED_ROW, f"{label} row {index}: {exc}", url=url, extra=extra)
                continue
            if not segments:
                yield self.dropped_row(locator, NO_TEXT, f"{label} row {index}: no text and no image",
                                       url=url, extra=extra)
                continue
            yield {"id": f"{self.name}:{locator}", "url": url, "extra": extra, "segments": dump_json(segments)}

    def _general(self, record: dict[str, Any]) -> tuple[str | None, str | None]:
        """(url, extra) from general_metadata and the columns the segments do not use."""
        c = self.config
        general = _json(record.get(c.general_metadata_column), dict, "general_metadata") \
            if c.general_metadata_column else None
        general = dict(general or {})
        url = general.pop(c.url_from, None)
        url = (url.strip() or None) if isinstance(url, str) else None
        used = {c.texts_column, c.images_column, c.metadata_column, c.general_metadata_column}
        rest = {k: v for k, v in record.items() if k not in used}
        return url, json_object({**rest, **general})

    def _segments(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        c = self.config
        texts, images = record.get(c.texts_column), record.get(c.images_column)
        for name, value in ((c.texts_column, texts), (c.images_column, images)):
            if not isinstance(value, list):
                raise _Malformed(f"{name!r} is {'missing' if value is None else type(value).__name__}, not a list")
        if len(texts) != len(images):
            raise _Malformed(f"{len(texts)} texts but {len(images)} images")
        meta = _json(record.get(c.metadata_column), list, "metadata") if c.metadata_column else None
        if meta is not None and len(meta) != len(texts):
            raise _Malformed(f"metadata has {len(meta)} entries for {len(texts)} positions")
        segments: list[dict[str, Any]] = []
        for i, (text, image) in enumerate(zip(texts, images)):
            for name, value in ((c.images_column, image), (c.texts_column, text)):
                if value is not None and not isinstance(value, str):
                    raise _Malformed(f"{name}[{i}] is a {type(value).__name__}, not a string")
            if image:
                if text:
                    raise _Malformed(f"position {i} holds both a text and an image")
                entry = meta[i] if meta is not None else None
                alt = entry.get(c.alt_key) if isinstance(entry, dict) else None
                segments.append({"type": "image", "url": image.strip(),
                                 "alt": alt if isinstance(alt, str) and alt.strip() else None})
            elif text is None:
                raise _Malformed(f"position {i} holds neither a text nor an image")
            elif text.strip():
                segments.append({"type": "text", "text": text})
        return segments


def _json(value: Any, expected: type, what: str) -> Any:
    """A JSON column's value (a JSON string, or already decoded), checked to be `expected`."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _Malformed(f"{what} is not JSON: {exc}") from None
    if value is not None and not isinstance(value, expected):
        raise _Malformed(f"{what} is a JSON {type(value).__name__}, not a {expected.__name__}")
    return value
