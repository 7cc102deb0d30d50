"""Filtering on a score column (a CLIP/DFN image-text similarity, or any float column a stage added).

Two rules, the two the field uses:

- `score_filter`, a row filter: keep rows whose score is at least `min_score` (LAION-2B kept
  ViT-B/32 scores over 0.28) and at most `max_score` (an NSFW or watermark probability); either
  bound or both. Drop codes `<column>_low` / `<column>_high` (`clip_score_low` for the default
  column), the detail names the score and the bound.
- `score_top_fraction`, a global stage: keep the top `fraction` of the rows that reach it, ranked by
  score (DataComp's CLIP-score baseline keeps the top 30% by ViT-L/14 score; the same with a DFN
  score), or with `order: lowest` the lowest fraction (the least NSFW). Exact, not an approximate
  quantile: with n rows reaching the stage, exactly k = ceil(fraction * n) are kept, the first k in
  the order (score descending, or ascending for `lowest`; then id ascending), so ties on the score
  are broken by id and the result does not depend on the partitioning. Drop code `<column>_low`
  (`<column>_high` for `lowest`). The cutoff (the k-th row's score and id), n and k go into the
  manifest (`global.<stage>.summary`).

A row with a null score (no caption scored, no image) is never preferred: `score_filter` drops it
(with the code of its first bound, `_low` when there is a `min_score`), and `score_top_fraction`
ranks it after every scored row in either order (nulls last, then by id).

How the cutoff is found through Dask without sorting everything or collecting the scores on the
client: scores map to order-preserving 64-bit keys (float32 bits flipped so that integer order
is score order, reversed for `lowest`; nulls lowest); a pass counts rows per bucket of the key's top bits (a small
histogram), which names the bucket holding the k-th row; the next pass refines inside that
bucket on the following bits, and so on, until the bucket holding the k-th row is small enough
to fetch (`exact_fetch_rows`) and rank exactly with its ids. A bucket of rows that all have the
same score (huge ties) is ranked by id with a Dask sort of that bucket alone.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from curate.stages.base import Drop, Filter, GlobalStage, StageConfig, register

_COLUMN = r"^[a-z][a-z0-9_]*$"
KEY_BITS = 33  # score keys are below 2**33 (a float32's 32 bits, plus one for the null key)
BUCKET_BITS = 16  # bits of the key resolved per histogram pass
EXACT_FETCH_ROWS = 200_000  # a bucket at most this big is ranked exactly on the client


def low_reason(column: str) -> str:
    """The drop code of a score rule on `column`: `clip_score_low` for `clip_score`."""
    return f"{column}_low"


def high_reason(column: str) -> str:
    """The drop code of a rule keeping low scores of `column`: `nsfw_score_high`."""
    return f"{column}_high"


@register
class ScoreFilter(Filter):
    """Drops pairs whose score column (a CLIP/DFN similarity, or any float column a stage added)
    is below `min_score` or above `max_score`; in a doc, each image by the score its segment holds
    (a model stage wrote it there: curate/stages/doc_images.py), removing the image's segment."""

    name = "score_filter"
    kinds = ("pair", "doc")
    per_image = True

    class Config(StageConfig):
        kind: Literal["score_filter"] = "score_filter"
        column: str = Field("clip_score", pattern=_COLUMN)
        min_score: float | None = None  # keep scores >= this
        # keep scores <= this (an NSFW or watermark probability); at its default out of the recipe
        # hash, so a recipe from before the field existed hashes (and resumes) as it did
        max_score: float | None = Field(None, json_schema_extra={"added_later": True})

        @model_validator(mode="after")
        def _bounds(self) -> ScoreFilter.Config:
            if self.min_score is None and self.max_score is None:
                raise ValueError("give min_score, max_score or both")
            if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
                raise ValueError(f"min_score {self.min_score:g} is above max_score {self.max_score:g}: nothing passes")
            return self

    config: Config

    @property
    def input_columns(self) -> list[str]:
        return [self.config.column]

    def check(self, row: dict[str, Any]) -> Drop | None:
        cfg = self.config
        value = row.get(cfg.column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            first = low_reason if cfg.min_score is not None else high_reason
            return Drop(first(cfg.column), f"no {cfg.column}")
        if cfg.min_score is not None and value < cfg.min_score:
            return Drop(low_reason(cfg.column), f"{cfg.column} {value:.4f} < {cfg.min_score:g}")
        if cfg.max_score is not None and value > cfg.max_score:
            return Drop(high_reason(cfg.column), f"{cfg.column} {value:.4f} > {cfg.max_score:g}")
        return None


# ---------------------------------------------------------------------------------------------
# Exact top fraction
# ---------------------------------------------------------------------------------------------


def score_keys(scores: Any) -> np.ndarray:
    """Order-preserving uint64 keys of float scores: key(a) < key(b) iff a < b (as float32), with
    NaN/null below every number. Pure: the same score always gives the same key."""
    values = np.asarray(scores, dtype=np.float64).astype(np.float32)
    nan = np.isnan(values)
    bits = values.view(np.uint32).astype(np.uint64)
    negative = (bits >> np.uint64(31)) == 1
    keys = np.where(negative, np.uint64(0xFFFFFFFF) - bits, bits | np.uint64(0x80000000))
    keys = keys + np.uint64(1)  # 0 is kept for nulls
    return np.where(nan, np.uint64(0), keys)


def key_score(key: int) -> float | None:
    """The score a key came from (float32 precision); None for the null key."""
    if key == 0:
        return None
    k = np.uint64(key - 1)
    bits = k & np.uint64(0x7FFFFFFF) if k >> np.uint64(31) == 1 else np.uint64(0xFFFFFFFF) - k
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def reversed_keys(keys: np.ndarray) -> np.ndarray:
    """Keys of the reversed order (lowest score first), nulls still lowest: k -> 2**32 + 1 - k on
    the scored keys (1 .. 2**32), an involution, so it also turns such keys back."""
    return np.where(keys == 0, np.uint64(0), np.uint64(2**32 + 1) - keys)


def _with_keys(live: Any, column: str, lowest: bool = False) -> Any:
    def add(part: pd.DataFrame) -> pd.DataFrame:
        scores = pd.to_numeric(part[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        keys = score_keys(scores)
        return part.assign(_key=reversed_keys(keys) if lowest else keys)

    meta = live._meta.assign(_key=np.uint64(0))
    return live.map_partitions(add, meta=meta)


def find_cutoff(keyed: Any, k: int, n: int, exact_fetch_rows: int = EXACT_FETCH_ROWS) -> tuple[int, str]:
    """(key, id) of the k-th row (1-based) in the order key descending, id ascending, of the dask
    dataframe `keyed` (columns `id`, `_key`; n rows), for 1 <= k <= n. Histogram passes narrow
    the key range holding the k-th row until few enough rows remain to rank exactly."""
    lo_bits, prefix, rank, count = KEY_BITS, 0, k, n  # the range: keys >> lo_bits == prefix
    while lo_bits > 0 and count > exact_fetch_rows:
        shift = max(0, lo_bits - BUCKET_BITS)
        counts = (_in_range(keyed, prefix, lo_bits)["_key"] >> np.uint64(shift)).map_partitions(
            lambda s: s.value_counts(), meta=("_key", "int64")
        ).compute().groupby(level=0).sum()
        above = 0
        for bucket in sorted(counts.index, reverse=True):  # from the top: the bucket of the rank-th
            if above + int(counts[bucket]) >= rank:
                prefix, lo_bits, rank, count = int(bucket), shift, rank - above, int(counts[bucket])
                break
            above += int(counts[bucket])
        else:  # pragma: no cover - k beyond the rows: a caller bug
            raise ValueError(f"rank {k} beyond the {n} rows")
    rows = _in_range(keyed, prefix, lo_bits)[["id", "_key"]]
    if count > exact_fetch_rows:  # lo_bits == 0: every row here has one score; rank them by id
        ordered = rows[["id"]].sort_values("id")
        seen = 0
        for i, length in enumerate(ordered.map_partitions(len).compute().tolist()):
            if seen + length >= rank:
                part = ordered.get_partition(i).compute()["id"].sort_values(kind="mergesort")
                return prefix, str(part.iloc[rank - 1 - seen])
            seen += length
        raise ValueError(f"rank {k} beyond the {n} rows")  # pragma: no cover
    local = rows.compute().sort_values(["_key", "id"], ascending=[False, True], kind="mergesort")
    row = local.iloc[rank - 1]
    return int(row["_key"]), str(row["id"])


def _in_range(keyed: Any, prefix: int, lo_bits: int) -> Any:
    if lo_bits >= KEY_BITS:
        return keyed
    return keyed[(keyed["_key"] >> np.uint64(lo_bits)) == np.uint64(prefix)]


@register
class ScoreTopFraction(GlobalStage):
    """Keeps exactly the top (or, `order: lowest`, the lowest) `fraction` of the rows that reach it
    by score (ties by id)."""

    name = "score_top_fraction"
    kinds = ("pair",)

    class Config(StageConfig):
        kind: Literal["score_top_fraction"] = "score_top_fraction"
        column: str = Field("clip_score", pattern=_COLUMN)
        fraction: float = Field(gt=0, le=1)
        # keep the highest scores, or the lowest; at its default out of the hash (max_score's note)
        order: Literal["highest", "lowest"] = Field("highest", json_schema_extra={"added_later": True})
        # execution only: how many rows the last pass may fetch to rank exactly
        exact_fetch_rows: int = Field(EXACT_FETCH_ROWS, ge=1000, json_schema_extra={"execution_only": True})

    config: Config

    def __init__(self, config: Config):
        super().__init__(config)
        self.last_summary: dict[str, Any] = {}

    @property
    def columns(self) -> list[str]:  # type: ignore[override]
        return [self.config.column]

    def decide(self, live: Any) -> Any:
        cfg = self.config
        lowest = cfg.order == "lowest"
        keyed = _with_keys(live, cfg.column, lowest)
        n = int(keyed.shape[0].compute())
        k = min(n, math.ceil(cfg.fraction * n - 1e-9)) if n else 0
        reason = high_reason(cfg.column) if lowest else low_reason(cfg.column)

        def score_of(key: int) -> float | None:
            return key_score(int(reversed_keys(np.uint64(key)))) if lowest else key_score(key)
        empty = live._meta.assign(drop_reason="", drop_detail="")[["id", "_partition", "drop_reason", "drop_detail"]]
        if k == n:
            self.last_summary = {"rows": n, "kept": n, "cutoff_score": None, "cutoff_id": None}
            return keyed.map_partitions(lambda p: p.iloc[0:0][["id", "_partition"]].assign(
                drop_reason="", drop_detail=""), meta=empty)
        key, cut_id = find_cutoff(keyed, k, n, cfg.exact_fetch_rows)
        score = score_of(key)
        self.last_summary = {"rows": n, "kept": k, "cutoff_score": score, "cutoff_id": cut_id}
        pct = f"{100 * cfg.fraction:g}%"
        detail = (f"not in the {'lowest' if lowest else 'top'} {pct} by {cfg.column} (cutoff "
                  f"{score if score is None else round(score, 6)}, id {cut_id})")

        def below(part: Any) -> Any:
            keys = part["_key"].to_numpy(dtype=np.uint64)
            ids = part["id"].astype(str).to_numpy()
            out = (keys < np.uint64(key)) | ((keys == np.uint64(key)) & (ids > cut_id))
            # the row's own score leads the detail (as score_filter's does): the report's histograms read it
            scores = [score_of(int(k)) for k in keys[out]]
            own = [f"{cfg.column} {s:.4f}, " if s is not None else f"no {cfg.column}, " for s in scores]
            return part.loc[out, ["id", "_partition"]].assign(drop_reason=reason, drop_detail=[o + detail for o in own])

        return keyed.map_partitions(below, meta=empty)

    def summary(self) -> dict[str, Any]:
        return dict(self.last_summary)


__all__ = ["ScoreFilter", "ScoreTopFraction", "find_cutoff", "high_reason", "key_score", "low_reason",
           "reversed_keys", "score_keys"]
