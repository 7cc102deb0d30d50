"""MinHash-LSH text dedup: our `minhash` + `minhash_dedup` on a Dask cluster vs datatrove's four
MinHash stages, on the same documents with the same parameters and the same hash function; and
the peak memory of our workers as the corpus grows.

The corpus is real English prose: the help texts CPython ships (`pydoc_data.topics`), cut into
sentences. A base document is 8-16 sentences drawn at random; a planted near duplicate is an
earlier base document with small edits (two words replaced, and two adjacent sentences swapped or
one sentence dropped), shingle Jaccard about 0.8-0.95. Documents are shuffled and written as jsonl
files of `--docs-per-file` records, the input of both sides:

(a) ours, as the runner runs them: a LocalCluster of `--workers` single-threaded processes on
    127.0.0.1; per file, one task (client.map) reads the jsonl into text records and runs the
    `minhash` row stage over batches of 128 (the runner's default) and writes the intermediate
    parquet; then `minhash_dedup.decide` over `curate.engine.driver.read_live` of those files with the
    task-based shuffle, its decisions written to parquet (as `curate.engine.driver.decide_global` does).
    Cluster start-up is reported apart: a run starts it once, not per stage.
(b) datatrove 0.10.1: JsonlReader + MinhashDedupSignature (`--workers` tasks), MinhashDedupBuckets
    (one task per bucket, `--workers` at a time: it needs tasks divisible by the buckets),
    MinhashDedupCluster (one task: datatrove's requirement), JsonlReader + MinhashDedupFilter
    (`--workers` tasks), each a LocalPipelineExecutor with `--workers` workers.
Both: `ngram` 5, 14 bands x 8 rows, seed 1, SHA-1 shingle hashes of 64 bits
(`HashConfig(hash_fc="sha1", precision=64)`: datatrove's default xxhash config fails under
xxhash 4.x). Our permutations are datatrove's (curate/stages/minhash.py), so the sides differ only
in text normalisation details (datatrove tokenises with spaCy) and in the machinery.

Memory: the peak resident memory of the worker processes (psutil, sampled every 50 ms) during
our whole pass, at `--memory-sizes` documents (default 5k and 50k: memory should stay about flat,
since partitions are bounded and only ids and band keys reach the global pass).

    python -m tools.bench.minhash_dedup [--docs 20000] [--memory-sizes 5000 50000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
from pydoc_data.topics import topics

# Both sides' worker processes re-import this module (as `__mp_main__`): datatrove's (forkserver)
# inside their timed steps, ours (dask's spawn) with their peak RSS measured. So the top imports
# only what costs them next to nothing: the standard library, numpy (datatrove's workers load it
# too), orjson, psutil. pyarrow (0.2 s), dask, curate (over 1 s) and datatrove (1 s, tens of MiB)
# are imported where used.

NGRAM, BANDS, ROWS, SEED = 5, 14, 8, 1
DOCS_PER_FILE = 2500
BATCH_SIZE = 128
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


def sentence_pool() -> list[str]:
    """Sentences of CPython's help texts with at least 6 words, each once, in a fixed order."""
    seen: dict[str, None] = {}
    for key in sorted(topics):
        for sentence in _SENTENCE_END.split(" ".join(topics[key].split())):
            if len(sentence.split()) >= 6:
                seen.setdefault(sentence, None)
    return list(seen)


def _edit(sentences: list[str], rng: random.Random, vocabulary: list[str]) -> list[str]:
    """A near copy: two words replaced, then two adjacent sentences swapped or one dropped."""
    out = list(sentences)
    for _ in range(2):
        i = rng.randrange(len(out))
        ws = out[i].split()
        ws[rng.randrange(len(ws))] = rng.choice(vocabulary)
        out[i] = " ".join(ws)
    i = rng.randrange(len(out) - 1)
    if rng.random() < 0.5:
        out[i], out[i + 1] = out[i + 1], out[i]
    else:
        del out[i]
    return out


def build_corpus(n: int, seed: int = 0, dup_fraction: float = 0.2) -> tuple[list[str], int]:
    """`n` documents (shuffled) and how many of them are planted near copies of another."""
    rng = random.Random(seed)
    pool = sentence_pool()
    vocabulary = sorted({w for s in pool[:500] for w in s.split()})
    bases = [rng.sample(pool, rng.randint(8, 16)) for _ in range(n - int(n * dup_fraction))]
    docs = [" ".join(b) for b in bases]
    copies = [" ".join(_edit(rng.choice(bases), rng, vocabulary)) for _ in range(n - len(bases))]
    docs += copies
    rng.shuffle(docs)
    return docs, len(copies)


def write_jsonl(docs: list[str], folder: Path, per_file: int = DOCS_PER_FILE) -> list[Path]:
    """The documents as jsonl files ({"id", "text"}) of `per_file` records."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for f, start in enumerate(range(0, len(docs), per_file)):
        path = folder / f"part-{f:05d}.jsonl"
        with path.open("wb") as out:
            for i, text in enumerate(docs[start : start + per_file], start):
                out.write(orjson.dumps({"id": f"doc{i:08d}", "text": text}) + b"\n")
        files.append(path)
    return files


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def signature_task(source: str, partition: int, target: str, batch_size: int = BATCH_SIZE) -> int:
    """One partition, as a runner task: jsonl -> text records -> `minhash` in batches -> the
    intermediate parquet (`id`, `_partition`, `drop_reason`, `minhash_bands`). Returns rows."""
    # not at the top, which datatrove's workers re-import (the note there)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.contract import record_schema  # not at the top either
    from curate.stages.minhash import COLUMN, MinhashConfig, MinhashStage

    stage = MinhashStage(MinhashConfig(ngram=NGRAM, bands=BANDS, rows=ROWS, seed=SEED))
    with open(source, "rb") as f:
        records = [orjson.loads(line) for line in f if line.strip()]
    table = pa.Table.from_pylist([{"id": f"bench:{r['id']}", "source": "bench", "text": r["text"]} for r in records],
                                 schema=record_schema("text"))
    pieces = [stage.process(table.slice(i, batch_size)) for i in range(0, table.num_rows, batch_size)]
    out = pa.concat_tables(pieces).select(["id", "drop_reason", COLUMN])
    out = out.append_column("_partition", pa.array(np.full(out.num_rows, partition, dtype=np.int32)))
    pq.write_table(out, target)
    return out.num_rows


class PeakRss:
    """Samples the resident memory of some processes in a thread: the peak of their sum and of
    the largest one."""

    def __init__(self, pids: list[int], every: float = 0.05):
        self.procs = [psutil.Process(p) for p in pids]
        self.every, self.peak_total, self.peak_one = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            sizes = []
            for proc in self.procs:
                try:
                    sizes.append(proc.memory_info().rss)
                except Exception:  # noqa: BLE001 - a process that just ended
                    pass
            if sizes:
                self.peak_total, self.peak_one = max(self.peak_total, sum(sizes)), max(self.peak_one, max(sizes))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_ours(files: list[Path], work: Path, workers: int) -> dict[str, Any]:
    """Our row stage + global stage over `files` on a fresh LocalCluster."""
    # not at the top, which datatrove's workers re-import (the note there)
    import dask
    import pyarrow.parquet as pq
    from dask.distributed import Client, LocalCluster

    from curate.engine.cluster import WORKER_CONFIG  # not at the top either
    from curate.engine.driver import read_live
    from curate.stages.minhash import COLUMN, MinhashDedup, MinhashDedupConfig

    start = time.perf_counter()
    with dask.config.set(WORKER_CONFIG):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    client = Client(cluster)
    startup = time.perf_counter() - start
    try:
        pids = list(client.run(os.getpid).values())
        inter = work / "intermediate"
        inter.mkdir(parents=True)
        targets = [str(inter / f"{p:05d}.parquet") for p in range(len(files))]
        stage = MinhashDedup(MinhashDedupConfig())
        with PeakRss(pids) as memory:
            t0 = time.perf_counter()
            futures = client.map(signature_task, [str(f) for f in files], range(len(files)), targets, pure=False)
            rows = sum(client.gather(futures))
            t1 = time.perf_counter()
            with dask.config.set({"dataframe.shuffle.method": "tasks"}):
                decisions = stage.decide(read_live(targets, [COLUMN]))
                decisions.to_parquet(str(work / "decisions"), write_index=False)
            t2 = time.perf_counter()
        dropped = pq.read_table(work / "decisions", columns=["id"]).num_rows
    finally:
        client.close()
        cluster.close()
    return {"docs": rows, "seconds": round(t2 - t0, 2), "signature_seconds": round(t1 - t0, 2),
            "dedup_seconds": round(t2 - t1, 2), "cluster_start_seconds": round(startup, 2),
            "duplicates": dropped, "docs_per_s": round(rows / (t2 - t0), 1),
            "peak_rss_workers_mib": round(memory.peak_total / 2**20, 1),
            "peak_rss_one_worker_mib": round(memory.peak_one / 2**20, 1), "summary": stage.summary()}


# ---------------------------------------------------------------------------------------------
# datatrove
# ---------------------------------------------------------------------------------------------


def run_datatrove(folder: Path, docs: int, work: Path, workers: int) -> dict[str, Any]:
    """datatrove's four MinHash stages over the jsonl files in `folder`."""
    # the peer: not at the top, which our dask workers re-import (the note there)
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.utils.hashing import HashConfig

    config = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=SEED,
                           hash_config=HashConfig(hash_fc="sha1", precision=64))
    sigs, buckets, remove, logs = (str(work / d) for d in ("sigs", "buckets", "remove", "logs"))
    steps = {
        "signature": LocalPipelineExecutor(
            [JsonlReader(str(folder)), MinhashDedupSignature(output_folder=sigs, config=config)],
            tasks=workers, workers=workers, logging_dir=f"{logs}/1"),
        "buckets": LocalPipelineExecutor(
            [MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config)],
            tasks=BANDS, workers=workers, logging_dir=f"{logs}/2"),
        "cluster": LocalPipelineExecutor(
            [MinhashDedupCluster(input_folder=buckets, output_folder=remove, config=config)],
            tasks=1, workers=1, logging_dir=f"{logs}/3"),
        "filter": LocalPipelineExecutor(
            [JsonlReader(str(folder)), MinhashDedupFilter(input_folder=remove)],
            tasks=workers, workers=workers, logging_dir=f"{logs}/4"),
    }
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    for name, executor in steps.items():
        start = time.perf_counter()
        executor.run()
        seconds[name] = round(time.perf_counter() - start, 2)
    total = time.perf_counter() - t0
    dropped = sum(p.stat().st_size for p in Path(remove).glob("*.remove")) // 4
    return {"docs": docs, "seconds": round(total, 2), "step_seconds": seconds, "duplicates": int(dropped),
            "docs_per_s": round(docs / total, 1)}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def run(docs: int, memory_sizes: list[int], workers: int, per_file: int = DOCS_PER_FILE) -> dict[str, Any]:
    import dask  # not at the top, which datatrove's workers re-import (the note there)

    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.python_implementation()} "
                   f"{platform.python_version()}, dask {dask.__version__}, datatrove {version('datatrove')}",
        "settings": {"workers": workers, "ngram": NGRAM, "bands": BANDS, "rows": ROWS, "seed": SEED,
                     "hash": "sha1, 64-bit", "docs_per_file": per_file},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus, planted = build_corpus(docs)
        files = write_jsonl(corpus, root / "input", per_file)
        results["corpus"] = {"docs": docs, "planted_near_copies": planted, "files": len(files),
                             "words": sum(len(d.split()) for d in corpus)}
        results["ours"] = run_ours(files, root / "ours", workers)
        results["datatrove"] = run_datatrove(root / "input", docs, root / "datatrove", workers)
        results["speedup"] = round(results["ours"]["docs_per_s"] / results["datatrove"]["docs_per_s"], 2)
        results["memory"] = {}
        for n in memory_sizes:
            corpus_n, _ = build_corpus(n, seed=1)
            files_n = write_jsonl(corpus_n, root / f"mem{n}" / "input", per_file)
            r = run_ours(files_n, root / f"mem{n}" / "ours", workers)
            results["memory"][n] = {k: r[k] for k in ("seconds", "peak_rss_workers_mib", "peak_rss_one_worker_mib")}
    if len(memory_sizes) >= 2:
        lo, hi = min(memory_sizes), max(memory_sizes)
        peak = {n: results["memory"][n]["peak_rss_workers_mib"] for n in (lo, hi)}
        results["memory_ratio"] = {"docs": hi / lo, "peak_rss": round(peak[hi] / peak[lo], 2)}
    return results


def print_table(results: dict[str, Any]) -> None:
    s, c = results["settings"], results["corpus"]
    print(f"machine: {results['machine']}")
    print(f"settings: {s['workers']} workers, {s['ngram']}-grams, {s['bands']} bands x {s['rows']} rows, seed "
          f"{s['seed']}, {s['hash']}")
    print(f"corpus: {c['docs']} docs ({c['words']} words, {c['files']} jsonl files), "
          f"{c['planted_near_copies']} planted near copies")
    o, d = results["ours"], results["datatrove"]
    print(f"{'':>10} {'seconds':>8} {'docs/s':>9} {'duplicates':>11}  detail")
    print(f"{'ours':>10} {o['seconds']:>8.2f} {o['docs_per_s']:>9.1f} {o['duplicates']:>11}  signature "
          f"{o['signature_seconds']} s, dedup {o['dedup_seconds']} s (+ cluster start {o['cluster_start_seconds']} s)")
    steps = ", ".join(f"{k} {v} s" for k, v in d["step_seconds"].items())
    print(f"{'datatrove':>10} {d['seconds']:>8.2f} {d['docs_per_s']:>9.1f} {d['duplicates']:>11}  {steps}")
    print(f"speedup: {results['speedup']}x docs/s")
    for n, m in results["memory"].items():
        print(f"memory at {n} docs: peak RSS of the workers {m['peak_rss_workers_mib']} MiB "
              f"(largest worker {m['peak_rss_one_worker_mib']} MiB), {m['seconds']} s")
    if "memory_ratio" in results:
        r = results["memory_ratio"]
        print(f"memory ratio: {r['docs']:g}x docs -> {r['peak_rss']}x peak RSS")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[5_000, 50_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--docs-per-file", type=int, default=DOCS_PER_FILE)
    args = parser.parse_args(argv)
    print_table(run(args.docs, args.memory_sizes, args.workers, args.docs_per_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
