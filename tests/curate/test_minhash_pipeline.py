"""MinHash-LSH dedup in real runs (LocalCluster, two processes): a jsonl text corpus of real prose
(CPython's help texts) holding distinct documents, near copies of some of them (a word replaced,
two sentences swapped), an exact copy, a re-typed copy (case, spacing and punctuation changed),
short texts and an empty one, over many small partitions. The copies are dropped by
minhash_dedup naming the kept original, whatever the partitioning; every input is one ledger
row; the output verifies."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from curate.contract import read_ledger
from curate.recipe import parse_recipe
from curate.stages.minhash import shingles
from tools.bench.minhash_dedup import sentence_pool
from tools.verify import verify

BASES = 14


def _jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a, 5), shingles(b, 5)
    return len(sa & sb) / len(sa | sb)


def corpus() -> tuple[list[str], dict[int, int]]:
    """The texts (record i is line i) and, for each planted copy, the record it copies."""
    rng = random.Random(5)
    pool = sentence_pool()
    bases = [rng.sample(pool, 16) for _ in range(BASES)]
    texts = [" ".join(b) for b in bases]
    copies: dict[int, int] = {}

    def plant(text: str, original: int) -> None:
        copies[len(texts)] = original
        texts.append(text)

    for original in (0, 3, 7):  # near copies: one word replaced, two sentences swapped
        s = list(bases[original])
        words = s[4].split()
        words[len(words) // 2] = "meanwhile"
        s[4] = " ".join(words)
        s[1], s[2] = s[2], s[1]
        plant(" ".join(s), original)
    plant(texts[5], 5)  # an exact copy
    plant("  ".join(x.upper().replace(",", " ;") for x in bases[9]), 9)  # re-typed
    plant(texts[BASES], BASES)  # a copy of the first near copy: one group with its original
    texts += ["Short note here.", "", "short   NOTE, here!"]
    copies[len(texts) - 1] = len(texts) - 3
    return texts, copies


def _recipe(corpus_file: Path, out: Path, per_partition: int):
    return parse_recipe({
        "name": f"minhash-e2e-{per_partition}",
        "sources": [{"kind": "text_corpus", "name": "c", "path": str(corpus_file),
                     "records_per_partition": per_partition}],
        "stages": [{"kind": "minhash"}, {"kind": "minhash_dedup"}],
        "output": {"path": str(out), "shard_max_samples": 6},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
        "execution": {"batch_size": 4},
    }, "<minhash test recipe>")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shared_cluster) -> dict:
    root = tmp_path_factory.mktemp("minhash-run")
    texts, copies = corpus()
    for copy, original in copies.items():
        if texts[copy] and copy != len(texts) - 1:
            assert _jaccard(texts[copy], texts[original]) > 0.85, copy  # P(candidate) > 0.998
    corpus_file = root / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    outs = {}
    for per_partition in (3, 40):
        out = root / f"out{per_partition}"
        outs[per_partition] = (out, shared_cluster.run(_recipe(corpus_file, out, per_partition)))
    return {"texts": texts, "copies": copies, "outs": outs}


def _ledger(out: Path) -> dict[int, dict]:
    return {int(r["id"].rsplit("#", 1)[1]): r for r in read_ledger(out).to_pylist()}


def test_every_input_is_one_ledger_row_and_the_output_verifies(runs, output_checks):
    for out, manifest in runs["outs"].values():
        output_checks.check_ledger_invariant(out)
        assert manifest["counts"]["inputs"] == len(runs["texts"])
        report = verify(out)
        assert report.ok, report


def test_copies_are_dropped_naming_the_kept_original_across_partitions(runs):
    texts, copies = runs["texts"], runs["copies"]
    out, manifest = runs["outs"][3]
    ledger = _ledger(out)
    dropped = {i: (r["stage"], r["drop_reason"]) for i, r in ledger.items() if r["outcome"] == "dropped"}
    empty = texts.index("")
    assert len(dropped) == len(copies) + 1 and dropped.pop(empty) == ("source", "no_text")
    assert set(dropped.values()) == {("minhash_dedup", "duplicate")}
    groups: dict[int, list[int]] = {}
    for copy, original in copies.items():
        root = copies.get(original, original)
        groups.setdefault(root, [root]).append(copy)
    ids = {i: r["id"] for i, r in ledger.items()}
    for members in groups.values():
        kept = min(members, key=lambda i: ids[i])  # ids compare as strings: "c:...#15" < "c:...#3"
        assert ledger[kept]["outcome"] == "kept"
        for m in members:
            if m != kept:
                assert ledger[m]["drop_detail"].startswith(f"near duplicate of {ids[kept]} (MinHash-LSH"), m
    summary = manifest["global"]["minhash_dedup"]["summary"]
    assert summary["duplicates"] == len(copies) and summary["groups"] == 6


def test_decisions_do_not_depend_on_the_partitioning(runs):
    (small, _), (large, _) = runs["outs"][3], runs["outs"][40]
    def outcome(out: Path) -> dict[int, tuple]:
        return {i: (r["outcome"], r["drop_reason"], r["drop_detail"]) for i, r in _ledger(out).items()}

    assert outcome(small) == outcome(large)




def test_the_global_pass_computes_on_the_cluster_it_was_given(runs, shared_cluster):
    """The session's client is not the process's default one: the LSH pass's dask dataframes
    (read from the segments' parquet) were computed on its scheduler, not on a local one."""
    prefixes = shared_cluster.client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert any(p.startswith("read_parquet") for p in prefixes), sorted(prefixes)
