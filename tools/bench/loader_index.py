"""Peak memory and start-up time of one loader process versus the number of samples the outputs hold.

The loader assigns shards, not samples, to its (rank, worker) slots (`train/data/shards.py`,
"By shard"): a process reads the manifest (one entry per shard) and the sidecars of the shards it
opens, so its memory and start-up should not grow with the corpus. This benchmark builds a
synthetic curated output per size: a manifest and a parquet sidecar for every shard (10,000 text
samples a shard), all hard links to one real shard written by curate's own `ShardWriter`, real
tars only for the shards the measured slot opens (links too: the disk cost of a size is its
manifest), and an empty placeholder file for every other tar, so that `list_shards`' check that
each listed tar exists passes (the slot never opens them). Then, in a fresh process per size, it
times one loader slot (slot 0 of 64: 8 ranks x 8 workers) from interpreter start until its
stream has yielded 1,000 samples, and reads the process's peak RSS.

    python -m tools.bench.loader_index --samples 1000000 10000000 --json F

JSON: {"sizes": [{"samples": N, "shards": S, "peak_rss_mib": X, "startup_s": Y}, ...], ...}.
Goal (issue 20): at 10M samples, peak RSS <= 1.1x and start-up <= 1.5x the 1M figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from curate.contract import FORMAT_VERSION, MANIFEST, record_schema
from curate.engine.commit import Storage
from curate.engine.pack import ShardWriter
from tools.demo.docs import train_tokenizer
from train.data.shards import shard_plan

SHARD_SAMPLES = 10_000
SLOTS = 64
YIELD = 1000


def build_template(root: Path, per_shard: int) -> tuple[dict, Path]:
    """One real text shard of `per_shard` samples (curate's writer) and a tokenizer."""
    writer = ShardWriter(Storage(), root, "text", 0, record_schema("text"))
    for i in range(per_shard):
        writer.write({"id": f"corpus:{i}", "source": "corpus", "attempts": 1,
                      "text": f"synthetic text sample {i}: " + "a few words of filler. " * (1 + i % 7)})
    shard = writer.close()
    tokenizer = train_tokenizer([f"synthetic text sample {i} a few words of filler." for i in range(200)],
                                root / "tokenizer.json", vocab_size=400)
    return shard, tokenizer


def build_output(out: Path, template_root: Path, template: dict, n_samples: int, per_shard: int,
                 slots: int = SLOTS) -> int:
    """A curated output of `n_samples` text samples (see the module docstring); returns its shards."""
    n_shards = max(1, n_samples // per_shard)
    (out / "text").mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(n_shards):
        name, sidecar = f"text/{k:05d}.tar", f"text/{k:05d}.parquet"
        os.link(template_root / template["sidecar"], out / sidecar)
        shards.append({**template, "name": name, "sidecar": sidecar})
    opened = {j for j, _, _ in shard_plan(n_shards, seed=0, epoch=0, slot=0, n_slots=slots)}
    for j, shard in enumerate(shards):  # the measured slot's tars; empty placeholders for the others
        if j in opened:
            os.link(template_root / template["name"], out / shard["name"])
        else:
            (out / shard["name"]).touch()
    manifest = {"format_version": FORMAT_VERSION, "name": f"bench-{n_samples}", "code_version": "bench",
                "recipe": {}, "recipe_hash": "0" * 16, "input_fingerprint": "f" * 16,
                "kinds": {"text": {"shards": shards, "count": n_shards * per_shard,
                                   "bytes": n_shards * int(template["bytes"])}},
                "ledger": [], "counts": {}, "drops": {}, "global": {}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return n_shards


_CHILD = """
import resource, sys, time
t0 = time.perf_counter()
from train.data.mixture import Mixture, MixtureConfig, source_shards
out, tokenizer, slots, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = MixtureConfig(outs=(out,), tokenizer=tokenizer, seq_len=1024, n_image_tokens=16, weights={"text": 1.0})
mixture = Mixture(cfg, slot=0, n_slots=slots, sources=source_shards(cfg))
while mixture.streams["text"].stats["read"] < want:
    next(mixture)
elapsed = time.perf_counter() - t0
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(out: Path, tokenizer: Path, slots: int = SLOTS, want: int = YIELD) -> dict:
    """Start-up seconds (interpreter start to `want` samples) and peak RSS of a fresh process."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(tokenizer), str(slots), str(want)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"measuring {out} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    inside, rss_kib = done.stdout.split()
    return {"startup_s": round(wall, 3), "startup_in_process_s": round(float(inside), 3),
            "peak_rss_mib": round(int(rss_kib) / 1024, 1)}


def run(sizes: list[int], per_shard: int = SHARD_SAMPLES, root: Path | None = None, repeats: int = 3,
        slots: int = SLOTS, want: int = YIELD) -> dict:
    with tempfile.TemporaryDirectory(prefix="loader_index_", dir=root) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        template, tokenizer = build_template(tmp / "template", per_shard)
        build_s = time.perf_counter() - t
        results = []
        for n in sizes:
            out = tmp / f"out-{n}"
            t = time.perf_counter()
            n_shards = build_output(out, tmp / "template", template, n, per_shard, slots)
            generate_s = time.perf_counter() - t
            runs = [measure(out, tokenizer, slots, want) for _ in range(repeats)]
            best = min(runs, key=lambda r: r["startup_s"])
            results.append({"samples": n, "shards": n_shards, "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                            "startup_s": best["startup_s"], "startup_in_process_s": best["startup_in_process_s"],
                            "generate_s": round(generate_s, 2),
                            "manifest_mib": round((out / "manifest.json").stat().st_size / 2**20, 2)})
    return {"sizes": results, "shard_samples": per_shard, "slots": slots, "yielded": want,
            "template_build_s": round(build_s, 1), "repeats": repeats,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--shard-samples", type=int, default=SHARD_SAMPLES)
    p.add_argument("--repeats", type=int, default=3, help="runs per size (start-up: the fastest; RSS: the largest)")
    p.add_argument("--slots", type=int, default=SLOTS, help="the layout's slots (ranks x workers); slot 0 is measured")
    p.add_argument("--yield", dest="want", type=int, default=YIELD, help="samples the slot yields before the clock stops")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    result = run(args.samples, per_shard=args.shard_samples, repeats=args.repeats, slots=args.slots, want=args.want)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
