"""datatrove's quality filters as our stages next to datatrove's own pipeline, on the same jsonl
file, in one run.

- ours: the jsonl read into Arrow batches of `text` records (`--batch-size` rows), each batch
  through `GopherQuality`, `GopherRepetition`, `FineWebQuality` and `C4Quality` via
  `process(table)` as `curate.engine.steps.run_segment` runs row stages, and written to parquet (zstd),
  one process;
- datatrove: `LocalPipelineExecutor(pipeline=[JsonlReader, GopherQualityFilter,
  GopherRepetitionFilter, FineWebQualityFilter, C4QualityFilter, JsonlWriter], tasks=1,
  workers=1)` with datatrove's default thresholds, its writer uncompressed (ours writes zstd).

C4 runs last in both: datatrove's C4 filter deletes lines from the documents it keeps, and a
filter after it would judge the shortened text, while our stages never rewrite a row. With C4
last, both pipelines make their decisions on the same texts, and the report checks that they keep
the same documents (ids compared, not only counts).

The input is real English prose (paragraphs of CPython's own help texts, `pydoc_data.topics`,
shuffled into documents of 3-15 paragraphs) mixed with junk of the kinds web text has: repeated
lines, menus of short lines, random character runs, lorem ipsum, code, one-liners.

Each side runs in a fresh process (spawned: no warm caches inherited), `--repeat` times,
alternating which goes first; medians are reported. Tokenizer loading (spaCy's blank pipeline) is
done before the clock starts on both sides.

    python -m tools.bench.text_filters [--docs 4000] [--batch-size 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import string
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import (
    C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.text import split_into_words
from pydoc_data.topics import topics

from curate.contract import record_schema
from curate.stages import STAGES

STAGE_ORDER = ("gopher_quality", "gopher_repetition", "fineweb_quality", "c4_quality")


def topic_blocks() -> tuple[list[str], list[str]]:
    """(prose paragraphs, code blocks) of CPython's help topics; prose lines are unwrapped, as
    text extracted from a web page holds a paragraph on one line."""
    prose, code = [], []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if not block.strip():
                continue
            if block.startswith(" "):
                code.append(block)
            elif len(lines) > 1 and set(lines[1].strip()) <= set("*=-^~"):
                continue  # a heading and its underline
            else:
                # pydoc marks literals with "quotes" and emphasis with *stars*; a rendered page
                # shows neither, so neither reaches the text extracted from it
                text = " ".join(line.strip() for line in lines).replace('"', "").replace("*", "")
                if len(text) >= 80 and text.endswith((".", ":")):
                    prose.append(text)
    return prose, code


def _junk(rng: random.Random, prose: list[str], code: list[str]) -> str:
    kind = rng.randrange(6)
    if kind == 0:  # one line, over and over (spam, boilerplate)
        line = rng.choice(["Click here to buy cheap watches now!", "Subscribe to our newsletter today.",
                           "Best prices guaranteed, order online and save big."]) + f" ({rng.randrange(1000)})"
        return "\n".join([line] * rng.randrange(10, 60))
    if kind == 1:  # a navigation menu: short lines, no sentences
        items = ["Home", "About us", "Contact", "Products", "Blog", "Careers", "Login", "Cart", "Help", "FAQ"]
        return "\n".join(rng.choice(items) for _ in range(rng.randrange(8, 40)))
    if kind == 2:  # random character runs
        alphabet = string.ascii_letters + string.digits + "#@$%&*+=/<>|~^"
        return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randrange(2, 14)))
                        for _ in range(rng.randrange(30, 400)))
    if kind == 3:  # prose with lorem ipsum placeholder text
        return "\n\n".join(rng.sample(prose, 3) + ["Lorem ipsum dolor sit amet, consectetur adipiscing elit, "
                                                  "sed do eiusmod tempor incididunt ut labore et dolore magna."])
    if kind == 4:  # code
        return "\n\n".join(rng.sample(code, rng.randrange(2, 8)))
    return rng.choice(prose).split(". ")[0] + "."  # a one-liner


def corpus(n_docs: int, seed: int = 0, junk_fraction: float = 0.3) -> list[dict[str, str]]:
    """`n_docs` documents {"id", "text"}: real prose documents and junk, in a seeded order."""
    rng = random.Random(seed)
    prose, code = topic_blocks()
    docs = []
    for i in range(n_docs):
        if rng.random() < junk_fraction:
            text = _junk(rng, prose, code)
        else:
            text = "\n\n".join(rng.sample(prose, rng.randrange(3, 16)))
        docs.append({"id": f"bench:{i:06d}", "text": text})
    return docs


def write_jsonl(docs: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")


def run_ours(src: Path, out: Path, batch_size: int) -> tuple[float, set[str]]:
    """Seconds and kept ids of our four stages over `src`, batch by batch, parquet out."""
    stages = [STAGES[kind](STAGES[kind].Config()) for kind in STAGE_ORDER]
    for stage in stages:
        stage.ensure_setup()  # model/tokenizer loading is a per-worker cost, outside the timing
    schema = record_schema("text")
    kept: set[str] = set()
    start = time.perf_counter()
    writer = None
    with open(src, encoding="utf-8") as fh:
        while True:
            rows = [json.loads(line) for _, line in zip(range(batch_size), fh)]
            if not rows:
                break
            table = pa.Table.from_pylist([{"id": r["id"], "source": "bench", "text": r["text"]} for r in rows],
                                         schema=schema)
            for stage in stages:
                table = stage.process(table)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema, compression="zstd")
            writer.write_table(table)
            kept.update(i for i, r in zip(table.column("id").to_pylist(), table.column("drop_reason").to_pylist())
                        if r is None)
    if writer is not None:
        writer.close()
    return time.perf_counter() - start, kept


def run_datatrove(src: Path, out: Path, logs: Path) -> tuple[float, set[str]]:
    """Seconds and kept ids of datatrove's pipeline over `src` (one task, one worker)."""
    split_into_words("Warm up the tokenizer.")  # as our setup(): spaCy loads outside the timing
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(src.parent), glob_pattern=src.name),
            GopherQualityFilter(), GopherRepetitionFilter(), FineWebQualityFilter(), C4QualityFilter(),
            JsonlWriter(str(out), compression=None),
        ],
        tasks=1, workers=1, logging_dir=str(logs),
    )
    start = time.perf_counter()
    executor.run()
    seconds = time.perf_counter() - start
    kept = set()
    for path in sorted(out.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            kept.update(json.loads(line)["id"] for line in fh)
    return seconds, kept


def _isolated(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a fresh spawned process: neither side inherits the other's warm caches."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run(n_docs: int, batch_size: int, seed: int = 0, repeat: int = 1) -> dict[str, Any]:
    """Both sides `repeat` times, alternating which goes first, each run in a fresh process;
    the medians are reported."""
    docs = corpus(n_docs, seed)
    dt_times, our_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        src = root / "in" / "docs.jsonl"
        write_jsonl(docs, src)
        for i in range(repeat):
            for side in (("datatrove", "ours") if i % 2 == 0 else ("ours", "datatrove")):
                if side == "datatrove":
                    seconds, dt_kept = _isolated(run_datatrove, src, root / f"datatrove_out{i}", root / f"logs{i}")
                    dt_times.append(seconds)
                else:
                    seconds, our_kept = _isolated(run_ours, src, root / f"ours{i}.parquet", batch_size)
                    our_times.append(seconds)
    dt_seconds, our_seconds = statistics.median(dt_times), statistics.median(our_times)
    return {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.python_implementation()} "
                   f"{platform.python_version()}, datatrove {version('datatrove')}, spaCy {version('spacy')}",
        "docs": n_docs, "chars": sum(len(d["text"]) for d in docs), "batch_size": batch_size, "repeat": repeat,
        "seconds_each": {"ours": [round(t, 3) for t in our_times], "datatrove": [round(t, 3) for t in dt_times]},
        "ours": {"seconds": round(our_seconds, 3), "docs_per_s": round(n_docs / our_seconds, 1), "kept": len(our_kept)},
        "datatrove": {"seconds": round(dt_seconds, 3), "docs_per_s": round(n_docs / dt_seconds, 1),
                      "kept": len(dt_kept)},
        "ratio": round(dt_seconds / our_seconds, 2),
        "same_kept": our_kept == dt_kept,
        "kept_only_by_ours": len(our_kept - dt_kept), "kept_only_by_datatrove": len(dt_kept - our_kept),
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']}")
    print(f"{r['docs']} docs ({r['chars']} chars), batch {r['batch_size']}: "
          f"{' + '.join(STAGE_ORDER)}, one process; median of {r['repeat']} fresh-process runs each")
    print(f"{'':>10} {'seconds':>8} {'docs/s':>8} {'kept':>6}")
    for name in ("ours", "datatrove"):
        x = r[name]
        each = ", ".join(f"{t:.2f}" for t in r["seconds_each"][name])
        print(f"{name:>10} {x['seconds']:>8.2f} {x['docs_per_s']:>8.1f} {x['kept']:>6}   (runs: {each} s)")
    print(f"ratio (ours / datatrove docs/s): {r['ratio']}x; same kept ids: {r['same_kept']}"
          + ("" if r["same_kept"] else f" (only ours {r['kept_only_by_ours']}, only datatrove "
                                         f"{r['kept_only_by_datatrove']})"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print_table(run(args.docs, args.batch_size, args.seed, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
