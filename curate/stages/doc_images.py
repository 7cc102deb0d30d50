"""Model stages on the images inside documents: a doc batch seen as pairs, one per image, and the
results folded back (DESIGN.md: a dropped image removes its segment with the reason).

`image_rows(table)` turns the live docs of a batch into a pair-shaped table, one row per image
(`id` "<doc id>#<image index>", the image's bytes and fields, `caption` its alt-text or the text
around it, and each `<column>_per_image` value of the doc as `<column>`), so a model stage runs
its pair code on them unchanged. `fold_images(...)` writes the per-image results back:

- a per-image drop removes the image's segment with the stage and reason (renumbering the image
  lists; a doc left with no segment is dropped `empty_document`, as for the per-image filters);
- each score column goes into the image's segment (`{"type": "image", ..., "clip_score": 0.31}`:
  KEY.json carries it) and, aggregated over the doc's scored images, into the doc's own column
  (the sidecar's): `mean` for a quality score, `max` for a risk (the doc's worst image);
- each vector column (an embedding) into `<column>_per_image`, a list aligned with `images`
  (intermediate data only, as the pairs' embeddings).

The global dedup stages over pairs and docs' images (semantic_dedup, near_dedup with `docs`):
`image_items` makes one item per image, a pair or an image segment of a doc (its id
`<doc id>SEP<segment>`, its value from `<column>_per_image` or from its segment); `image_decisions`
turns the items' drops back into the stage's decisions: a pair's whole, a doc's as the segments it
loses (segment_dedup's decisions).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from curate.contract import conform, record_schema
from curate.stages.segment_dedup import segment_decisions
from curate.documents import (
    EMPTY_DOCUMENT,
    PER_IMAGE,
    dump_json,
    image_segment_index,
    image_views,
    is_empty,
    load_segments,
    remove_segments,
)

Aggregate = Literal["mean", "max", "none"]  # "none": the value stays in the segments only
SEP = "\x1f"  # between a doc's id and an image segment's index in the id of the image's item
SEGMENTS = "segments"
CAPTION_CHARS = 1000  # of the text around an image used as its caption (a tokenizer cuts it anyway)


def image_caption(segments: list[dict[str, Any]], at: int, source: str = "alt") -> str:
    """The text an image is scored against: its alt-text (`source: alt`, falling back to the
    nearest text segment when it has none) or the nearest text segment (`nearest_text`: before it
    first, then after, at growing distance)."""
    alt = (segments[at].get("alt") or "").strip()
    if source == "alt" and alt:
        return alt
    for distance in range(1, len(segments)):
        for j in (at - distance, at + distance):
            if 0 <= j < len(segments) and segments[j].get("type") == "text" and (segments[j].get("text") or "").strip():
                return segments[j]["text"].strip()[:CAPTION_CHARS]
    return alt


def image_rows(table: pa.Table, caption: str = "alt") -> tuple[pa.Table, list[tuple[int, int]]]:
    """(pair-shaped rows, one per image of each live doc; the (doc row, image index) of each)."""
    docs = table.to_pylist()
    vectors = [name for name in table.column_names if name.endswith(PER_IMAGE)]
    rows, where = [], []
    for r, doc in enumerate(docs):
        if doc.get("drop_reason"):
            continue
        segments = load_segments(doc)
        at = image_segment_index(doc)
        for i, view in enumerate(image_views(doc)):
            row = {**view, "id": f"{doc['id']}#{i}", "source": doc.get("source"),
                   "caption": image_caption(segments, at[i], caption) if i in at else "",
                   "drop_stage": None, "drop_reason": None, "drop_detail": None}
            for name in vectors:
                values = doc.get(name) or []
                row[name[: -len(PER_IMAGE)]] = values[i] if i < len(values) else None
            rows.append(row)
            where.append((r, i))
    schema = record_schema("pair")
    for name in vectors:
        schema = schema.append(pa.field(name[: -len(PER_IMAGE)], table.schema.field(name).type.value_type))
    for key in dict.fromkeys(k for row in rows for k in row):
        if schema.get_field_index(key) < 0:  # a score a model stage wrote into the segments
            schema = schema.append(pa.field(key, pa.array([row.get(key) for row in rows]).type))
    return pa.Table.from_pylist(rows, schema=schema), where


def fold_images(table: pa.Table, results: pa.Table, where: list[tuple[int, int]], stage: str,
                scores: dict[str, Aggregate], vectors: list[str], schema: pa.Schema) -> pa.Table:
    """The doc batch `table` with the per-image `results` (rows of `image_rows`' table, in order)
    written back (module docstring); conformed to `schema` (the stage's output schema)."""
    docs = table.to_pylist()
    by_doc: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for (r, i), result in zip(where, results.to_pylist() if results.num_rows else []):
        by_doc[r].append((i, result))
    for r, items in by_doc.items():
        doc = docs[r]
        segments = load_segments(doc)
        at = image_segment_index(doc)
        n = len(doc.get("images") or [])
        for column in vectors:
            aligned: list[Any] = [None] * n
            for i, result in items:
                aligned[i] = result.get(column)
            doc[column + PER_IMAGE] = aligned
        for column, how in scores.items():
            values = [result[column] for i, result in items
                      if result.get(column) is not None and not result.get("drop_reason")]
            for i, result in items:
                value = result.get(column)
                if value is not None and i in at:  # an integer (a hash) as it is, a score rounded
                    segments[at[i]][column] = value if isinstance(value, int) else round(float(value), 6)
            if how != "none":
                doc[column] = (max(values) if how == "max" else sum(values) / len(values)) if values else None
        doc["segments"] = dump_json(segments)
        drops = {at[i]: (result["drop_reason"], result.get("drop_detail") or "")
                 for i, result in items if result.get("drop_reason") and i in at}
        remove_segments("doc", doc, drops, stage)
        if drops and is_empty("doc", doc):
            doc["drop_stage"], doc["drop_reason"], doc["drop_detail"] = stage, EMPTY_DOCUMENT, "every segment removed"
    return conform(pa.Table.from_pylist(docs, schema=schema), schema)


def score_doc_images(table: pa.Table, stage: Any, score_pairs: Callable[[pa.Table], pa.Table],
                     scores: dict[str, Aggregate], vectors: list[str] = (), caption: str = "alt") -> pa.Table:
    """A model stage's doc batch: `score_pairs` (its pairs' pass) over the docs' images as pairs,
    the results folded back under `stage.name` into the columns `stage.output_columns` declares."""
    rows, where = image_rows(table, caption)
    scored = score_pairs(rows) if where else rows
    return fold_images(table, scored, where, stage.name, scores, list(vectors),
                       doc_schema(table, stage.output_columns))


def doc_schema(table: pa.Table, columns: dict[str, pa.DataType]) -> pa.Schema:
    """`table`'s schema with the stage's doc columns appended where missing."""
    schema = table.schema
    for name, dtype in columns.items():
        if schema.get_field_index(name) < 0:
            schema = schema.append(pa.field(name, dtype))
    return schema


def image_items(part: pd.DataFrame, column: str, score: str | None, source: str) -> pd.DataFrame:
    """One item per image with a value: a pair (its id, `_segment` -1, its `column`) or an image
    segment of a doc (id `<doc id>SEP<segment>`; its value from `<column>_per_image` when `source`
    is PER_IMAGE, else from its segment's `column` key; its score from its segment)."""
    items: list[tuple[Any, Any, Any, Any, int]] = []  # (id, partition, value, score, segment)
    per_image = part[column + PER_IMAGE] if source == PER_IMAGE and column + PER_IMAGE in part.columns else None
    docs = part[SEGMENTS] if SEGMENTS in part.columns else None
    pair_scores = part[score].tolist() if score else [None] * len(part)
    for k, (row_id, p, value) in enumerate(zip(part["id"], part["_partition"], part[column])):
        doc = docs.iloc[k] if docs is not None else None
        if isinstance(doc, str):
            values = per_image.iloc[k] if per_image is not None else None
            for j, seg in enumerate(json.loads(doc)):
                index = seg.get("image") if seg.get("type") == "image" else None
                if index is None:
                    continue
                if per_image is not None:
                    found = values[index] if values is not None and index < len(values) else None
                else:
                    found = seg.get(column)
                if found is not None:
                    items.append((f"{row_id}{SEP}{j}", p, found, seg.get(score) if score else None, j))
        elif not (value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))):
            items.append((row_id, p, value, pair_scores[k], -1))
    ids, parts, values_, scores, segments = (list(c) for c in zip(*items)) if items else ([], [], [], [], [])
    dtype = part[column].dtype if source != PER_IMAGE else object
    out = pd.DataFrame({"id": pd.Series(ids, dtype=part["id"].dtype),
                        "_partition": pd.Series(parts, dtype=part["_partition"].dtype),
                        column: pd.Series(values_, dtype=dtype), "_segment": pd.Series(segments, dtype=np.int64)})
    if score:
        out[score] = pd.Series(scores, dtype=np.float64)
    return out


def _readable(detail: pd.Series) -> pd.Series:
    return detail.str.replace(SEP, " segment ", regex=False)


def _pair_decisions(drops: pd.DataFrame) -> pd.DataFrame:
    pairs = drops[~drops["id"].str.contains(SEP, regex=False)]
    return pairs.assign(drop_detail=_readable(pairs["drop_detail"]),
                        segments=pd.Series([None] * len(pairs), index=pairs.index, dtype=drops["id"].dtype))


def _doc_occurrences(drops: pd.DataFrame) -> pd.DataFrame:
    docs = drops[drops["id"].str.contains(SEP, regex=False)]
    split = docs["id"].str.rsplit(SEP, n=1)
    return pd.DataFrame({"id": pd.Series(split.str[0], dtype=drops["id"].dtype),
                         "_partition": docs["_partition"], "segment": split.str[1].astype(np.int64),
                         "note": _readable(docs["drop_detail"])})


def image_decisions(drops: Any, live: Any) -> Any:
    """A dedup's decisions from its items' drops (a dask frame: id, _partition, drop_reason,
    drop_detail): a pair's as they are (no `segments`), a doc's images as the segments it loses."""
    # where a global pass runs: at the top, every worker importing the stages paid ~0.5 s of CPU
    # and 33 MB for dask.dataframe (and scipy through it), measured on the download bench
    import dask.dataframe as dd

    drops = drops.persist()
    pair_meta = _pair_decisions(drops._meta)
    pairs = drops.map_partitions(_pair_decisions, meta=pair_meta)
    images = segment_decisions(drops.map_partitions(_doc_occurrences, meta=_doc_occurrences(drops._meta)), live)
    return dd.concat([pairs, images[pair_meta.columns.tolist()]])


__all__ = ["SEP", "SEGMENTS", "Aggregate", "doc_schema", "fold_images", "image_caption", "image_decisions",
           "image_items", "image_rows", "score_doc_images"]
