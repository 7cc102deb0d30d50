"""The `minhash` row stage and `minhash_dedup` global stage (curate/stages/minhash.py).

Unit checks of the signature (normalisation, shingles, determinism across processes, equality with
datatrove's sha1 signature), and the statistical must-show: on isolated pairs of documents whose
shingle sets have a known Jaccard similarity s, the fraction of pairs that `minhash_dedup` (its
real `decide`, on a local Dask cluster of two processes) reduces to one copy matches the LSH curve
1 - (1 - s**r)**b within 0.03."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from curate.contract import record_schema
from curate.engine.driver import PARTITION_COLUMN, read_live
from curate.stages.minhash import (
    COLUMN,
    MinhashConfig,
    MinhashDedup,
    MinhashDedupConfig,
    MinhashStage,
    normalise,
    sha1_64,
    shingles,
    signatures,
    text_band_keys,
)

REPO = Path(__file__).resolve().parents[3]
PROSE = ("The committee met on Tuesday to discuss the budget. After a long debate, the members agreed "
         "that the library would stay open on weekends, and that the new reading room would be "
         "finished before the winter.")


def text_table(texts: list[str | None], dropped: set[int] = frozenset()) -> pa.Table:
    rows = [{"id": f"t:{i:05d}", "source": "t", "text": t,
             **({"drop_stage": "x", "drop_reason": "earlier", "drop_detail": ""} if i in dropped else {})}
            for i, t in enumerate(texts)]
    return pa.Table.from_pylist(rows, schema=record_schema("text"))


def doc_table(segments: list[str]) -> pa.Table:
    rows = [{"id": f"d:{i}", "source": "d", "segments": s, "html": b"<html>" * 10} for i, s in enumerate(segments)]
    return pa.Table.from_pylist(rows, schema=record_schema("doc"))


# ---------------------------------------------------------------------------------------------
# Normalisation and shingles
# ---------------------------------------------------------------------------------------------


def test_normalisation_ignores_case_punctuation_spacing_diacritics_and_number_values():
    assert normalise("Café  au-lait,\n\tCRÈME brûlée!") == ["cafe", "au", "lait", "creme", "brulee"]
    assert normalise("Paid $3.50 on 12 May, 2024.") == ["paid", "0", "on", "0", "may", "0"]
    assert normalise("Paid $7,25 on 1 May, 1999") == normalise("paid 9.99 ON 30 may 2001 ...")
    assert normalise("   ...  ") == []


def test_shingles_are_distinct_word_ngrams_and_a_short_text_is_one_shingle():
    assert shingles("a b c d e f", 5) == {"a b c d e", "b c d e f"}
    assert shingles("a b a b a b a b", 3) == {"a b a", "b a b"}
    assert shingles("Just three words.", 5) == {"just three words"}
    assert shingles("", 5) == set() and shingles("!!!", 5) == set()


def test_sha1_64_is_datatroves_sha1_hash64():
    from datatrove.utils.hashes.sha1 import sha1_hash64

    items = ["a b c d e", "naïve café", ""]
    assert sha1_64(items).tolist() == [sha1_hash64(s) for s in items]


def test_signature_equals_datatroves_sha1_signature():
    """Same shingles, seed and sizes: every min-hash value is datatrove's (so the benchmark
    compares two implementations of one function)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig as DatatroveConfig
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig

    text = "the quick brown fox jumps over the lazy dog while the old cat sleeps in the warm sun all day"
    for seed, buckets, per_bucket in ((1, 14, 8), (7, 5, 6)):
        config = DatatroveConfig(n_grams=5, num_buckets=buckets, hashes_per_bucket=per_bucket, seed=seed,
                                 hash_config=HashConfig(hash_fc="sha1", precision=64))
        theirs = MinhashDedupSignature(output_folder="unused-output-folder", config=config)
        expected = np.concatenate(theirs.get_signature(theirs.get_shingles(text))).astype(np.uint64)
        ours = signatures([sha1_64(sorted(shingles(text, 5)))], buckets * per_bucket, seed)[0]
        assert ours.tolist() == expected.tolist()


def test_signatures_do_not_depend_on_chunking_or_batch_company(monkeypatch):
    from curate.stages import minhash

    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 2**63, size=int(n), dtype=np.int64).view(np.uint64) for n in (1, 700, 5, 3000, 2)]
    whole = signatures(docs, 40, 5)
    monkeypatch.setattr(minhash, "CHUNK_VALUES", 40 * 37)  # chunks cut through documents
    assert (signatures(docs, 40, 5) == whole).all()
    assert (signatures(docs[3:4], 40, 5)[0] == whole[3]).all()


# ---------------------------------------------------------------------------------------------
# The row stage
# ---------------------------------------------------------------------------------------------


def test_identical_texts_give_identical_bands_and_edits_inside_noise_do_not_matter():
    out = MinhashStage(MinhashConfig()).process(text_table([PROSE, PROSE.upper().replace(",", " ;"), PROSE + " x"]))
    bands = out.column(COLUMN).to_pylist()
    assert len(bands[0]) == 14 and all(isinstance(v, int) for v in bands[0])
    assert bands[0] == bands[1]
    assert bands[0] != bands[2]


def test_empty_texts_and_dropped_rows_get_no_signature():
    out = MinhashStage(MinhashConfig()).process(text_table([PROSE, "", None, " -- ", PROSE], dropped={4}))
    assert out.column(COLUMN).to_pylist()[1:] == [None, None, None, None]
    assert out.column("drop_reason").to_pylist() == [None, None, None, None, "earlier"]


def test_docs_are_hashed_on_their_text_segments_and_a_broken_record_is_a_drop():
    segments = json.dumps([{"type": "text", "text": PROSE}, {"type": "image", "url": "https://example.com/a.jpg"}])
    table = doc_table([segments, "{not json", json.dumps([{"type": "image", "url": "u"}])])
    out = MinhashStage(MinhashConfig()).process(table)
    bands = out.column(COLUMN).to_pylist()
    assert bands[0] == MinhashStage(MinhashConfig()).process(text_table([PROSE])).column(COLUMN).to_pylist()[0]
    assert bands[1:] == [None, None]
    assert out.column("drop_reason").to_pylist() == [None, "stage_error", None]
    assert out.column("drop_stage").to_pylist()[1] == "minhash"
    assert out.column("html").to_pylist()[0] == b"<html>" * 10  # payload columns pass through


def test_band_keys_are_the_same_in_another_process():
    texts = [PROSE, "short one", "Ünïcödé text with 42 numbers, and more words to make shingles."]
    here = text_band_keys(texts, 5, 14, 8, 11)
    code = ("import json, sys; from curate.stages.minhash import text_band_keys; "
            "print(json.dumps(text_band_keys(json.loads(sys.stdin.read()), 5, 14, 8, 11)))")
    there = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True,
                           text=True, check=True, env={"PYTHONHASHSEED": "random"}, cwd=REPO).stdout
    assert json.loads(there) == here


def test_the_seed_and_the_sizes_change_the_keys():
    base = text_band_keys([PROSE], 5, 14, 8, 1)[0]
    assert text_band_keys([PROSE], 5, 14, 8, 2)[0] != base
    assert len(text_band_keys([PROSE], 5, 20, 5, 1)[0]) == 20
    with pytest.raises(ValidationError):
        MinhashConfig(bands=0)


# ---------------------------------------------------------------------------------------------
# The global stage: the LSH curve, measured
# ---------------------------------------------------------------------------------------------

BANDS, ROWS, NGRAM = 5, 6, 5
PAIRS_PER_S = 2500
DOC_WORDS = 60  # the curve depends on each pair's exact Jaccard, not on the length: hashing is per word


def _word(k: int) -> str:
    """A letters-only word unique to k (digits would all normalise to "0")."""
    letters = []
    while True:
        k, r = divmod(k, 26)
        letters.append(chr(97 + r))
        if not k:
            return "q" + "".join(letters)


def _shingle_jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a, NGRAM), shingles(b, NGRAM)
    return len(sa & sb) / len(sa | sb)


def planted_pairs(targets: list[float], per_s: int) -> tuple[list[str], list[float]]:
    """Pairs of texts over their own vocabulary (two pairs never share a word, so never a
    shingle): B is A with its tail replaced by fresh words, as many as leave a shingle Jaccard
    near the target. Returns the texts (pair i = texts 2i, 2i+1) and the exact Jaccard of each."""
    texts, jaccards, k = [], [], 0
    total = DOC_WORDS - NGRAM + 1
    for s in targets:
        shared = round(2 * total * s / (1 + s))  # shingles of A kept in B
        keep = shared + NGRAM - 1  # words of A's head that B keeps
        for _ in range(per_s):
            a = [_word(k + i) for i in range(DOC_WORDS)]
            b = a[:keep] + [_word(k + DOC_WORDS + i) for i in range(DOC_WORDS - keep)]
            k += 2 * DOC_WORDS
            texts += [" ".join(a), " ".join(b)]
            jaccards.append(_shingle_jaccard(texts[-2], texts[-1]))
    return texts, jaccards


@pytest.fixture(scope="module")
def local_cluster(shared_cluster):
    """The session's LocalCluster (the runner's worker settings), through this module's own
    client: the default one while the module runs, so the passes' `.compute()` run there."""
    from dask.distributed import Client

    client = Client(shared_cluster.cluster)
    yield client
    client.close()


def _live(table: pa.Table, npartitions: int, folder: Path):
    """`table` written as `npartitions` intermediate files and read back as the runner reads a
    global stage's input (`curate.engine.driver.read_live`)."""
    folder.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, npartitions + 1).astype(int)
    files = []
    for p in range(npartitions):
        part = table.slice(bounds[p], bounds[p + 1] - bounds[p])
        part = part.append_column(PARTITION_COLUMN, pa.array(np.full(part.num_rows, p, dtype=np.int32)))
        files.append(str(folder / f"{p:05d}.parquet"))
        pq.write_table(part, files[-1])
    return read_live(files, [COLUMN])


def test_the_fraction_of_pairs_deduplicated_follows_the_lsh_curve(local_cluster, tmp_path):
    import dask

    targets = [0.5, 0.6, 0.7, 0.8, 0.9]
    texts, jaccards = planted_pairs(targets, PAIRS_PER_S)
    table = text_table(texts)
    stage = MinhashStage(MinhashConfig(ngram=NGRAM, bands=BANDS, rows=ROWS, seed=2024))
    hashed = pa.concat_tables(stage.process(table.slice(i, 1000)) for i in range(0, len(texts), 1000))
    # rows in random order over 8 partitions: a pair's copies usually sit in different partitions
    order = np.random.default_rng(0).permutation(len(texts))
    dedup = MinhashDedup(MinhashDedupConfig())
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        drops = dedup.decide(_live(hashed.take(order), 8, tmp_path / "live")).compute()
    dropped = set(drops["id"])
    assert set(drops["drop_reason"]) == {"duplicate"}
    ids = table.column("id").to_pylist()
    found = np.array([(ids[2 * i] in dropped) or (ids[2 * i + 1] in dropped) for i in range(len(jaccards))])
    assert not any(ids[2 * i] in dropped and ids[2 * i + 1] in dropped for i in range(len(jaccards)))
    for i in np.flatnonzero(found)[:20]:  # the kept copy is the smaller id, named in the detail
        row = drops[drops["id"] == ids[2 * i + 1]]
        assert row["drop_detail"].iloc[0].startswith(f"near duplicate of {ids[2 * i]} ")
    j = np.array(jaccards)
    report = []
    for t, s in enumerate(targets):
        block = slice(t * PAIRS_PER_S, (t + 1) * PAIRS_PER_S)
        expected = float(np.mean(1 - (1 - j[block] ** ROWS) ** BANDS))
        measured = float(found[block].mean())
        report.append((s, round(float(j[block].mean()), 3), round(expected, 3), round(measured, 3)))
        assert abs(measured - expected) <= 0.03, report
    assert 0.15 < report[1][2] < 0.3 and 0.35 < report[2][2] < 0.6  # mid-range: informative
    summary = dedup.summary()
    assert summary["groups"] == summary["duplicates"] == int(found.sum())
    assert summary["grouped_rows"] == 2 * int(found.sum())


def test_decisions_do_not_depend_on_partitioning_and_cross_partitions(local_cluster, tmp_path):
    import dask

    texts = [PROSE, PROSE.replace("Tuesday", "Wednesday"), "a different text about other things entirely, "
             "with enough words to make several shingles of its own", PROSE.upper(), "", "another one here"]
    hashed = MinhashStage(MinhashConfig(bands=20, rows=4)).process(text_table(texts * 3))
    results = []
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        for n in (1, 3, 7):
            drops = MinhashDedup(MinhashDedupConfig()).decide(_live(hashed, n, tmp_path / f"n{n}")).compute()
            results.append(sorted(zip(drops["id"], drops["drop_detail"])))
    assert results[0] == results[1] == results[2]
    dropped = {i for i, _ in results[0]}
    assert {i for i, d in results[0] if "of t:00000 " in d} == {f"t:{i:05d}" for i in (1, 3, 6, 7, 9, 12, 13, 15)}
    # the PROSE family (0, 1, 3 and their repeats) and the repeats of 2 and 5 go; empty texts stay
    assert dropped == {f"t:{i:05d}" for i in (1, 3, 6, 7, 9, 12, 13, 15, 8, 14, 11, 17)}


def test_no_candidates_and_no_signatures_drop_nothing(local_cluster, tmp_path):
    import dask

    distinct = ["one text about apples and pears in the old orchard", "another about ships leaving the harbour at dawn"]
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        for name, texts in (("distinct", distinct), ("empty", ["", "  ", None])):
            hashed = MinhashStage(MinhashConfig()).process(text_table(texts))
            stage = MinhashDedup(MinhashDedupConfig())
            assert len(stage.decide(_live(hashed, 2, tmp_path / name)).compute()) == 0
            assert stage.summary()["candidate_pairs"] == stage.summary()["duplicates"] == 0
