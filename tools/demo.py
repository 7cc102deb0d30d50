"""`mm1 demo`: the main job end to end on the embedded default.

Builds the demo inputs from images that ship in pip packages, serves part of them from a real
HTTP server on 127.0.0.1 behind a URL list, curates everything with recipes/curate/demo.yaml on
a LocalCluster bound to 127.0.0.1, prints `mm1 stats`, runs `mm1 verify`, and says where the
shards, the stats and the ledger are.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curate.recipe import load_recipe
from curate.runner import run_recipe
from tools.demo_data import build_demo_inputs
from tools.demo_server import serve
from tools.demo_web import build_www, write_url_list
from tools.stats import compute_stats, format_stats
from tools.verify import verify

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "curate" / "demo.yaml"


def demo_overrides(root: Path) -> dict[str, str]:
    """Point the demo recipe's sources and output under `root`."""
    inputs = root / "inputs"
    return {
        "sources.0.path": str(inputs / "folder"),
        "sources.1.path": str(inputs / "mapped"),
        "sources.2.path": str(inputs / "wds"),
        "sources.3.path": str(inputs / "urls" / "urls.csv"),
        "output.path": str(root / "curated"),
    }


@contextmanager
def demo_inputs(root: Path) -> Iterator[dict[str, Any]]:
    """Build every demo input under `root/inputs` and serve the web part while the block runs.
    Yields the summary: expected inputs, kept, and drop reasons over all four sources."""
    inputs = Path(root) / "inputs"
    summary = build_demo_inputs(inputs)
    www = build_www(inputs, inputs / "folder")
    with serve(www) as base:
        web = write_url_list(inputs, base)
        summary["sources"]["web"] = web
        summary["expected_inputs"] += web["expected_inputs"]
        summary["expected_kept"] += web["expected_kept"]
        drops = Counter(summary["expected_drops"]) + Counter(web["expected_drops"])
        summary["expected_drops"] = dict(sorted(drops.items()))
        summary["server"] = base
        yield summary


def run_demo(root: Path) -> dict:
    """Build the inputs afresh and curate them from scratch (the inputs are rewritten, so an
    earlier demo output under `root` could not be resumed: it is replaced)."""
    root = Path(root)
    with demo_inputs(root) as summary:
        print(f"demo inputs: {root / 'inputs'} ({summary['expected_inputs']} samples; "
              f"URL list served from {summary['server']})")
        recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
        manifest = run_recipe(recipe, restart=True)
    out = Path(recipe.output.path)
    stats = compute_stats(out)
    print(format_stats(stats))
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    report = verify(out)
    for err in report.errors:
        print(f"FAIL {err}")
    print(f"verify: {'OK' if report.ok else 'FAILED'}")
    c = manifest["counts"]
    print(
        f"\n{c['inputs']} inputs -> {c['kept']} kept, {c['dropped']} dropped\n"
        f"  shards:   {out / 'pairs'}\n"
        f"  stats:    {out / 'stats.json'}   (mm1 stats {out})\n"
        f"  ledger:   {out / 'ledger'}\n"
        f"  manifest: {out / 'manifest.json'}"
    )
    if not report.ok:
        raise SystemExit(1)
    return manifest
