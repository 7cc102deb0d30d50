"""Exact dedup as a Dask pass: the smallest id of each hash group is kept, whatever the
partitioning; already-dropped rows never take part (the runner passes live rows only)."""

from __future__ import annotations

import dask
import dask.dataframe as dd
import pandas as pd
import pytest

from curate.stages.dedup import ExactDedup


def _frame():
    rows = [
        ("s:a", 0, "h1"), ("s:b", 0, "h2"), ("s:c", 1, "h1"), ("s:d", 1, "h3"),
        ("s:e", 2, "h1"), ("s:f", 2, "h2"), ("s:g", 2, None),
    ]
    return pd.DataFrame(rows, columns=["id", "_partition", "image_sha256"])


@pytest.mark.parametrize("npartitions", [1, 2, 3, 7])
def test_keeps_smallest_id_per_hash_for_any_partitioning(npartitions):
    stage = ExactDedup(ExactDedup.Config())
    live = dd.from_pandas(_frame(), npartitions=npartitions, sort=False)
    with dask.config.set(scheduler="sync"):
        out = stage.decide(live).compute().sort_values("id").reset_index(drop=True)
    assert list(out["id"]) == ["s:c", "s:e", "s:f"]
    assert list(out["_partition"]) == [1, 2, 2]
    assert set(out["drop_reason"]) == {"duplicate"}
    assert list(out["drop_detail"]) == [
        "same image bytes as s:a", "same image bytes as s:a", "same image bytes as s:b",
    ]


def test_no_duplicates_no_decisions():
    frame = pd.DataFrame({"id": ["x:1", "x:2"], "_partition": [0, 1], "image_sha256": ["a", "b"]})
    with dask.config.set(scheduler="sync"):
        out = ExactDedup(ExactDedup.Config()).decide(dd.from_pandas(frame, npartitions=2)).compute()
    assert out.empty
