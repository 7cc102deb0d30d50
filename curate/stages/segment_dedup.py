"""Removing segments that repeat across documents, as Dask passes: paragraphs (OBELICS removes
paragraphs that recur across the web: cookie notices, newsletter pitches, templated bios) and
images (a site's logo, a stock photo, a tracking banner on every page).

Both decide on segments, not rows: each decision names the segments of a document to remove (the
runner's `apply_decision`), recorded in the document's `segment_drops`; a document left with no
segment at all is dropped as `empty_document`. Later stages (`doc_rules`: too few words, too
few images) judge what is left. Only (id, partition, segment, hash) move through the shuffle.

- `paragraph_hash` (row stage, docs and texts) adds `paragraph_hashes`: one int64 per segment of
  a doc (0 for image segments) or per paragraph of a text, in order (0, not null, for "no
  hash": pandas reads a list of int64 holding a null as float64, which would round the digests).
  A paragraph is hashed after normalisation (lower case, whitespace runs collapsed, surrounding
  whitespace stripped), so re-wrapped or re-cased copies collide; a paragraph under `min_chars`
  characters after normalisation is not hashed (0) and is never removed: short lines such as
  "Yes." are not boilerplate worth a segment drop.
- `paragraph_dedup` (global) keeps, for every hash, its first occurrence (the smallest document
  id, then the earliest segment in it) and removes every other occurrence, inside the same
  document too, with code `duplicate` and a detail naming the document that keeps it. Docs and
  texts are deduplicated together: a paragraph in a text corpus and in a web page is the same.
- `doc_image_dedup` (global, docs) does the same for images, by the sha256 of their bytes as
  stored (after the image stage), so it runs after it. With `max_occurrences: N` it applies
  OBELICS's rule instead: an image found in more than N places is removed from all of them
  (logos and icons are not content), and images found in N places or fewer are all kept.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from curate.documents import load_segments, paragraphs
from curate.stages.base import Drop, GlobalStage, RowStage, StageConfig, register
from curate.stages.exact_dedup import SHUFFLE_GROUP, shuffle_partitions
from curate.contract import DUPLICATE

HASH_COLUMN = "paragraph_hashes"


def normalize_paragraph(text: str) -> str:
    return " ".join(text.lower().split())


NO_HASH = 0


def paragraph_digest(normalized: str) -> int:
    """A signed 64-bit digest (blake2b), the same in every process; never NO_HASH."""
    digest = int.from_bytes(hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                            "little", signed=True)
    return digest or 1


def segment_hashes(kind: str, row: dict[str, Any], min_chars: int) -> list[int]:
    """One hash (or NO_HASH) per segment of a doc / paragraph of a text, in order."""
    if kind == "doc":
        texts = [s.get("text") if s.get("type") == "text" else None for s in load_segments(row)]
    else:
        texts = list(paragraphs(row.get("text")))
    out: list[int] = []
    for text in texts:
        norm = normalize_paragraph(text) if text else ""
        out.append(paragraph_digest(norm) if norm and len(norm) >= min_chars else NO_HASH)
    return out


class ParagraphHashConfig(StageConfig):
    kind: Literal["paragraph_hash"] = "paragraph_hash"
    min_chars: int = Field(20, ge=1)  # shorter paragraphs are never removed


@register
class ParagraphHash(RowStage):
    """Adds a hash of each paragraph of docs and texts, for `paragraph_dedup`."""

    name = "paragraph_hash"
    Config = ParagraphHashConfig
    config: ParagraphHashConfig
    kinds = ("doc", "text")
    output_columns: ClassVar[dict[str, pa.DataType]] = {HASH_COLUMN: pa.list_(pa.int64())}

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        row[HASH_COLUMN] = segment_hashes(self.batch_kind, row, self.config.min_chars)
        return None


def _explode(df: pd.DataFrame) -> pd.DataFrame:
    """(id, _partition, segment, hash) for every hashed segment of a partition."""
    ids, parts, segs, hashes = [], [], [], []
    for doc_id, part, values in zip(df["id"], df["_partition"], df[HASH_COLUMN]):
        if values is None:
            continue
        for i, h in enumerate(values):
            if h != NO_HASH:
                ids.append(doc_id)
                parts.append(part)
                segs.append(i)
                hashes.append(int(h))
    return pd.DataFrame({
        "id": pd.Series(ids, dtype=df["id"].dtype),
        "_partition": pd.Series(parts, dtype=df["_partition"].dtype),
        "segment": pd.Series(segs, dtype=np.int64),
        "hash": pd.Series(hashes, dtype=np.int64),
    })


def _decide(group: pd.DataFrame) -> pd.DataFrame:
    """Per document (one shuffled partition holds whole documents): its removed segments, the
    detail made of their notes."""
    rows = []
    for (doc_id, part), g in group.groupby(["id", "_partition"], sort=True):
        notes = sorted(set(g["note"]))
        rows.append({
            "id": doc_id,
            "_partition": part,
            "drop_reason": DUPLICATE,
            "drop_detail": "; ".join(notes[:3]) + (f"; and {len(notes) - 3} more" if len(notes) > 3 else ""),
            "segments": json.dumps(sorted(int(s) for s in g["segment"])),
        })
    columns = ["id", "_partition", "drop_reason", "drop_detail", "segments"]
    return pd.DataFrame(rows, columns=columns).astype({"_partition": group["_partition"].dtype})


def occurrences_meta(live: Any) -> pd.DataFrame:
    """The dask meta of an occurrences frame: (id, _partition, segment, hash)."""
    return pd.DataFrame({
        "id": pd.Series(dtype=live.dtypes["id"]),
        "_partition": pd.Series(dtype=live.dtypes["_partition"]),
        "segment": pd.Series(dtype=np.int64),
        "hash": pd.Series(dtype=np.int64),
    })


def _repeats(part: pd.DataFrame, what: str) -> pd.DataFrame:
    """Every occurrence but the first of each hash in one shuffled partition (every hash's
    occurrences are in it): [id, _partition, segment, note]."""
    ranked = part.sort_values(["hash", "id", "segment"], kind="stable", ignore_index=True)
    hashes = ranked["hash"].to_numpy()
    first = np.ones(len(ranked), dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    ids = ranked["id"].to_numpy(dtype=object)
    kept = ids[np.flatnonzero(first)[np.cumsum(first) - 1]]
    out = ranked.loc[~first, ["id", "_partition", "segment"]]
    return out.assign(note=pd.Series([f"{what} first seen in {k}" for k in kept[~first]], index=out.index,
                                     dtype=object))


def _frequent(part: pd.DataFrame, what: str, max_occurrences: int) -> pd.DataFrame:
    """Every occurrence of a hash found more than `max_occurrences` times, in one shuffled
    partition: [id, _partition, segment, note]."""
    counts = part.groupby("hash")["hash"].transform("size")
    out = part.loc[counts > max_occurrences, ["id", "_partition", "segment"]]
    note = [f"{what} in {c} places (max_occurrences {max_occurrences})" for c in counts[counts > max_occurrences]]
    return out.assign(note=pd.Series(note, index=out.index, dtype=object))


def _by_hash(occurrences: Any, n: int, decide: Any, *args: Any) -> Any:
    """`decide(partition, *args)` over `occurrences` shuffled on the hash: one shuffle, each
    partition deciding its hashes alone (a group-by and two joins took four shuffles)."""
    meta = occurrences._meta[["id", "_partition", "segment"]].assign(note=pd.Series(dtype=object))
    # a few occurrences a row, ~30 bytes each: one output per SHUFFLE_GROUP inputs (exact_dedup says why)
    return occurrences.shuffle(on="hash", npartitions=shuffle_partitions(n, SHUFFLE_GROUP)).map_partitions(
        decide, *args, meta=meta)


def repeats_of_first(occurrences: Any, what: str, n: int) -> Any:
    """Every occurrence but the first of each hash (smallest id, then earliest segment), with a
    note naming the document that keeps it: [id, _partition, segment, note]."""
    return _by_hash(occurrences, n, _repeats, what)


def frequent(occurrences: Any, what: str, max_occurrences: int, n: int) -> Any:
    """Every occurrence of a hash found more than `max_occurrences` times: [id, _partition,
    segment, note]."""
    return _by_hash(occurrences, n, _frequent, what, max_occurrences)


def segment_decisions(removed: Any, live: Any) -> Any:
    """The GlobalStage decisions (with `segments`) of the removed occurrences, one row a document."""
    n = max(1, removed.npartitions)
    removed = removed.shuffle(on="id", npartitions=n)
    text = live.dtypes["id"]  # the text dtype: object on pandas 2, str on pandas 3
    meta = pd.DataFrame({
        "id": pd.Series(dtype=text),
        "_partition": pd.Series(dtype=live.dtypes["_partition"]),
        "drop_reason": pd.Series(dtype=text),
        "drop_detail": pd.Series(dtype=text),
        "segments": pd.Series(dtype=text),
    })
    return removed.map_partitions(_decide, meta=meta)


class ParagraphDedupConfig(StageConfig):
    kind: Literal["paragraph_dedup"] = "paragraph_dedup"


@register
class ParagraphDedup(GlobalStage):
    """Removes every occurrence of a paragraph but the first (module docstring)."""

    name = "paragraph_dedup"
    Config = ParagraphDedupConfig
    config: ParagraphDedupConfig
    kinds = ("doc", "text")
    columns: ClassVar[list[str]] = [HASH_COLUMN]

    def decide(self, live: Any) -> Any:
        n = max(1, live.npartitions)
        occurrences = live[["id", "_partition", HASH_COLUMN]].map_partitions(_explode, meta=occurrences_meta(live))
        return segment_decisions(repeats_of_first(occurrences, "paragraph", n), live)


def _image_occurrences(df: pd.DataFrame) -> pd.DataFrame:
    """(id, _partition, segment, hash) of every image segment whose bytes are known."""
    ids, parts, segs, hashes = [], [], [], []
    for doc_id, part, segments, digests in zip(df["id"], df["_partition"], df["segments"], df["image_sha256s"]):
        if digests is None or segments is None or pd.isna(segments):
            continue
        for i, seg in enumerate(json.loads(segments)):
            index = seg.get("image") if seg.get("type") == "image" else None
            if index is not None and index < len(digests) and digests[index]:
                ids.append(doc_id)
                parts.append(part)
                segs.append(i)
                hashes.append(int(str(digests[index])[:16], 16) - (1 << 63))  # 64 bits, signed
    return pd.DataFrame({
        "id": pd.Series(ids, dtype=df["id"].dtype),
        "_partition": pd.Series(parts, dtype=df["_partition"].dtype),
        "segment": pd.Series(segs, dtype=np.int64),
        "hash": pd.Series(hashes, dtype=np.int64),
    })


class DocImageDedupConfig(StageConfig):
    kind: Literal["doc_image_dedup"] = "doc_image_dedup"
    # None: keep each image's first occurrence, remove the others; N: remove an image found in
    # more than N places from all of them, keep the others everywhere (OBELICS: logos, icons)
    max_occurrences: int | None = Field(None, ge=1)


@register
class DocImageDedup(GlobalStage):
    """Removes repeated images from documents (module docstring)."""

    name = "doc_image_dedup"
    Config = DocImageDedupConfig
    config: DocImageDedupConfig
    kinds = ("doc",)
    columns: ClassVar[list[str]] = ["segments", "image_sha256s"]

    def decide(self, live: Any) -> Any:
        n = max(1, live.npartitions)
        occurrences = live[["id", "_partition", *self.columns]].map_partitions(
            _image_occurrences, meta=occurrences_meta(live))
        if self.config.max_occurrences is None:
            removed = repeats_of_first(occurrences, "image", n)
        else:
            removed = frequent(occurrences, "image", self.config.max_occurrences, n)
        return segment_decisions(removed, live)
