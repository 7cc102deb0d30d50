"""Exact deduplication of image bytes: a global pass through Dask.

Rows are grouped by `image_sha256` (which the sources and the image stage keep equal to the hash
of the current image bytes). Within a group the row with the smallest `id` is kept, whatever the
partitioning or worker count, so the result is deterministic; the others are dropped with code
`duplicate` and the kept id in the detail. Only (id, partition, hash) move through the shuffle,
never image bytes, and nothing is collected on the client.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from curate.stages.base import GlobalStage, StageConfig, register

DUPLICATE = "duplicate"


@register
class ExactDedup(GlobalStage):
    name = "exact_dedup"
    kinds = ("pair",)
    columns: ClassVar[list[str]] = ["image_sha256"]

    class Config(StageConfig):
        kind: Literal["exact_dedup"] = "exact_dedup"

    def decide(self, live: Any) -> Any:
        live = live[live["image_sha256"].notnull()]
        groups = max(1, live.npartitions)
        kept = (
            live.groupby("image_sha256")["id"]
            .min(split_out=groups)
            .rename("kept_id")
            .reset_index()
        )
        joined = live.merge(kept, on="image_sha256", how="inner", npartitions=groups)
        dups = joined[joined["id"] != joined["kept_id"]]
        dups = dups.assign(
            drop_reason=DUPLICATE,
            drop_detail="same image bytes as " + dups["kept_id"],
        )
        return dups[["id", "_partition", "drop_reason", "drop_detail"]]
