"""The generation cache (curate/captions/cache.py): round trips, namespaces, the on-disk layout,
real multi-process writers racing compactions, readers that outlive a compaction, and the LRU
bound on the buckets a process keeps."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp

import pyarrow.parquet as pq

from curate.captions.cache import Cached, GenerationCache, namespace_of

NS = "ns0123456789abcd"


def key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def keys_in_bucket(bucket: str, n: int) -> list[str]:
    """The first n keys (over i = 0, 1, 2, ...) whose bucket is `bucket`."""
    out, i = [], 0
    while len(out) < n:
        if key(i).startswith(bucket):
            out.append(key(i))
        i += 1
    return out


def parquet_files(root, ns=NS):
    return sorted((root / ns).glob("*/*.parquet"))


# The concurrency test's keys: indices whose key starts with "a", so 250 keys share 16 buckets and
# every bucket sees enough writes for compactions (and races between them) to happen.
CONC_IDS = [i for i in range(20000) if key(i)[0] == "a"][:250]
N_PROCS, SPAN, STEP, CHUNK, COMPACT_AFTER = 4, 100, 50, 10, 3


def _writer(root: str, ids: list[int], compact_after: int, barrier) -> None:
    """Spawned process: put `ids` in chunks of CHUNK, checking every hit it reads back is right."""
    cache = GenerationCache(root, NS, {"model": "m"}, compact_after=compact_after)
    barrier.wait(timeout=60)  # start together so writes and compactions overlap
    for s in range(0, len(ids), CHUNK):
        chunk = {key(i): Cached(f"t{i}", i % 2 == 0) for i in ids[s:s + CHUNK]}
        cache.put_many(chunk)
        got = cache.get_many(list(chunk))
        bad = {k: v for k, v in got.items() if v != chunk[k]}
        if bad:
            raise SystemExit(f"wrong values read back: {bad}")


# round trips ---------------------------------------------------------------------------------------


def test_round_trip_same_and_fresh_instance(tmp_path):
    """put_many rows come back from get_many, in the same instance and a fresh one; misses are absent."""
    rows = {key(i): Cached(f"text {i}", i % 3 == 0) for i in range(40)}
    rows[key(40)] = Cached("", False)
    rows[key(41)] = Cached("", True)
    misses = [key(i) for i in range(100, 110)]

    cache = GenerationCache(tmp_path, NS)
    assert cache.get_many([key(0), key(40)]) == {}  # index the buckets before writing
    cache.put_many(rows)
    assert cache.get_many(list(rows) + misses) == rows

    fresh = GenerationCache(tmp_path, NS)
    got = fresh.get_many(misses + list(rows))
    assert got == rows
    assert got[key(40)] == Cached("", False) and got[key(41)] == Cached("", True)
    assert isinstance(got[key(40)].text, str) and got[key(41)].truncated is True
    assert fresh.get_many(misses) == {}
    assert fresh.get_many([]) == {}


def test_namespaces_are_isolated(tmp_path):
    """Rows written in one namespace are never seen from another on the same root."""
    a = GenerationCache(tmp_path, namespace_of("model-a", "p1"))
    b = GenerationCache(tmp_path, namespace_of("model-b", "p1"))
    a.put_many({key(i): Cached(f"a{i}", False) for i in range(20)})
    b.put_many({key(i): Cached(f"b{i}", False) for i in range(10, 30)})
    ks = [key(i) for i in range(30)]
    assert a.get_many(ks) == {key(i): Cached(f"a{i}", False) for i in range(20)}
    assert b.get_many(ks) == {key(i): Cached(f"b{i}", False) for i in range(10, 30)}
    assert GenerationCache(tmp_path, namespace_of("model-a", "p2")).get_many(ks) == {}


def test_namespace_of_stable_and_distinct():
    """namespace_of is a stable 16-hex name that changes with any part."""
    ns = namespace_of("model-a", "hash1")
    assert ns == namespace_of("model-a", "hash1") and len(ns) == 16 and int(ns, 16) >= 0
    assert ns != namespace_of("model-b", "hash1") != namespace_of("model-a", "hash2")


# layout ------------------------------------------------------------------------------------------


def test_layout(tmp_path):
    """Rows live in ROOT/<ns>/<key[:2]>/*.parquet, namespace.json holds the describe dict, no .tmp is left."""
    describe = {"model": "tiny-captioner", "prompt_hash": "0123abcd", "max_new_tokens": 64}
    cache = GenerationCache(tmp_path, NS, describe)
    rows = {key(i): Cached(f"t{i}", False) for i in range(30)}
    cache.put_many(rows)

    ns_dir = tmp_path / NS
    assert json.loads((ns_dir / "namespace.json").read_text()) == describe
    files = parquet_files(tmp_path)
    assert {f.parent.name for f in files} == {k[:2] for k in rows}
    seen = {}
    for f in files:
        assert f.parent.parent == ns_dir and len(f.parent.name) == 2
        table = pq.read_table(f)
        assert table.column_names == ["key", "text", "truncated"]
        for k, t in zip(table.column("key").to_pylist(), table.column("text").to_pylist()):
            assert k[:2] == f.parent.name
            seen[k] = t
    assert seen == {k: v.text for k, v in rows.items()}
    assert list(tmp_path.rglob("*.tmp")) == []

    # a second instance without describe leaves namespace.json as it was
    GenerationCache(tmp_path, NS).put_many({key(99): Cached("x", False)})
    assert json.loads((ns_dir / "namespace.json").read_text()) == describe
    assert list(tmp_path.rglob("*.tmp")) == []


def test_stray_tmp_file_ignored(tmp_path):
    """A half-written `.something.tmp` in a bucket is ignored by readers, counting and compaction."""
    ks = keys_in_bucket("7f", 3)
    bucket = tmp_path / NS / "7f"
    bucket.mkdir(parents=True)
    stray = bucket / ".dead-writer-123.parquet.tmp"
    stray.write_bytes(b"PAR1 not really parquet")

    writer = GenerationCache(tmp_path, NS, compact_after=1)
    writer.put_many({ks[0]: Cached("a", False)})
    writer.put_many({ks[1]: Cached("b", True)})  # 2 files > 1: compacts, must skip the stray
    expected = {ks[0]: Cached("a", False), ks[1]: Cached("b", True)}
    assert GenerationCache(tmp_path, NS).get_many(ks) == expected
    assert stray.read_bytes() == b"PAR1 not really parquet"
    assert [p.name[:2] for p in bucket.glob("*.parquet")] == ["0-"]


# concurrency -------------------------------------------------------------------------------------


def test_concurrent_writers_with_compaction(tmp_path):
    """Spawned writers with overlapping keys and racing compactions lose nothing and leave bounded buckets."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(N_PROCS)
    ranges = [CONC_IDS[p * STEP:p * STEP + SPAN] for p in range(N_PROCS)]
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), ids, COMPACT_AFTER, barrier)) for ids in ranges]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * N_PROCS

    every = sorted({i for ids in ranges for i in ids})
    assert len(every) == 250
    got = GenerationCache(tmp_path, NS).get_many([key(i) for i in every])
    assert got == {key(i): Cached(f"t{i}", i % 2 == 0) for i in every}

    files = parquet_files(tmp_path)
    per_bucket: dict[str, list[str]] = {}
    for f in files:
        per_bucket.setdefault(f.parent.name, []).append(f.name)
    bucket_writes = sum(len({key(i)[:2] for i in ids[s:s + CHUNK]})
                        for ids in ranges for s in range(0, len(ids), CHUNK))
    assert any(n.startswith("0-") for names in per_bucket.values() for n in names)  # compaction ran
    assert len(files) < bucket_writes
    # after the last compaction a bucket holds at most compact_after new files plus one folded
    # file per writer that was compacting at the same time
    assert max(len(names) for names in per_bucket.values()) <= COMPACT_AFTER + N_PROCS
    assert list(tmp_path.rglob("*.tmp")) == []


def test_reader_survives_compaction_and_refreshes(tmp_path):
    """A reader that indexed a bucket before another instance compacted it stays correct and sees later files."""
    ks = keys_in_bucket("3c", 6)
    writer = GenerationCache(tmp_path, NS, compact_after=3)
    reader = GenerationCache(tmp_path, NS)
    val = {k: Cached(f"v{j}", j == 2) for j, k in enumerate(ks)}

    writer.put_many({ks[0]: val[ks[0]]})
    writer.put_many({ks[1]: val[ks[1]]})
    assert reader.get_many(ks) == {k: val[k] for k in ks[:2]}

    writer.put_many({ks[2]: val[ks[2]]})
    writer.put_many({ks[3]: val[ks[3]]})  # 4 files > 3: folded into one
    names = [f.name for f in parquet_files(tmp_path)]
    assert len(names) == 1 and names[0].startswith("0-")
    assert reader.get_many(ks) == {k: val[k] for k in ks[:4]}

    writer.put_many({ks[4]: val[ks[4]]})  # a new file after the compaction
    assert reader.get_many(ks) == {k: val[k] for k in ks[:5]}
    assert GenerationCache(tmp_path, NS).get_many(ks) == {k: val[k] for k in ks[:5]}


def test_reader_lists_again_when_a_listed_file_is_gone(tmp_path):
    """A reader whose listing names files folded away before it reads them lists again and finds their rows."""
    ks = keys_in_bucket("c4", 4)
    val = {k: Cached(f"w{j}", False) for j, k in enumerate(ks)}
    writer = GenerationCache(tmp_path, NS, compact_after=3)
    for k in ks[:3]:
        writer.put_many({k: val[k]})
    reader = GenerationCache(tmp_path, NS)
    stale = reader._files("c4")  # listed before the compaction below
    writer.put_many({ks[3]: val[ks[3]]})  # compacts: every file in `stale` is gone
    assert not any(f.exists() for f in stale)

    calls = []
    real_files = reader._files

    def files_once_stale(bucket):
        calls.append(bucket)
        return stale if len(calls) == 1 else real_files(bucket)

    reader._files = files_once_stale
    assert reader.get_many(ks) == val
    assert len(calls) == 2


# memory bound ------------------------------------------------------------------------------------


def test_lru_bound_on_buckets(tmp_path):
    """With max_buckets=2 a process keeps at most 2 buckets, evicts the least recently used, and re-reads on demand."""
    a, b, c = (keys_in_bucket(bb, 1)[0] for bb in ("11", "22", "33"))
    val = {a: Cached("A", False), b: Cached("B", True), c: Cached("C", False)}
    GenerationCache(tmp_path, NS).put_many(val)
    cache = GenerationCache(tmp_path, NS, max_buckets=2)

    # `_buckets` is private; reading it here is the only way to observe the memory bound
    assert cache.get_many([a]) == {a: val[a]}
    assert cache.get_many([b]) == {b: val[b]}
    assert cache.get_many([a]) == {a: val[a]}  # a is now the most recently used
    assert cache.get_many([c]) == {c: val[c]}
    assert list(cache._buckets) == ["11", "33"]  # b was the least recently used
    assert cache.get_many([b]) == {b: val[b]}  # evicted: read from disk again
    assert list(cache._buckets) == ["33", "22"]

    # one call touching three buckets still answers all of them and keeps two
    assert cache.get_many([a, b, c]) == val
    assert len(cache._buckets) <= 2
