"""The generic near-duplicate machinery (curate/engine/near_groups.py) through Dask's synchronous
scheduler: banding finds every pair within the distance and never builds a bucket's square,
components cross partitions, and the keep rule equals a brute-force reference whatever the
partitioning."""

from __future__ import annotations

import itertools
import math

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from curate.engine import near_groups as neardup
from curate.engine.near_groups import (
    band_pairs,
    components,
    hamming_band_keys,
    hamming_band_masks,
    hamming_distance,
    keep_best,
    near_duplicate_decisions,
    verify_pairs,
)


@pytest.fixture(autouse=True)
def sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def _flip(h: int, bits: list[int]) -> int:
    u = (h & (2**64 - 1)) ^ sum(1 << b for b in bits)
    return u - 2**64 if u >= 2**63 else u


def _union_find_groups(ids: list[str], pairs: list[tuple[str, str]]) -> dict[str, str]:
    parent = {i: i for i in ids}

    def root(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i: root(i) for i in ids}


# ---------------------------------------------------------------------------------------------
# Band keys for Hamming distance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_distance, blocks", [(0, 1), (0, 3), (2, 3), (4, 5), (4, 7), (6, 8)])
def test_band_masks_cover_the_code_and_count_combinations(max_distance, blocks):
    masks = hamming_band_masks(max_distance, blocks)
    assert len(masks) == math.comb(blocks, max_distance)
    assert all(bin(m).count("1") >= (64 // blocks) * (blocks - max_distance) for m in masks)
    assert sum(neardup.block_masks(64, blocks)) == 2**64 - 1


@pytest.mark.parametrize("max_distance, blocks", [(4, 5), (4, 7), (3, 9)])
def test_codes_within_distance_always_share_a_band_key(max_distance, blocks):
    """The pigeonhole guarantee, on random codes and worst-case flips (spread over blocks)."""
    rng = np.random.default_rng(7)
    masks = hamming_band_masks(max_distance, blocks)
    base = rng.integers(-2**63, 2**63 - 1, size=400, dtype=np.int64)
    for code in base.tolist():
        flips = rng.choice(64, size=max_distance, replace=False).tolist()
        other = _flip(code, flips)
        a, b = hamming_band_keys(np.array([code, other]), masks)
        assert (a == b).any(), (code, flips)


def test_hamming_distance_matches_python_popcount():
    rng = np.random.default_rng(3)
    a = rng.integers(-2**63, 2**63 - 1, size=200, dtype=np.int64)
    b = rng.integers(-2**63, 2**63 - 1, size=200, dtype=np.int64)
    expected = [bin((x ^ y) & (2**64 - 1)).count("1") for x, y in zip(a.tolist(), b.tolist())]
    assert hamming_distance(a, b).tolist() == expected


# ---------------------------------------------------------------------------------------------
# Candidates and verification
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("npartitions", [1, 2, 5])
def test_band_pairs_are_the_rows_sharing_a_key_in_the_same_band(npartitions):
    frame = pd.DataFrame({
        "id": ["r:0", "r:1", "r:2", "r:3", "r:4", "r:5"],
        "b0": [1, 1, 2, 3, None, 1],
        "b1": [7, 8, 8, 9, 9, 5],  # 7 in b1 is not 7 in b0: bands never mix
    })
    frame["b0"] = frame["b0"].astype("Int64")
    live = dd.from_pandas(frame, npartitions=npartitions, sort=False)
    got = band_pairs(live, ["b0", "b1"]).compute()
    assert list(got.columns) == ["id_a", "id_b"]
    assert sorted(map(tuple, got.to_numpy().tolist())) == [
        ("r:0", "r:1"), ("r:0", "r:5"), ("r:1", "r:2"), ("r:1", "r:5"), ("r:3", "r:4"),
    ]


@pytest.mark.parametrize("max_bucket", [256, 2])
def test_band_pairs_leave_out_pairs_whose_sketches_differ(max_bucket):
    """`sketch`: a pair sharing a key is a candidate only where the rows' sketches differ in at
    most `sketch_distance` bits, in a bucket within the cap and in one over it (windowed)."""
    frame = pd.DataFrame({
        "id": ["r:0", "r:1", "r:2", "r:3"],
        "b0": [1, 1, 1, 2],
        "b1": [5, 5, 6, 2],
        "s": np.array([0b0000, 0b0011, 0b1111, -1], dtype=np.int64),  # r:0-r:1 2 bits, r:0-r:2 4, r:1-r:2 2
    })
    live = dd.from_pandas(frame, npartitions=2, sort=False)
    pairs = lambda **kw: sorted(map(tuple, band_pairs(live, ["b0", "b1"], max_bucket=max_bucket, **kw)
                                    .compute().to_numpy().tolist()))
    assert pairs() == [("r:0", "r:1"), ("r:0", "r:2"), ("r:1", "r:2")]
    assert pairs(sketch="s", sketch_distance=2) == [("r:0", "r:1"), ("r:1", "r:2")]
    assert pairs(sketch="s", sketch_distance=1) == []
    assert pairs(sketch="s", sketch_distance=64) == pairs()


def test_a_bucket_names_its_band_and_key():
    """(band, key) travels as one int64: one band's keys stay distinct (a bijection, extremes
    included) and equal keys of different bands never meet."""
    keys = np.concatenate([np.arange(-5000, 5000), [np.iinfo(np.int64).min, np.iinfo(np.int64).max]])
    buckets = np.stack([neardup._bucket(band, keys) for band in range(64)])
    assert buckets.dtype == np.int64
    assert len(np.unique(buckets)) == buckets.size


def test_verify_pairs_keeps_what_accept_confirms():
    live = dd.from_pandas(pd.DataFrame({"id": ["a", "b", "c"], "v": [1.0, 1.1, 5.0]}), npartitions=2)
    pairs = dd.from_pandas(pd.DataFrame({"id_a": ["a", "a", "b"], "id_b": ["b", "c", "c"]}), npartitions=2)
    got = verify_pairs(live, pairs, ["v"], lambda l, r: (l["v"] - r["v"]).abs().to_numpy() < 0.5).compute()
    assert sorted(map(tuple, got.to_numpy().tolist())) == [("a", "b")]


def test_a_huge_bucket_of_identical_hashes_is_chained_not_squared():
    """1,000 identical hashes (a blank image's) plus noise: pairs stay linear in the bucket
    size (window per row and band: at most 4,000 pairs, where the square holds half a million),
    and they all still end in one group keeping the smallest id."""
    n, window, max_bucket = 1000, 4, 64
    rng = np.random.default_rng(0)
    noise = rng.integers(-2**63, 2**63 - 1, size=200, dtype=np.int64)
    hashes = np.concatenate([np.zeros(n, dtype=np.int64), noise])
    ids = [f"b:{i:05d}" for i in rng.permutation(len(hashes))]
    masks = hamming_band_masks(2, 3)
    keys = hamming_band_keys(hashes, masks)
    frame = pd.DataFrame({"id": ids, "_partition": np.arange(len(ids)) % 7, "h": hashes,
                          **{f"k{j}": keys[:, j] for j in range(len(masks))}})
    live = dd.from_pandas(frame, npartitions=7, sort=False)
    bands = [f"k{j}" for j in range(len(masks))]
    pairs = band_pairs(live, bands, order="h", max_bucket=max_bucket, window=window).compute()
    assert len(pairs) <= n * window  # the same consecutive pairs in every band, written once
    assert len(pairs) < n * (n - 1) // 2 / 100
    stats: dict[str, int] = {}
    decisions = near_duplicate_decisions(
        live, bands=bands, columns=["h"], detail="same as {kept}", order="h",
        accept=lambda a, b: hamming_distance(a["h"].to_numpy(), b["h"].to_numpy()) <= 2,
        max_bucket=max_bucket, window=window, stats=stats,
    ).compute()
    zero_ids = sorted(i for i, h in zip(ids, hashes) if h == 0)
    assert sorted(decisions["id"]) == zero_ids[1:]
    assert set(decisions["drop_detail"]) == {f"same as {zero_ids[0]}"}
    assert stats["groups"] == 1 and stats["grouped_rows"] == n


# ---------------------------------------------------------------------------------------------
# Connected components
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("npartitions", [1, 2, 3])
def test_a_chain_across_partitions_is_one_group(npartitions):
    # a~b, b~c, c~d: each edge in another partition, ids not in chain order
    edges = pd.DataFrame({"id_a": ["p:5", "p:2", "p:2", "p:7"], "id_b": ["p:9", "p:9", "p:8", "p:8"]})
    got = components(dd.from_pandas(edges, npartitions=npartitions, sort=False)).compute()
    assert dict(zip(got["id"], got["group"])) == {i: "p:2" for i in ["p:2", "p:5", "p:7", "p:8", "p:9"]}


def test_components_equal_union_find_on_random_graphs():
    rng = np.random.default_rng(11)
    ids = [f"g:{i:03d}" for i in rng.permutation(300)]
    for trial in range(3):
        pairs = set()
        for _ in range(220):
            a, b = rng.choice(len(ids), size=2, replace=False)
            pairs.add(tuple(sorted((ids[a], ids[b]))))
        # and one long path in random id order (many hops)
        path = rng.permutation(len(ids))[:80]
        pairs |= {tuple(sorted((ids[a], ids[b]))) for a, b in zip(path, path[1:])}
        edges = pd.DataFrame(sorted(pairs), columns=["id_a", "id_b"])
        stats: dict[str, int] = {}
        got = components(dd.from_pandas(edges, npartitions=trial + 2), stats=stats).compute()
        touched = sorted(set(edges["id_a"]) | set(edges["id_b"]))
        expected = _union_find_groups(touched, sorted(pairs))
        assert dict(zip(got["id"], got["group"])) == expected
        assert stats["rounds"] <= 12  # hooking and jumping: not one round per hop of the path


def test_no_edges_no_groups():
    edges = pd.DataFrame({"id_a": pd.Series([], dtype=str), "id_b": pd.Series([], dtype=str)})
    assert components(dd.from_pandas(edges, npartitions=1)).compute().empty


# ---------------------------------------------------------------------------------------------
# Keep rule, end to end, against a brute-force reference
# ---------------------------------------------------------------------------------------------


def _random_rows(seed: int, n: int = 160, max_distance: int = 3) -> pd.DataFrame:
    """Clusters of hashes (seeds plus copies a few bits off), scores with ties and nulls."""
    rng = np.random.default_rng(seed)
    hashes: list[int] = []
    while len(hashes) < n:
        center = int(rng.integers(-2**63, 2**63 - 1))
        for _ in range(int(rng.integers(1, 6))):
            flips = rng.choice(64, size=int(rng.integers(0, max_distance + 2)), replace=False).tolist()
            hashes.append(_flip(center, flips))
    hashes = hashes[:n]
    scores = rng.choice([0.1, 0.2, 0.3, np.nan], size=n)  # few values: ties are common
    ids = [f"s:{i:04d}" for i in rng.permutation(n)]
    return pd.DataFrame({"id": ids, "_partition": rng.integers(0, 9, size=n).astype(np.int32),
                         "h": np.array(hashes, dtype=np.int64), "score": scores})


def _reference(frame: pd.DataFrame, max_distance: int, score: str | None) -> dict[str, str]:
    """Drops by brute force: all pairs, union-find, best = highest score (NaN last), then id."""
    rows = frame.to_dict("records")
    pairs = [(a["id"], b["id"]) for a, b in itertools.combinations(rows, 2)
             if bin((a["h"] ^ b["h"]) & (2**64 - 1)).count("1") <= max_distance]
    groups = _union_find_groups([r["id"] for r in rows], pairs)
    members: dict[str, list[dict]] = {}
    for r in rows:
        members.setdefault(groups[r["id"]], []).append(r)
    drops = {}
    for group in members.values():
        def rank(r):
            s = r["score"] if score else float("nan")
            return (1, 0.0, r["id"]) if np.isnan(s) else (0, -s, r["id"])
        best = min(group, key=rank)
        drops.update({r["id"]: f"like {best['id']}" for r in group if r is not best})
    return drops


@pytest.mark.parametrize("score", ["score", None])
@pytest.mark.parametrize("seed", [1, 2])
def test_decisions_equal_brute_force_for_any_partitioning(seed, score):
    max_distance = 3
    frame = _random_rows(seed, max_distance=max_distance)
    expected = _reference(frame, max_distance, score)
    assert len(expected) > 20  # the data has groups to decide
    masks = hamming_band_masks(max_distance, max_distance + 2)
    keys = hamming_band_keys(frame["h"].to_numpy(), masks)
    banded = frame.assign(**{f"k{j}": keys[:, j] for j in range(len(masks))})
    for npartitions in (1, 3, 8):
        live = dd.from_pandas(banded.sample(frac=1, random_state=npartitions), npartitions=npartitions, sort=False)
        got = near_duplicate_decisions(
            live, bands=[f"k{j}" for j in range(len(masks))], columns=["h"], detail="like {kept}",
            accept=lambda a, b: hamming_distance(a["h"].to_numpy(), b["h"].to_numpy()) <= max_distance,
            score_column=score, order="h",
        ).compute()
        assert list(got.columns) == ["id", "_partition", "drop_reason", "drop_detail"]
        assert set(got["drop_reason"]) == {"duplicate"}
        assert dict(zip(got["id"], got["drop_detail"])) == expected, npartitions
        partition_of = dict(zip(frame["id"], frame["_partition"]))
        assert all(partition_of[i] == p for i, p in zip(got["id"], got["_partition"]))


def test_keep_best_prefers_the_highest_score_then_the_smallest_id():
    groups = pd.DataFrame({"id": ["a", "b", "c", "d", "e", "f", "g"], "group": ["a", "a", "a", "d", "d", "f", "f"]})
    live = pd.DataFrame({"id": list("abcdefg"), "_partition": range(7),
                         "s": [0.1, 0.3, 0.3, np.nan, np.nan, np.nan, 0.0]})
    got = keep_best(dd.from_pandas(live, npartitions=2), dd.from_pandas(groups, npartitions=3), "s",
                    "dup of {kept}!").compute()
    assert dict(zip(got["id"], got["drop_detail"])) == {
        "a": "dup of b!", "c": "dup of b!",  # 0.3 beats 0.1; the tie at 0.3 goes to the smaller id
        "e": "dup of d!",  # no scores: the smallest id
        "f": "dup of g!",  # any score beats none, even 0.0
    }


def test_keep_best_never_broadcasts_the_groups_to_every_partition():
    """The components' output often has one partition; dask turns a join with a one-partition
    frame into a copy of it for every partition of the other side (rows x partitions: near_dedup
    read 5.1 GB at 4M rows for 0.35 GB at 1M). keep_best's join is a hash join whatever the
    groups' partitions, and still decides right."""
    from dask.dataframe.dask_expr._merge import BlockwiseMerge

    live = pd.DataFrame({"id": [f"r{i:03d}" for i in range(200)], "_partition": np.arange(200) // 10,
                         "s": np.linspace(0, 1, 200)})
    groups = pd.DataFrame({"id": ["r001", "r002", "r150"], "group": ["r001", "r001", "r150"]})
    decided = keep_best(dd.from_pandas(live, npartitions=20), dd.from_pandas(groups, npartitions=1), "s",
                        "dup of {kept}")
    merges = [e for e in decided.expr.lower_completely().walk() if isinstance(e, BlockwiseMerge)]
    # partition i with partition i of two shuffled sides, not one partition with every other
    assert merges and all(m.left.npartitions == m.right.npartitions for m in merges)
    got = decided.compute()
    assert dict(zip(got["id"], got["drop_detail"])) == {"r001": "dup of r002"}  # r150: a group of one
