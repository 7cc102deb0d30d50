"""Exact and url dedup as Dask passes: the smallest id of each key group is kept, whatever the
partitioning; already-dropped rows never take part (the runner passes live rows only)."""

from __future__ import annotations

import dask
import dask.dataframe as dd
import pandas as pd
import pytest

from curate.stages.exact_dedup import ExactDedup, UrlDedup, normalize_url


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


@pytest.mark.parametrize(
    "url, expected",
    [
        ("HTTP://Example.COM:80/a#x", "http://example.com/a"),
        ("  https://Example.com:443/a?q=1  ", "https://example.com/a?q=1"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),  # not a default port
        ("http://example.com:443/a", "http://example.com:443/a"),  # https's port, not http's
        ("http://example.com/Photos/IMG.JPG?Size=L", "http://example.com/Photos/IMG.JPG?Size=L"),
        ("http://User:Pw@Example.com:80/a", "http://User:Pw@example.com/a"),
        ("http://[2001:DB8::1]:80/a", "http://[2001:db8::1]/a"),
        ("http://[2001:DB8::1]:8080/a", "http://[2001:db8::1]:8080/a"),
        ("not a url#x", "not a url"),
        ("   ", None),
        (None, None),
    ],
)
def test_normalize_url(url, expected):
    assert normalize_url(url) == expected


def _url_frame():
    rows = [
        ("s:5", 0, "HTTP://Example.COM:80/a#x"),
        ("s:1", 1, "http://example.com/a"),
        ("s:2", 0, "http://example.com/A"),  # path case matters: not a duplicate
        ("s:3", 2, "https://example.com/a"),  # another scheme: not a duplicate
        ("s:4", 2, " http://example.com/a "),
        ("s:6", 1, "https://cdn.example.org:443/x.jpg?w=1"),
        ("s:0", 2, "https://CDN.example.org/x.jpg?w=1#frag"),
        ("s:7", 0, "https://cdn.example.org/x.jpg?w=2"),
        ("s:8", 1, None),
        ("s:9", 2, "  "),
    ]
    return pd.DataFrame(rows, columns=["id", "_partition", "url"])


@pytest.mark.parametrize("npartitions", [1, 2, 3, 10])
def test_url_dedup_keeps_smallest_id_per_normalised_url_for_any_partitioning(npartitions):
    stage = UrlDedup(UrlDedup.Config())
    live = dd.from_pandas(_url_frame(), npartitions=npartitions, sort=False)
    with dask.config.set(scheduler="sync"):
        out = stage.decide(live).compute().sort_values("id").reset_index(drop=True)
    assert list(out.columns) == ["id", "_partition", "drop_reason", "drop_detail"]
    assert list(out["id"]) == ["s:4", "s:5", "s:6"]
    assert list(out["_partition"]) == [2, 0, 1]
    assert set(out["drop_reason"]) == {"duplicate"}
    assert list(out["drop_detail"]) == ["same url as s:1", "same url as s:1", "same url as s:0"]


def test_url_dedup_no_duplicates_no_decisions():
    frame = pd.DataFrame({"id": ["x:1", "x:2"], "_partition": [0, 1],
                          "url": ["http://a.example/1", "http://a.example/2"]})
    with dask.config.set(scheduler="sync"):
        out = UrlDedup(UrlDedup.Config()).decide(dd.from_pandas(frame, npartitions=2)).compute()
    assert out.empty
