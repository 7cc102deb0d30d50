"""`mm1 demo`: the main job end to end on the embedded default.

Builds the demo inputs from images that ship in pip packages, serves part of them from a real
HTTP server on 127.0.0.1 behind a URL list and behind the pages of a WARC crawl (whose prose,
like a text corpus's, comes from CPython's own help topics: tools/demo/docs.py), curates all
three kinds with recipes/curate/demo.yaml on a LocalCluster bound to 127.0.0.1, prints
`mm1 stats`, runs `mm1 verify`, says where the shards, the stats and the ledger are, and trains
the tiny MM1 for a few dozen steps on them (recipes/train/demo.yaml, CPU).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from curate.contract import Manifest
from curate.recipe import load_recipe
from curate.engine.driver import run_recipe
from tools.demo.data import build_demo_inputs
from tools.demo.docs import build_doc_inputs
from tools.demo.server import serve
from tools.convert_heads import write_demo_heads
from tools.demo.tiny_models import build_tiny_lm, build_tiny_vlm
from tools.demo.web import build_www, write_blocklists, write_url_list
from tools.report import build_report
from tools.stats import compute_stats, format_stats
from tools.verify import verify

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "curate" / "demo.yaml"
TRAIN_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "train" / "demo.yaml"


def _index(items: list[dict[str, Any]], key: str, value: str) -> int:
    return next(i for i, item in enumerate(items) if item.get(key) == value)


def demo_overrides(root: Path) -> dict[str, str]:
    """Point the demo recipe's sources, eval set, tokenizer and output under `root`."""
    inputs = root / "inputs"
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    sources, stages = recipe["sources"], recipe["stages"]
    paths = {
        "folder": inputs / "folder",
        "mapped": inputs / "mapped",
        "wds": inputs / "wds",
        "web": inputs / "urls" / "urls.csv",
        "crawl": inputs / "warc" / "crawl.warc.gz",
        "corpus": inputs / "texts" / "corpus.jsonl",
    }
    overrides = {f"sources.{_index(sources, 'name', name)}.path": str(path) for name, path in paths.items()}
    overrides[f"stages.{_index(stages, 'kind', 'text_decontaminate')}.eval_texts"] = \
        str(inputs / "eval" / "eval_texts.jsonl")
    recaption = _index(stages, "kind", "recaption")
    overrides[f"stages.{recaption}.captioner.model"] = str(inputs / "models" / "vlm")
    overrides[f"stages.{recaption}.fusion.model"] = str(inputs / "models" / "llm")
    overrides[f"stages.{recaption}.cache_dir"] = str(root / "recaption_cache")
    blocklists = inputs / "blocklists"
    overrides[f"stages.{_index(stages, 'kind', 'url_blocklist')}.domains.0"] = str(blocklists / "domains.txt")
    overrides[f"stages.{_index(stages, 'kind', 'hash_blocklist')}.sha256.0"] = str(blocklists / "takedowns.sha256")
    for kind in ("aesthetic", "nsfw", "watermark"):
        overrides[f"stages.{_index(stages, 'kind', f'{kind}_score')}.weights"] = \
            str(inputs / "models" / "heads" / f"{kind}.safetensors")
    overrides["tokenizer.path"] = str(inputs / "tokenizer" / "tokenizer.json")
    overrides["output.path"] = str(root / "curated")
    return overrides


@contextmanager
def demo_inputs(root: Path) -> Iterator[dict[str, Any]]:
    """Build every demo input under `root/inputs` and serve the web part while the block runs.
    Yields the summary: expected inputs, kept, and drop reasons over all four sources."""
    inputs = Path(root) / "inputs"
    summary = build_demo_inputs(inputs)
    build_tiny_vlm(inputs / "models" / "vlm")  # the recaptioning stage's models: RANDOM weights
    build_tiny_lm(inputs / "models" / "llm")
    write_demo_heads(inputs / "models" / "heads")  # the score heads: RANDOM weights
    www = build_www(inputs, inputs / "folder")
    write_blocklists(inputs)
    with serve(www) as base:
        docs = build_doc_inputs(inputs, base)
        more = {"web": write_url_list(inputs, base), **docs["sources"]}
        drops = Counter(summary["expected_drops"])
        for name, source in more.items():
            summary["sources"][name] = source
            summary["expected_inputs"] += source["expected_inputs"]
            summary["expected_kept"] += source["expected_kept"]
            drops += Counter(source["expected_drops"])
        summary["expected_drops"] = dict(sorted(drops.items()))
        summary["server"] = base
        yield summary


def run_demo(root: Path, client: Any = None) -> dict:
    """Build the inputs afresh and curate them from scratch (the inputs are rewritten, so an
    earlier demo output under `root` could not be resumed: it is replaced), on `client`'s
    cluster when one is given, else on the LocalCluster the demo recipe's cluster block asks for."""
    root = Path(root)
    with demo_inputs(root) as summary:
        print(f"demo inputs: {root / 'inputs'} ({summary['expected_inputs']} samples; "
              f"URL list served from {summary['server']})")
        recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
        manifest = run_recipe(recipe, restart=True, client=client)
    out = Path(recipe.output.path)
    stats = compute_stats(out)
    print(format_stats(stats))
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    report = verify(out)
    for err in report.errors:
        print(f"FAIL {err}")
    print(f"verify: {'OK' if report.ok else 'FAILED'}")
    typed = Manifest.from_dict(manifest)
    c = typed.counts
    kinds = ", ".join(f"{k} {v.count}" for k, v in typed.kinds.items())
    print(
        f"\n{c['inputs']} inputs -> {c['kept']} kept ({kinds}), {c['dropped']} dropped\n"
        f"  shards:   {out / 'pairs'}  {out / 'docs'}  {out / 'text'}\n"
        f"  stats:    {out / 'stats.json'}   (mm1 stats {out})\n"
        f"  ledger:   {out / 'ledger'}\n"
        f"  manifest: {out / 'manifest.json'}"
    )
    if not report.ok:
        raise SystemExit(1)
    print(f"  report:   {build_report([out])}   (mm1 report {out})")
    train_demo(root, out)
    return manifest


def train_demo(root: Path, out: Path) -> dict[str, Any]:
    """Close the loop: the tiny MM1 (random init: mechanics, not quality) trains for a few dozen
    steps on the shards just curated, all three kinds mixed 45/45/10, on CPU; its newest
    checkpoint is exported to `root/export` (safetensors + config + decoder_hf/)."""
    # the train extra (torch; train.trainer is ~0.9 s of import): demo_overrides works without it
    from train.export import export_checkpoint
    from train.recipe import load_train_recipe
    from train.trainer import train

    run = root / "run"
    if run.exists():
        shutil.rmtree(run)  # the inputs were rebuilt: a fresh run, never a resume
    overrides = {
        "data.outs": [str(out)],
        "data.tokenizer": str(root / "inputs" / "tokenizer" / "tokenizer.json"),
    }
    recipe = load_train_recipe(TRAIN_RECIPE, overrides)
    result = train(recipe, run, overrides=overrides)
    losses = result["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    exported = export_checkpoint(run, root / "export")
    print(f"\ntrained the tiny MM1 (random init) for {result['step']} steps on the curated shards: "
          f"loss {first:.2f} -> {last:.2f} (mean of the first and last 5 steps)\n"
          f"  checkpoints: {run}\n"
          f"  export:      {root / 'export'}   (mm1 export {exported['checkpoint']} DIR)")
    return result
