"""Near-duplicate grouping through Dask: candidate pairs by banding, verification, connected
components, one kept per group. Independent of what the rows are compared on: perceptual hashes
(`curate.stages.near_dedup`) and embeddings use the same four steps.

    live ──band_pairs──► candidates ──verify_pairs──► edges ──components──► groups ──keep_best──► drops
    [id, bands...]       [id_a, id_b]                 [id_a, id_b]          [id, group]          decisions

Contracts shared by every step:
- Ids are strings, compared as strings: "smallest id" is the lexicographically smallest.
- A pair is unordered and written once, with `id_a < id_b`.
- Every result is a set that depends only on the rows, never on how they are partitioned or on
  the worker count, so the decisions are deterministic (the GlobalStage contract).
- Only small columns (ids, band keys and the columns a verification reads) move through the
  shuffles; nothing is collected on the client except counts.

Banding. Rows that share a value in the same band column are candidates (a self-join on
(band, key), after a shuffle on it: never all pairs; (band, key) travels as one int64, `_bucket`,
which can join two bands' keys by a 2^-64 chance: an extra candidate, never a lost one). A
caller chooses band keys so that every
pair it wants to find shares at least one of them (for Hamming distance, the keys of
`hamming_band_masks` guarantee it). A bucket (rows with one band key) holding more than `max_bucket` rows is
pathological (a blank image's hash, a degenerate embedding) and would give a quadratic number of
pairs; such a bucket is sorted by (`order`, id) and each row is paired only with its next
`window` rows. Rows with equal `order` values are therefore always chained into one component
(equality is transitive, so a chain of consecutive ids is enough), and unequal ones are found only
when they sort within `window` of each other: the recall guarantee of the banding holds for
buckets within the cap.

Components. Iterative min-label propagation with root hooking and pointer jumping (Shiloach-
Vishkin's idea on dataframes): every node starts labelled with the smallest id among itself and
its neighbours; each round, a node takes the smallest label among its neighbours, the node its
label names takes it too (hooking), and every node jumps to its label's label. Labels only
decrease and are always ids of the same component, so when a round changes nothing, every node
carries its component's smallest id. Hooking and jumping make a long chain converge in a few
rounds instead of one round per hop. Each round is a few merges and group-bys on the cluster and
one count brought back.

Keep rule (`keep_best`): within a group, the row with the highest `score_column` (higher is
better; null and NaN rank last), ties and unscored groups broken by the smallest id; every other
member is dropped with code `duplicate` and a detail naming the kept id.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from curate.contract import DUPLICATE

# A verification: the left and right rows of candidate pairs (the columns a caller asked for,
# aligned by position) -> a boolean array, True where the pair is a near duplicate. Vectorised:
# it sees a whole partition of pairs at once. Shipped to workers, so it must pickle.
Accept = Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]

DEFAULT_MAX_BUCKET = 256  # rows in one bucket before it is windowed: at most ~32k pairs a bucket
DEFAULT_WINDOW = 16  # pairs per row in a bucket over the cap
GROUP_SHUFFLE = 10  # live partitions per output of the candidates' dedup, verification and keep_best shuffles
EDGES_PER_PARTITION = 250_000  # in the connected-components rounds: ~4 MB of edges a partition (below)


# ---------------------------------------------------------------------------------------------
# Band keys for binary codes under Hamming distance
# ---------------------------------------------------------------------------------------------


def block_masks(bits: int, blocks: int) -> list[int]:
    """`bits` split into `blocks` contiguous runs, as even as possible (the longer ones first),
    each as an integer mask, from the most significant bits down."""
    if not 0 < blocks <= bits:
        raise ValueError(f"blocks must be in 1..{bits}, got {blocks}")
    sizes = [bits // blocks + (1 if i < bits % blocks else 0) for i in range(blocks)]
    masks, top = [], bits
    for size in sizes:
        masks.append(((1 << size) - 1) << (top - size))
        top -= size
    return masks


def hamming_band_masks(max_distance: int, blocks: int, bits: int = 64) -> list[int]:
    """The masks of the band keys that find every pair of `bits`-bit codes within
    `max_distance` of each other: the code is cut into `blocks` blocks and each key is one
    combination of `blocks - max_distance` of them (C(blocks, max_distance) keys).

    Why it is exact (pigeonhole): codes that differ in at most `max_distance` bits differ in at
    most `max_distance` blocks, so at least `blocks - max_distance` blocks are equal, and the key
    made of those blocks is equal. `blocks = max_distance + 1` is classic banding (one block a key,
    fewest keys, shortest keys); more blocks give longer keys, hence far fewer chance collisions
    between unrelated codes, for more keys a row (multi-index hashing)."""
    if not 0 <= max_distance < blocks:
        raise ValueError(f"need 0 <= max_distance < blocks, got max_distance={max_distance}, blocks={blocks}")
    masks = block_masks(bits, blocks)
    return [
        sum(masks[i] for i in combo)
        for combo in itertools.combinations(range(blocks), blocks - max_distance)
    ]


def hamming_band_keys(codes: np.ndarray, masks: Sequence[int]) -> np.ndarray:
    """Band keys of 64-bit codes (int64 or uint64, any sign): an (n, len(masks)) int64 array,
    column j = code AND masks[j]. Two codes share key j iff they agree on the bits of mask j."""
    codes = np.asarray(codes).astype(np.int64, copy=False).view(np.uint64)
    mask_array = np.array(masks, dtype=np.uint64)
    return (codes[:, None] & mask_array[None, :]).view(np.int64)


_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of 64-bit codes (elementwise), as int64."""
    x = np.bitwise_xor(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)).view(np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    parts = [(x >> np.uint64(s)) & np.uint64(0xFFFF) for s in (0, 16, 32, 48)]
    return sum(_POPCOUNT16[p.astype(np.intp)].astype(np.int64) for p in parts)


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Row references: what moves through the shuffles instead of the ids
# ---------------------------------------------------------------------------------------------

REF = "_ref"  # int64: (the row's partition of `live`) << 32 | its position in it
ID_HASH = "_id_hash"  # int64: a hash of the id, the same in every process and partitioning


def _with_refs(part: pd.DataFrame, partition_info: dict[str, Any] | None = None) -> pd.DataFrame:
    number = partition_info["number"] if partition_info else 0
    return part.assign(**{
        REF: (np.int64(number) << np.int64(32)) + np.arange(len(part), dtype=np.int64),
        ID_HASH: pd.util.hash_pandas_object(part["id"], index=False).to_numpy().view(np.int64),
    })


def with_refs(live: Any) -> Any:
    """`live` with `_ref` (an int64 naming the row) and `_id_hash`. Band rows, candidate pairs
    and component labels carry the 8-byte ref instead of the id string: measured at 100,000 rows
    (tools/bench/global_passes.py) the string ids were most of the bytes shuffled and of the
    time spent sorting buckets. A ref depends on how `live` is partitioned, so nothing decided
    depends on its value: buckets over the cap are ordered by `_id_hash` (then the ref, for the
    equal hashes of equal ids), components are sets, and `keep_best` ranks by the ids
    themselves. `live` must be one expression read consistently (each use recomputes it)."""
    meta = live._meta.assign(**{REF: np.zeros(0, dtype=np.int64), ID_HASH: np.zeros(0, dtype=np.int64)})
    return live.map_partitions(_with_refs, meta=meta)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _bucket(band: int, keys: np.ndarray) -> np.ndarray:
    """One int64 naming (band, key): the key mixed (splitmix64's finaliser, a bijection) plus an
    odd multiple of the golden ratio per band. Distinct keys of one band never share a bucket;
    keys of two bands share one only when their mixes differ by exactly the bands' offsets (a
    2^-64 chance a pair of keys), which adds a candidate pair that verification rejects. One
    8-byte column instead of band (4) and key (8): measured, the band rows are most of the bytes
    a near-dup pass shuffles (semantic_dedup at 4M rows: 100 bands)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.int64).view(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = (z ^ (z >> np.uint64(31))) + np.uint64(2 * band + 1) * _GOLDEN
    return z.view(np.int64)


def _melt_bands(df: pd.DataFrame, bands: list[str], order: str | None, key: str = "id",
                sketch: str | None = None) -> pd.DataFrame:
    """One row per (row, band) with a non-null key: bucket (`_bucket` of the band and its key),
    order, id (the row's `key` column), and the row's `sketch` when one is given."""
    pieces = []
    for i, column in enumerate(bands):
        keys = df[column]
        present = keys.notna().to_numpy()
        piece = {
            "bucket": _bucket(i, keys[present].astype(np.int64).to_numpy()),
            "order": (df[order] if order else df[key])[present].to_numpy(),
            "id": df[key][present].to_numpy(),
        }
        if sketch:
            piece["sketch"] = df[sketch].to_numpy(dtype=np.int64)[present]
        pieces.append(pd.DataFrame(piece))
    return pd.concat(pieces, ignore_index=True)


def _ordered(a: pd.Series, b: pd.Series) -> pd.DataFrame:
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    swap = (b < a).to_numpy()
    return pd.DataFrame({"id_a": a.where(~swap, b), "id_b": b.where(~swap, a)})


def _close(a: np.ndarray, b: np.ndarray, sketch_distance: int | None) -> np.ndarray:
    """Where the sketches of two rows are within `sketch_distance` bits (everywhere without)."""
    if sketch_distance is None:
        return np.ones(len(a), dtype=bool)
    return hamming_distance(a, b) <= sketch_distance


def _within_buckets(rows: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of positions within a bucket: `rows` are the positions of whole buckets, each
    bucket's consecutive, and `sizes` each row's bucket size. By size, each bucket of that size
    a row of a matrix and the pairs its upper triangle (a handful of sizes: most buckets hold
    two rows), instead of a self-join's size^2 rows a bucket."""
    firsts, seconds = [], []
    for size in np.unique(sizes):
        block = rows[sizes == size].reshape(-1, size)  # whole buckets, in order
        upper = np.triu_indices(int(size), k=1)
        firsts.append(block[:, upper[0]].ravel())
        seconds.append(block[:, upper[1]].ravel())
    return np.concatenate(firsts), np.concatenate(seconds)


def _bucket_pairs(long: pd.DataFrame, max_bucket: int, window: int, sketch_distance: int | None = None) -> pd.DataFrame:
    """The pairs of one shuffled partition (every bucket in it is whole), those whose `sketch`
    columns differ in more than `sketch_distance` bits left out when it is given."""
    # Most rows are alone in their bucket: find the shared buckets by hashing (not a sort of the
    # whole partition: ~0.9M band rows a partition in semantic_dedup), and sort only those
    shared = long.loc[long["bucket"].duplicated(keep=False).to_numpy()]
    keys = [shared[c].to_numpy() for c in ("id", "order", "bucket")]
    if all(k.dtype.kind in "iuf" for k in keys):  # refs and hashes: numpy's lexsort, 5x pandas' on three keys
        long = shared.iloc[np.lexsort(keys)].reset_index(drop=True)
    else:
        long = shared.sort_values(["bucket", "order", "id"], kind="stable", ignore_index=True)
    size = long.groupby("bucket", sort=False)["id"].transform("size").to_numpy()
    pieces = []
    small = np.flatnonzero((size > 1) & (size <= max_bucket))
    if len(small):
        a, b = _within_buckets(small, size[small])
        ids = long["id"]
        left, right = ids.iloc[a].reset_index(drop=True), ids.iloc[b].reset_index(drop=True)
        keep = (left != right).to_numpy()
        if sketch_distance is not None:
            sketches = long["sketch"].to_numpy()
            keep &= _close(sketches[a], sketches[b], sketch_distance)
        pieces.append(_ordered(left[keep], right[keep]))
    big = long.loc[size > max_bucket].reset_index(drop=True)
    if len(big):
        bucket, ids = big["bucket"].to_numpy(), big["id"]
        sketches = big["sketch"].to_numpy() if sketch_distance is not None else np.zeros(len(big), np.int64)
        for step in range(1, min(window, len(big) - 1) + 1):
            same = (bucket[step:] == bucket[:-step]) & _close(sketches[step:], sketches[:-step], sketch_distance)
            pieces.append(_ordered(ids[:-step][same], ids[step:][same]))
    if not pieces:
        return pd.DataFrame({"id_a": long["id"].iloc[:0], "id_b": long["id"].iloc[:0]})
    return pd.concat(pieces, ignore_index=True).drop_duplicates(ignore_index=True)


def band_pairs(
    live: Any,
    bands: list[str],
    *,
    order: str | None = None,
    max_bucket: int = DEFAULT_MAX_BUCKET,
    window: int = DEFAULT_WINDOW,
    key: str = "id",
    sketch: str | None = None,
    sketch_distance: int = 0,
) -> Any:
    """Candidate pairs: rows of `live` (a dask dataframe with `id` and the integer `bands`
    columns) that share a non-null value in the same band column (with one band column, exactly
    those; with several, by a 2^-64 chance also two keys of different bands: `_bucket`, so a
    caller with several bands verifies its candidates). Returns a dask dataframe
    `[id_a, id_b]` with `id_a < id_b`, each pair once; `key` names the column the pairs are
    made of (`id`, or `_ref` from `with_refs`).

    `sketch`: an int64 column of `live` (a 64-bit code of each row, e.g. a SimHash); pairs whose
    sketches differ in more than `sketch_distance` bits are left out in the bucket itself: a
    cheap test of every pair sharing a key, for a caller whose keys find many unrelated pairs
    by chance (semantic_dedup: 58M at 4M rows), 8 bytes more in every band row.

    A bucket of more than `max_bucket` rows is sorted by (`order`, id) (by id alone when `order`
    is None) and each row is paired with its next `window` rows only (see the module docstring):
    pairs stay linear in the bucket size, and rows with equal `order` still end in one component.
    """
    if not bands:
        raise ValueError("band_pairs needs at least one band column")
    if max_bucket < 2 or window < 1:
        raise ValueError(f"need max_bucket >= 2 and window >= 1, got {max_bucket}, {window}")
    n = max(1, live.npartitions)
    columns = list(dict.fromkeys([key, *bands, *([order] if order else []), *([sketch] if sketch else [])]))
    id_dtype = live.dtypes[key]
    meta = pd.DataFrame({
        "bucket": pd.Series(dtype=np.int64),
        "order": pd.Series(dtype=live.dtypes[order] if order else id_dtype),
        "id": pd.Series(dtype=id_dtype),
        **({"sketch": pd.Series(dtype=np.int64)} if sketch else {}),
    })
    long = live[columns].map_partitions(_melt_bands, bands, order, key, sketch, meta=meta)
    long = long.shuffle(on="bucket", npartitions=n)
    pair_meta = pd.DataFrame({"id_a": pd.Series(dtype=id_dtype), "id_b": pd.Series(dtype=id_dtype)})
    pairs = long.map_partitions(_bucket_pairs, max_bucket, window, sketch_distance if sketch else None,
                                meta=pair_meta)
    return pairs.drop_duplicates(split_out=max(1, n // GROUP_SHUFFLE))


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def _accepted(df: pd.DataFrame, columns: list[str], accept: Accept) -> pd.DataFrame:
    left = df[[f"{c}_a" for c in columns]].set_axis(columns, axis=1).reset_index(drop=True)
    right = df[[f"{c}_b" for c in columns]].set_axis(columns, axis=1).reset_index(drop=True)
    keep = np.asarray(accept(left, right), dtype=bool) if len(df) else np.zeros(0, dtype=bool)
    if keep.shape != (len(df),):
        raise ValueError(f"accept returned shape {keep.shape} for {len(df)} pairs")
    return df.loc[keep, ["id_a", "id_b"]]


def verify_pairs(live: Any, pairs: Any, columns: list[str], accept: Accept, key: str = "id") -> Any:
    """The candidate `pairs` (`[id_a, id_b]`) that `accept` confirms, judged on `columns` of
    `live` (joined onto both ends by `key`; rows missing from `live` drop the pair). Returns
    `[id_a, id_b]`, a subset of `pairs`."""
    n = max(1, live.npartitions // GROUP_SHUFFLE)  # P x P pieces of p2p shards otherwise
    features = live[[key, *columns]]
    both = pairs
    for end in ("a", "b"):
        renamed = features.rename(columns={key: f"id_{end}", **{c: f"{c}_{end}" for c in columns}})
        both = both.merge(renamed, on=f"id_{end}", how="inner", npartitions=n)
    return both.map_partitions(_accepted, columns, accept, meta=pairs._meta)


# ---------------------------------------------------------------------------------------------
# Connected components
# ---------------------------------------------------------------------------------------------


def _min_by(frame: Any, key: str, value: str, name: str, n: int) -> Any:
    """`[id, name]`: the smallest `value` per `key`."""
    out = frame.groupby(key)[value].min(split_out=n).reset_index()
    return out.rename(columns={key: "id", value: name})


def _lower(df: pd.DataFrame, base: str, other: str, out: str) -> pd.DataFrame:
    """`out` = the smaller of `base` and `other` (a missing `other` offers nothing)."""
    b, o = df[base], df[other]
    smaller = (o.notna() & (o < b).fillna(False)).to_numpy(dtype=bool)
    return df.assign(**{out: b.where(~smaller, o)}).drop(columns=[other])


def components(edges: Any, *, max_rounds: int = 100, stats: dict[str, int] | None = None) -> Any:
    """Connected components of the undirected graph of `edges` (`[id_a, id_b]`). Returns
    `[id, group]` for every id that appears in an edge (ids in no edge are singletons and are
    left out), `group` being the smallest id of its component; persisted on the cluster.

    Raises RuntimeError if it has not converged after `max_rounds` rounds (not expected: hooking
    and jumping make the rounds grow like the logarithm of a component's size, and a round that
    changes nothing ends the loop). When `stats` is a dict, it receives `rounds`."""
    import dask.dataframe as dd  # ~1 s of import, paid where a global pass runs: the stages import this module

    directed = dd.concat([
        edges.rename(columns={"id_a": "src", "id_b": "dst"}),
        edges.rename(columns={"id_b": "src", "id_a": "dst"}),
    ])
    # Few partitions when there are few edges, but not one for all: at 2M edges a partition,
    # near_dedup's 0.8M at 4M rows sat in one and its merges made the worker's peak (704 MiB).
    n = min(edges.npartitions, max(1, -(-int(directed.shape[0].compute()) // EDGES_PER_PARTITION)))
    directed = directed.repartition(npartitions=n).persist()
    # Start: each node labelled with the smallest of itself and its neighbours.
    labels = _min_by(directed, "src", "dst", "offered", n)
    labels = labels.assign(label=labels["id"]).map_partitions(_lower, "label", "offered", "label")
    labels = labels.persist()
    for rounds in range(1, max_rounds + 1):
        # Each step is persisted: the steps reuse each other's results, and dask's expression
        # optimiser walks a reused expression once per use (seconds a round when chained).
        # Propagate: a node takes the smallest label among its neighbours.
        spread = directed.merge(labels.rename(columns={"id": "src"}), on="src", how="inner", npartitions=n)
        offered = _min_by(spread, "dst", "label", "offered", n)
        step = labels.merge(offered, on="id", how="left", npartitions=n)
        step = step.map_partitions(_lower, "label", "offered", "best").persist()
        # Hook: the node a label names takes the smallest label its followers were offered.
        hooks = _min_by(step[step["best"] < step["label"]], "label", "best", "offered", n)
        step = step.merge(hooks, on="id", how="left", npartitions=n)
        step = step.map_partitions(_lower, "best", "offered", "best").persist()
        # Jump: every node moves on to its label's label.
        parents = step[["id", "best"]].rename(columns={"id": "best", "best": "offered"})
        step = step.merge(parents, on="best", how="left", npartitions=n)
        step = step.map_partitions(_lower, "best", "offered", "best").persist()
        changed = int((step["best"] != step["label"]).sum().compute())
        labels = step[["id", "best"]].rename(columns={"best": "label"}).persist()
        if changed == 0:
            if stats is not None:
                stats["rounds"] = rounds
            return labels.rename(columns={"label": "group"})
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")


# ---------------------------------------------------------------------------------------------
# Keeping one per group
# ---------------------------------------------------------------------------------------------


def _drop_all_but_best(members: pd.DataFrame, score_column: str | None, detail: str) -> pd.DataFrame:
    """The decisions of one shuffled partition (every group in it is whole)."""
    members = members.reset_index(drop=True)
    if score_column:
        # NaN ranks with nulls (last): a failed score is no score
        score = pd.to_numeric(members[score_column], errors="coerce").astype("float64")
        ranked = members.assign(_score=score).sort_values(
            ["group", "_score", "id"], ascending=[True, False, True], na_position="last",
            kind="stable", ignore_index=True)
    else:
        ranked = members.sort_values(["group", "id"], kind="stable", ignore_index=True)
    ids = ranked["id"].to_numpy(dtype=object)
    first = ~ranked["group"].duplicated().to_numpy()  # the best of each group: its first row
    kept_id = ids[np.flatnonzero(first)[np.cumsum(first) - 1]]
    dups = ~first
    prefix, _, suffix = detail.partition("{kept}")
    return pd.DataFrame({
        "id": ids[dups],
        "_partition": ranked["_partition"].to_numpy()[dups],
        "drop_reason": DUPLICATE,
        "drop_detail": [f"{prefix}{k}{suffix}" for k in kept_id[dups]],
    })


def keep_best(live: Any, groups: Any, score_column: str | None, detail: str, key: str = "id") -> Any:
    """The drop decisions of near-dedup groups: in each group of `groups` (`[id, group]`, `id`
    holding `live`'s `key` column), all but the best row by the keep rule (highest
    `score_column`, nulls and NaN last, then smallest id), with code `duplicate` and `detail`
    (where `{kept}` becomes the kept id). `live` supplies the id, `_partition` and the score.
    Returns the GlobalStage decision columns."""
    wanted = list(dict.fromkeys([key, "id", "_partition", *([score_column] if score_column else [])]))
    if key != "id":
        groups = groups.rename(columns={"id": key})
    # A hash join, both sides shuffled into one output per GROUP_SHUFFLE partitions of `live`.
    # Not a broadcast: dask broadcasts a frame of few partitions (the components' output often
    # has one) to every partition of `live`, time and memory growing with rows x partitions
    # (near_dedup read 5.1 GB at 4M rows for 0.35 at 1M; tools/bench/global_passes.py), and a
    # one-partition side always turns the join into that broadcast: hence the split in two.
    n = max(1, live.npartitions // GROUP_SHUFFLE)
    groups = groups.repartition(npartitions=max(2, groups.npartitions))
    members = groups.merge(live[wanted], on=key, how="inner", npartitions=n, broadcast=False)
    if key != "id":
        members = members.drop(columns=[key])
    members = members.shuffle(on="group", npartitions=n)
    text = live.dtypes["id"]  # the text dtype: object on pandas 2, str on pandas 3
    meta = pd.DataFrame({
        "id": pd.Series(dtype=text),
        "_partition": pd.Series(dtype=live.dtypes["_partition"]),
        "drop_reason": pd.Series(dtype=text),
        "drop_detail": pd.Series(dtype=text),
    })
    return members.map_partitions(_drop_all_but_best, score_column, detail, meta=meta)


# ---------------------------------------------------------------------------------------------
# All four steps
# ---------------------------------------------------------------------------------------------


def near_duplicate_decisions(
    live: Any,
    *,
    bands: list[str],
    columns: list[str],
    accept: Accept,
    detail: str,
    score_column: str | None = None,
    order: str | None = None,
    max_bucket: int = DEFAULT_MAX_BUCKET,
    window: int = DEFAULT_WINDOW,
    stats: dict[str, Any] | None = None,
    add_bands: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    sketch: str | None = None,
    sketch_distance: int = 0,
) -> Any:
    """Band, verify, group and keep one: the decisions of a near-dedup GlobalStage over `live`
    (which holds `id`, `_partition`, the `bands`, the `columns` that `accept` reads and the
    optional `score_column`). When `stats` is a dict, it receives `candidate_pairs`,
    `verified_pairs`, `grouped_rows` and `groups`, counted on the cluster. Rows travel as refs
    (`with_refs`).

    `add_bands`: a partition -> the partition with the `bands` columns, when `live` lacks them;
    applied for the banding only. (Band columns in `live` would be computed again by every step
    that reads it, dask seeing no column it could prune in an opaque map_partitions:
    semantic_dedup's 90 SimHash bands were computed three times at 4M rows.)

    `sketch`, `sketch_distance`: a prefilter of the pairs in each bucket (`band_pairs`); the
    column may come from `add_bands`."""
    live = with_refs(live)
    banded = live if add_bands is None else live.map_partitions(add_bands, meta=add_bands(live._meta))
    candidates = band_pairs(banded, bands, order=order or ID_HASH, max_bucket=max_bucket, window=window,
                            key=REF, sketch=sketch, sketch_distance=sketch_distance).persist()
    edges = verify_pairs(live, candidates, columns, accept, key=REF).persist()
    groups = components(edges)
    if stats is not None:
        import dask  # ~0.1 s of import, paid where a global pass runs: the stages import this module

        counts = dask.compute(
            candidates.shape[0], edges.shape[0], groups.shape[0], groups["group"].nunique(),
        )
        stats.update(zip(("candidate_pairs", "verified_pairs", "grouped_rows", "groups"), map(int, counts)))
    return keep_best(live, groups, score_column, detail, key=REF)
