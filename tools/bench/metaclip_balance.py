"""metaclip_balance against MetaCLIP's reference matcher, and the balancing pass at scale.

1. Matching per core: captions matched against a `--entries`-entry metadata list (500,000 as
   MetaCLIP's) by our matcher (curate.stages.metaclip.match) and by MetaCLIP's published matcher
   (metaclip/substr_matching.py: the `spacing` chain of str.replace, an Aho-Corasick automaton of
   " entry " keys whose values are (index, key) tuples, `iter` into a set), written here from its
   published logic; both in this process on the same captions, after each built its automaton
   (build times reported apart). The original loop matcher (`entry in text` for every entry) runs
   on a small sample for scale. The matched sets must agree on every caption.
2. Balancing at `--rows` rows: parquet partitions of (id, _partition, caption) read as the runner
   reads a global stage's input, `MetaclipBalance.decide` on a LocalCluster of `--workers`
   single-threaded processes, its decisions written as the runner writes them; wall seconds and
   the peak resident memory of the workers (psutil, every 50 ms).

The metadata: the words of open_clip's BPE vocabulary (a file that ships inside open_clip_torch),
then ImageNet's class names, then word bigrams, deterministic, until `--entries`. Captions: 4-16
words drawn Zipf-like from the same vocabulary (a head of common words, a long tail), so captions
match many entries, a few very often, as alt-texts do.

    python -m tools.bench.metaclip_balance [--entries 500000] [--captions 100000] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ahocorasick
import dask
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dask.distributed import Client, LocalCluster

from curate.engine.cluster import WORKER_CONFIG
from curate.engine.driver import read_live
from curate.stages.metaclip import MetaclipBalance, MetaclipBalanceConfig, match, matcher
from tools.bench.minhash_dedup import PeakRss

ROWS_PER_PARTITION = 50_000


def vocabulary() -> list[str]:
    """Whole words of open_clip's BPE vocabulary (its merges that end a word), in file order."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    words = []
    for line in gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1:]:
        merged = line.replace(" ", "")
        if merged.endswith("</w>") and merged[:-4].isalpha():
            words.append(merged[:-4])
    return list(dict.fromkeys(words))


def build_metadata(n: int, words: list[str]) -> list[str]:
    """n distinct entries: the words, then bigrams of them (deterministic)."""
    entries = list(dict.fromkeys(words))[:n]
    rng = np.random.default_rng(1)
    seen = set(entries)
    while len(entries) < n:
        a, b = rng.integers(0, min(len(words), 20_000), size=2)
        bigram = f"{words[a]} {words[b]}"
        if bigram not in seen:
            seen.add(bigram)
            entries.append(bigram)
    return entries


def build_captions(n: int, words: list[str], seed: int = 0) -> list[str]:
    """n captions of 4-16 words, Zipf-like over `words`, with some punctuation."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.3, size=n * 16), len(words)) - 1
    lengths = rng.integers(4, 17, size=n)
    out, at = [], 0
    for length in lengths:
        chosen = [words[r] for r in ranks[at:at + length]]
        at += length
        if rng.random() < 0.3:
            chosen[-1] += rng.choice([".", ",", "!", ":"])
        out.append(" ".join(chosen))
    return out


# ---------------------------------------------------------------------------------------------
# MetaCLIP's published matcher (its logic, as metaclip/substr_matching.py publishes it)
# ---------------------------------------------------------------------------------------------


def reference_spacing(text: str) -> str:
    spaced = f" {text} "
    for punct in [",", ".", ";", ":", "?", "!", "`"]:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in ["\t", "\n", "\r"]:
        spaced = spaced.replace(char, " ")
    return spaced


def reference_automaton(metadata: list[str]) -> Any:
    automaton = ahocorasick.Automaton()
    for idx, key in enumerate(f" {entry} " for entry in metadata):
        automaton.add_word(key, (idx, key))
    automaton.make_automaton()
    return automaton


def reference_matching(automaton: Any, text: str) -> list[int]:
    found = set()
    for _, (entry_id, _) in automaton.iter(reference_spacing(text)):
        found.add(entry_id)
    return list(found)


def loop_matching(spaced_metadata: list[str], text: str) -> list[int]:
    """MetaCLIP's first published matcher: every entry tried on every text."""
    text = reference_spacing(text)
    return [i for i, entry in enumerate(spaced_metadata) if entry in text]


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def bench_matching(metadata: list[str], captions: list[str], path: Path, loop_sample: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ours_automaton = matcher(str(path))
    t1 = time.perf_counter()
    theirs_automaton = reference_automaton(metadata)
    t2 = time.perf_counter()
    ours = [match(ours_automaton, c) for c in captions]
    t3 = time.perf_counter()
    theirs = [reference_matching(theirs_automaton, c) for c in captions]
    t4 = time.perf_counter()
    differ = sum(set(a) != set(b) for a, b in zip(ours, theirs))
    spaced = [f" {e} " for e in metadata]
    sample = captions[:loop_sample]
    t5 = time.perf_counter()
    looped = [loop_matching(spaced, c) for c in sample]
    t6 = time.perf_counter()
    differ += sum(set(a) != set(b) for a, b in zip(ours, looped))
    matches = sum(len(m) for m in ours)
    return {
        "captions": len(captions), "entries": len(metadata), "matches_per_caption": round(matches / len(captions), 2),
        "captions_differing": differ,
        "ours": {"build_s": round(t1 - t0, 2), "match_s": round(t3 - t2, 3),
                 "captions_per_s": round(len(captions) / (t3 - t2))},
        "reference": {"build_s": round(t2 - t1, 2), "match_s": round(t4 - t3, 3),
                      "captions_per_s": round(len(captions) / (t4 - t3))},
        "reference_loop": {"captions": len(sample), "match_s": round(t6 - t5, 3),
                           "captions_per_s": round(len(sample) / (t6 - t5), 2)},
        "speedup": round((t4 - t3) / (t3 - t2), 2),
    }


def write_pool(captions: list[str], rows: int, folder: Path) -> list[str]:
    """`rows` rows cycling through `captions`, as parquet partitions of ROWS_PER_PARTITION."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for p, start in enumerate(range(0, rows, ROWS_PER_PARTITION)):
        stop = min(rows, start + ROWS_PER_PARTITION)
        table = pa.table({
            "id": pa.array([f"pool:{i:09d}" for i in range(start, stop)]),
            "_partition": pa.array(np.full(stop - start, p, dtype=np.int32)),
            "drop_reason": pa.nulls(stop - start, pa.string()),
            "caption": pa.array([captions[i % len(captions)] for i in range(start, stop)]),
        })
        files.append(str(folder / f"{p:05d}.parquet"))
        pq.write_table(table, files[-1])
    return files


def bench_balance(path: Path, captions: list[str], rows: int, t: int, workers: int, work: Path,
                  client: Client | None = None) -> dict[str, Any]:
    """The balancing pass over `rows` rows on a fresh LocalCluster of `workers` processes, or on
    `client`'s cluster (a test's shared one)."""
    files = write_pool(captions, rows, work / "pool")
    cluster = None
    if client is None:
        with dask.config.set(WORKER_CONFIG):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None)
    own = client or Client(cluster)
    try:
        pids = list(own.run(os.getpid).values())
        stage = MetaclipBalance(MetaclipBalanceConfig(metadata=str(path), t=t))
        with own.as_current(), PeakRss(pids) as memory, dask.config.set({"dataframe.shuffle.method": "tasks"}):
            t0 = time.perf_counter()
            decisions = stage.decide(read_live(files, ["caption"]))
            decisions.to_parquet(str(work / "decisions"), write_index=False)
            seconds = time.perf_counter() - t0
        dropped = pq.read_table(work / "decisions", columns=["drop_reason"]).column("drop_reason").to_pylist()
    finally:
        if cluster is not None:
            own.close()
            cluster.close()
    summary = stage.summary()
    other = summary["lists"]["other"]
    workers = len(pids)
    return {"rows": rows, "partitions": len(files), "t": t, "workers": workers, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds), "dropped": len(dropped),
            "drop_reasons": {r: dropped.count(r) for r in sorted(set(dropped))},
            "kept": summary["kept"], "entries_matched": other["entries_matched"],
            "entries_over_t": other["entries_over_t"], "head": other["head"][:5],
            "peak_rss_workers_mib": round(memory.peak_total / 2**20, 1),
            "peak_rss_one_worker_mib": round(memory.peak_one / 2**20, 1)}


def run(entries: int, captions: int, rows: int, t: int, workers: int, loop_sample: int,
        client: Client | None = None) -> dict[str, Any]:
    words = vocabulary()
    metadata = build_metadata(entries, words)
    texts = build_captions(captions, words)
    with tempfile.TemporaryDirectory(prefix="mm1-metaclip-bench-") as tmp:
        path = Path(tmp) / "metadata.json"
        path.write_text(json.dumps(metadata))
        report: dict[str, Any] = {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": sys.version.split()[0], "pyahocorasick": ahocorasick.__version__
                        if hasattr(ahocorasick, "__version__") else "?"},
            "matching": bench_matching(metadata, texts, path, loop_sample),
        }
        if rows:
            report["balance"] = bench_balance(path, texts, rows, t, workers, Path(tmp), client)
    return report


def print_table(report: dict[str, Any]) -> None:
    m = report["matching"]
    print(f"matching {m['captions']:,} captions against {m['entries']:,} entries "
          f"({m['matches_per_caption']} matches per caption; {m['captions_differing']} captions differ)")
    for side in ("ours", "reference"):
        r = m[side]
        print(f"  {side:<10} {r['captions_per_s']:>10,} captions/s per core   (automaton built in {r['build_s']} s)")
    loop = m["reference_loop"]
    print(f"  {'loop':<10} {loop['captions_per_s']:>10,} captions/s per core   ({loop['captions']} captions)")
    print(f"speedup: {m['speedup']}x the reference matcher")
    if "balance" in report:
        b = report["balance"]
        print(f"balancing {b['rows']:,} rows ({b['partitions']} partitions, t {b['t']:,}) on {b['workers']} workers: "
              f"{b['seconds']} s, {b['rows_per_s']:,} rows/s, kept {b['kept']:,}, drops {b['drop_reasons']}")
        print(f"  peak RSS of the workers {b['peak_rss_workers_mib']} MiB (largest {b['peak_rss_one_worker_mib']} MiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--captions", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="balancing pass size (0: skip it)")
    parser.add_argument("--t", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loop-sample", type=int, default=20)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args.entries, args.captions, args.rows, args.t, args.workers, args.loop_sample)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["matching"]["captions_differing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
