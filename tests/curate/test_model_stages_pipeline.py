"""The model-based quality stages inside a real run (issue 6): placement by worker resources, the
ledger invariant, the top-fraction cutoff in the manifest, score distributions in `mm1 stats`.

The cluster: a `dask scheduler` and two `dask worker` processes on 127.0.0.1, one advertising a
made-up resource (`FAKEGPU=1`, what a GPU worker would advertise as `GPU=1`). The CLIP stage
declares it, so its segment runs only on that worker; the image stage before it runs anywhere.
The CLIP model is a tiny open_clip config with RANDOM weights (mechanics, not quality).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


from curate.contract import read_ledger, read_manifest, read_sidecars
from curate.recipe import parse_recipe
from curate.engine.driver import run_recipe
from tools.stats import compute_stats
from tools.verify import verify


N_IMAGES = 24  # 4 full partitions of 6 and one of the copy: both workers get segment-0 tasks
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _recipe(inputs: Path, out: Path) -> dict[str, Any]:
    return {
        "name": "model-stages",
        "sources": [{"kind": "image_folder", "name": "bulk", "path": str(inputs), "captions": "sidecar",
                     "files_per_partition": 6}],
        "stages": [
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 64, "format": "jpg", "quality": 90},
            {"kind": "exact_dedup"},
            {"kind": "clip_score", "model": "ViT-B-32", "pretrained": None, "model_overrides": TINY,
             "batch_size": 8, "resources": {"FAKEGPU": 1}},
            {"kind": "score_top_fraction", "fraction": 0.5},
        ],
        "output": {"path": str(out), "shard_max_samples": 10},
        "execution": {"batch_size": 4},
    }


def _segment(key: Any) -> int | None:
    """The segment of a run_segment task key ("run_segment-r<round>-<seg>-<p>-<hash>"); None for
    any other task (dataframe tasks have tuple keys)."""
    if not isinstance(key, str):
        return None
    parts = key.split("-")
    return int(parts[2]) if parts[0] == "run_segment" else None


def test_clip_stage_runs_only_where_its_resource_is_and_the_top_half_is_kept(
        corpus, tmp_path, fake_gpu_cluster, output_checks):
    from distributed import Client, get_task_stream

    inputs = tmp_path / "bulk"  # 24 of the corpus's crops and the exact copy of one: 5 partitions
    inputs.mkdir()
    for path in sorted((corpus / "bulk").iterdir()):
        if path.stem < f"{N_IMAGES:06d}" or "copy" in path.stem:
            shutil.copyfile(path, inputs / path.name)
    out = tmp_path / "out"
    recipe = parse_recipe(_recipe(inputs, out), "<test recipe>")
    with Client(fake_gpu_cluster, timeout=120) as client:
        gpu = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                   if w.get("resources", {}).get("FAKEGPU"))
        with get_task_stream(client) as stream:
            manifest = run_recipe(recipe, progress=False, client=client)
    ran: dict[int, set[str]] = {}
    for task in stream.data:
        seg = _segment(task["key"])
        if seg is not None:
            ran.setdefault(seg, set()).add(task["worker"])
    assert ran[1] == {gpu}, f"the CLIP segment ran on {ran[1]}; only {gpu} has the resource"
    assert len(ran[0]) == 2, "the CPU segment should have run on both workers"

    output_checks.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report.errors
    summary = manifest["global"]["score_top_fraction"]["summary"]
    assert summary["kept"] == -(-summary["rows"] // 2)  # ceil(0.5 * n) of the n that reached it
    assert manifest["drops"]["score_top_fraction/clip_score_low"] == summary["rows"] - summary["kept"]
    cut_score, cut_id = summary["cutoff_score"], summary["cutoff_id"]
    kept = read_sidecars(out, "pair", columns=["clip_score", "id"]).to_pylist()
    assert len(kept) == summary["kept"]
    for row in kept:  # every kept row ranks at or above the cutoff: score desc, then id asc
        assert row["clip_score"] > cut_score or (row["clip_score"] == cut_score and row["id"] <= cut_id)
    dropped = [r for r in read_ledger(out, columns=["drop_reason", "stage"]).to_pylist()
               if r["stage"] == "score_top_fraction"]
    assert len(dropped) == summary["rows"] - summary["kept"]

    stats = compute_stats(out)
    scores = stats["kinds"]["pair"]["scores"]["clip_score"]
    assert scores["count"] == summary["kept"] and scores["min"] >= cut_score
    assert read_manifest(out)["global"]["score_top_fraction"]["summary"] == summary
