"""`near_dedup`: near-duplicate dedup of pairs on their perceptual hashes.

`near_dedup` (a GlobalStage, kind pair) groups rows whose `image_phash` values (the `phash` stage,
curate/stages/phash.py) are within `max_distance` of 64 bits, transitively, and keeps one per
group; the others are dropped with `duplicate`, the detail naming the kept id. Rows with a null
hash are never paired. See `curate.engine.near_groups` for the mechanics (banding, candidate
pairs verified by Hamming distance, components) and the keep rule (the highest `score_column`,
nulls last, then the smallest id), and `NearDedupConfig` for the banding. An `image_phash` that
reaches the stage as anything but an integer column is a bug upstream (TypeError), not a drop.

With `docs: true` the image segments of docs take part too (their hashes from their segments,
where `phash` wrote them), grouped with docs' images only, or with the pairs as well
(`across_kinds: true`); a doc's duplicate image removes its segment (curate/stages/doc_images.py).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from curate.engine.near_groups import (
    DEFAULT_MAX_BUCKET,
    DEFAULT_WINDOW,
    hamming_band_keys,
    hamming_band_masks,
    hamming_distance,
    near_duplicate_decisions,
)
from curate.stages.base import GlobalStage, StageConfig, register
from curate.stages.doc_images import SEGMENTS, image_decisions, image_items
from curate.stages.phash import BITS, DEFAULT_MAX_DISTANCE

_COLUMN = r"^[a-z][a-z0-9_]*$"
MAX_BAND_KEYS = 128  # a row becomes this many rows in the banding shuffle: bounds its volume


def default_bands(max_distance: int) -> int:
    """The default number of blocks the hash is cut into for `max_distance`: `max_distance + 3`
    (see `NearDedupConfig.bands`), or + 2, + 1 where that would make over `MAX_BAND_KEYS` keys."""
    for extra in (3, 2, 1):
        if math.comb(max_distance + extra, max_distance) <= MAX_BAND_KEYS:
            return max_distance + extra
    return max_distance + 1


class NearDedupConfig(StageConfig):
    """Near-duplicate dedup on `image_phash`.

    `bands`: the hash is cut into this many blocks, and every combination of
    `bands - max_distance` blocks is one band key (`curate.engine.near_groups.hamming_band_masks`).
    Any two hashes within `max_distance` bits share at least one key exactly (pigeonhole: at most
    `max_distance` blocks hold a differing bit), so no pair within the distance is missed, for
    any `bands > max_distance`. `bands = max_distance + 1` is classic banding: fewest keys (5 for
    distance 4) but short ones (~13 bits), so unrelated hashes collide in some key about once in
    1,600 pairs and the candidates grow with the square of the rows (tools/bench/neardup_scaling:
    3.7 million candidates for 11.7 thousand true pairs at 100k rows). The default,
    `max_distance + 3` (7 blocks, 35 keys of 27-28 bits for distance 4; `default_bands`), makes
    chance collisions negligible (14 thousand candidates there, 10.9x for 10x the rows) for 7x
    more rows in the banding shuffle, and was faster end to end at 100k rows (10.5 s vs 17 s).

    `max_bucket` and `window` bound what one band key can cost (`curate.engine.near_groups`): a key
    shared by more than `max_bucket` rows (thousands of blank images) pairs each row with its
    next `window` rows in hash order only, so identical hashes still form one group.
    """

    kind: Literal["near_dedup"] = "near_dedup"
    max_distance: int = Field(DEFAULT_MAX_DISTANCE, ge=0, le=16)
    bands: int | None = Field(None, ge=1, le=BITS)
    # A float column of a score stage that ranks the members of a group (higher is kept; nulls
    # last); None keeps the smallest id.
    score_column: str | None = Field(None, pattern=_COLUMN)
    max_bucket: int = Field(DEFAULT_MAX_BUCKET, ge=2)
    window: int = Field(DEFAULT_WINDOW, ge=1)
    # the image segments of docs too (their hashes from their segments, where phash wrote them)
    docs: bool = Field(False, json_schema_extra={"added_later": True})
    # with docs: False groups pairs with pairs and docs' images with docs' images; True: together
    across_kinds: bool = Field(False, json_schema_extra={"added_later": True})

    @model_validator(mode="after")
    def _bands_fit(self) -> NearDedupConfig:
        bands = self.block_count
        if bands <= self.max_distance:
            raise ValueError(f"bands must exceed max_distance ({self.max_distance}) to find every pair "
                             f"within it, got {bands}")
        keys = math.comb(bands, self.max_distance)
        if keys > MAX_BAND_KEYS:
            raise ValueError(f"bands={bands} with max_distance={self.max_distance} makes {keys} band keys a "
                             f"row (at most {MAX_BAND_KEYS}); use fewer bands")
        return self

    @property
    def block_count(self) -> int:
        return self.bands if self.bands is not None else default_bands(self.max_distance)


def within_distance(max_distance: int):
    """The verification of `near_dedup`: Hamming distance of `image_phash` <= max_distance."""

    def accept(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
        left, right = (x["image_phash"].to_numpy(dtype=np.int64) for x in (a, b))
        return hamming_distance(left, right) <= max_distance

    return accept


def same_kind(accept: Any) -> Any:
    """`accept`, for two items of one kind only (two pairs, or two images of docs)."""

    def both(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
        kind = (a["_segment"].to_numpy() >= 0) == (b["_segment"].to_numpy() >= 0)
        return kind & accept(a, b)

    return both


def _with_band_keys(df: pd.DataFrame, masks: list[int]) -> pd.DataFrame:
    keys = hamming_band_keys(df["image_phash"].to_numpy(dtype=np.int64), masks)
    return df.assign(**{f"_band{j}": keys[:, j] for j in range(len(masks))})


@register
class NearDedup(GlobalStage):
    """Drops all but one of each group of images with perceptual hashes within `max_distance`."""

    name = "near_dedup"
    kinds = ("pair", "doc")  # docs with `docs: true` only (__init__)
    Config = NearDedupConfig
    config: NearDedupConfig

    def __init__(self, config: NearDedupConfig):
        super().__init__(config)
        self.last_summary: dict[str, Any] = {}
        if not config.docs:  # the runner reads only the pairs' partitions
            self.kinds = ("pair",)  # type: ignore[misc]

    @property
    def input_columns(self) -> list[str]:
        score = self.config.score_column
        return ["image_phash", *([score] if score else [])]

    @property
    def columns(self) -> list[str]:  # type: ignore[override]
        return [*self.input_columns, *([SEGMENTS] if self.config.docs else [])]

    def decide(self, live: Any) -> Any:
        cfg = self.config
        dtype = live.dtypes["image_phash"]
        if not pd.api.types.is_integer_dtype(dtype):  # e.g. float64: the low bits are already gone
            raise TypeError(f"near_dedup: image_phash was read as {dtype}, which cannot hold 64-bit hashes; "
                            "it must reach the stage as an integer column")
        masks = hamming_band_masks(cfg.max_distance, cfg.block_count, BITS)
        docs = live
        if cfg.docs:  # one item per pair and per image segment of a doc
            meta = image_items(live._meta, "image_phash", cfg.score_column, SEGMENTS)
            live = live.map_partitions(image_items, "image_phash", cfg.score_column, SEGMENTS, meta=meta)
        live = live[live["image_phash"].notnull()]
        bands = [f"_band{j}" for j in range(len(masks))]
        meta = live._meta.assign(**{b: np.zeros(0, dtype=np.int64) for b in bands})
        banded = live.map_partitions(_with_band_keys, masks, meta=meta)
        stats: dict[str, int] = {}
        accept = within_distance(cfg.max_distance)
        if cfg.docs and not cfg.across_kinds:
            accept = same_kind(accept)
        decisions = near_duplicate_decisions(
            banded,
            bands=bands,
            columns=["image_phash", *(["_segment"] if cfg.docs else [])],
            accept=accept,
            detail=f"near duplicate of {{kept}} (perceptual hashes linked within {cfg.max_distance} of 64 bits)",
            score_column=cfg.score_column,
            order="image_phash",
            max_bucket=cfg.max_bucket,
            window=cfg.window,
            stats=stats,
        )
        self.last_summary = {"band_keys": len(masks), **stats}
        return image_decisions(decisions, docs) if cfg.docs else decisions

    def summary(self) -> dict[str, Any]:
        return dict(self.last_summary)
