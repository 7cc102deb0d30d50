"""Exact-paragraph deduplication across documents (OBELICS removes paragraphs that recur across
the web: cookie notices, newsletter pitches, templated bios), as a row stage and a global pass.

- `paragraph_hash` (row stage, docs and texts) adds `paragraph_hashes`: one int64 per segment of
  a doc (0 for image segments) or per paragraph of a text, in order (0, not null, for "no
  hash": pandas reads a list of int64 holding a null as float64, which would round the digests). A paragraph is hashed
  after normalisation (lower case, whitespace runs collapsed, surrounding whitespace stripped),
  so re-wrapped or re-cased copies collide; a paragraph under `min_chars` characters after
  normalisation is not hashed (0) and is never removed: short lines such as "Yes." are not
  boilerplate worth a segment drop.
- `paragraph_dedup` (global) keeps, for every hash, its first occurrence (the smallest document
  id, then the earliest segment in it) and removes every other occurrence, inside the same
  document too. It decides on segments, not rows: each decision names the segments to remove
  (the runner's `apply_decision`), with code `duplicate` and a detail naming the document that
  keeps the paragraph; a document left with no segment at all is dropped as `empty_document`.
  Later stages (`doc_rules`: too few words) judge what is left.

Docs and texts are deduplicated together: a paragraph in a text corpus and in a web page is the
same paragraph. Only (id, partition, segment, hash) move through the shuffle.
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
from curate.stages.dedup import DUPLICATE

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
    """Per document (one shuffled partition holds whole documents): its removed segments."""
    rows = []
    for (doc_id, part), g in group.groupby(["id", "_partition"], sort=True):
        kept_in = sorted(set(g["kept_id"]))
        rows.append({
            "id": doc_id,
            "_partition": part,
            "drop_reason": DUPLICATE,
            "drop_detail": "paragraph first seen in " + ", ".join(kept_in[:3])
                           + (f" and {len(kept_in) - 3} more" if len(kept_in) > 3 else ""),
            "segments": json.dumps(sorted(int(s) for s in g["segment"])),
        })
    columns = ["id", "_partition", "drop_reason", "drop_detail", "segments"]
    return pd.DataFrame(rows, columns=columns).astype({"_partition": group["_partition"].dtype})


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
        meta = pd.DataFrame({
            "id": pd.Series(dtype=live.dtypes["id"]),
            "_partition": pd.Series(dtype=live.dtypes["_partition"]),
            "segment": pd.Series(dtype=np.int64),
            "hash": pd.Series(dtype=np.int64),
        })
        occurrences = live[["id", "_partition", HASH_COLUMN]].map_partitions(_explode, meta=meta)
        # the first occurrence of a hash: its smallest document id, then that document's
        # earliest segment (two group-bys on small integer and id columns)
        first_id = occurrences.groupby("hash")["id"].min(split_out=n).rename("kept_id").reset_index()
        joined = occurrences.merge(first_id, on="hash", how="inner", npartitions=n)
        in_first = joined[joined["id"] == joined["kept_id"]]
        first_seg = in_first.groupby("hash")["segment"].min(split_out=n).rename("kept_segment").reset_index()
        joined = joined.merge(first_seg, on="hash", how="inner", npartitions=n)
        repeats = joined[(joined["id"] != joined["kept_id"]) | (joined["segment"] != joined["kept_segment"])]
        repeats = repeats[["id", "_partition", "segment", "kept_id"]].shuffle(on="id", npartitions=n)
        out_meta = pd.DataFrame({
            "id": pd.Series(dtype=live.dtypes["id"]),
            "_partition": pd.Series(dtype=live.dtypes["_partition"]),
            "drop_reason": pd.Series(dtype=object),
            "drop_detail": pd.Series(dtype=object),
            "segments": pd.Series(dtype=object),
        })
        return repeats.map_partitions(_decide, meta=out_meta)
