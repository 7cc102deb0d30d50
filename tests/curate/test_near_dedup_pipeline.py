"""Perceptual near-dedup and eval decontamination in a real run (LocalCluster, two processes): an
image folder holding distinct pictures, near copies of some (another format, size or quality;
over several partitions) and pictures an eval set also holds. The copies are dropped by
near_dedup naming the kept original, the eval overlaps by eval_decontaminate, every input is
one ledger row, and the output verifies."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.contract import read_ledger, read_manifest, read_sidecars
from curate.recipe import parse_recipe
from tools.verify import verify

from skimage import data as skdata

COPIES = {  # file -> the original it copies
    "astronaut00_small.png": "astronaut00.jpg",
    "astronaut00_q60.jpg": "astronaut00.jpg",
    "coffee11_copy.webp": "coffee11.jpg",
    "rocket10_big.jpg": "rocket10.jpg",
}
IN_EVAL = ("camera01.jpg", "rocket00.jpg")


def _save(img: Image.Image, path: Path, **options) -> None:
    buffer = io.BytesIO()
    img.save(buffer, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[path.suffix[1:]], **options)
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shared_cluster) -> dict:
    root = tmp_path_factory.mktemp("neardup-run")
    folder, evalset = root / "in", root / "evalset"
    folder.mkdir()
    evalset.mkdir()
    pictures = {}
    for name in ("astronaut", "coffee", "rocket", "camera"):
        array = getattr(skdata, name)()
        h, w = array.shape[:2]
        for i, j in itertools.product(range(2), range(2)):
            tile = np.ascontiguousarray(array[i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2])
            pictures[f"{name}{i}{j}.jpg"] = Image.fromarray(tile).convert("RGB")
    for file, img in pictures.items():
        _save(img, folder / file, quality=90)
    for file, original in COPIES.items():
        img = pictures[original]
        if "small" in file:
            img = img.resize((img.width // 2, img.height // 2))
        if "big" in file:
            img = img.resize((img.width * 3 // 2, img.height * 3 // 2))
        _save(img, folder / file, quality=60)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    for file in IN_EVAL:
        img = pictures[file]
        _save(img.resize((img.width * 3 // 4, img.height * 3 // 4)), evalset / file.replace(".jpg", ".png"))
    for file in folder.iterdir():
        file.with_suffix(".txt").write_text(f"a photograph, part of {file.stem}")
    out = root / "out"
    recipe = parse_recipe({
        "name": "neardup-e2e",
        "sources": [{"kind": "image_folder", "name": "f", "path": str(folder), "captions": "sidecar",
                     "files_per_partition": 4}],
        "stages": [
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 128, "format": "jpg"},
            {"kind": "phash"},
            {"kind": "eval_decontaminate", "eval_set": str(evalset), "set_name": "val"},
            {"kind": "near_dedup"},
        ],
        "output": {"path": str(out), "shard_max_samples": 5},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
        "execution": {"batch_size": 4},
    }, "<near-dedup test recipe>")
    manifest = shared_cluster.run(recipe)
    return {"out": out, "manifest": manifest, "inputs": len(pictures) + len(COPIES) + 1}


def test_every_input_is_one_ledger_row_and_the_output_verifies(run, output_checks):
    output_checks.check_ledger_invariant(run["out"])
    assert run["manifest"]["counts"]["inputs"] == run["inputs"]
    report = verify(run["out"])
    assert report.ok, report


def test_copies_and_eval_overlaps_are_dropped_with_their_reasons(run):
    ledger = {r["id"].removeprefix("f:"): r for r in read_ledger(run["out"]).to_pylist()}
    dropped = {k: (r["stage"], r["drop_reason"]) for k, r in ledger.items() if r["outcome"] == "dropped"}
    assert dropped == {
        **{copy: ("near_dedup", "duplicate") for copy in COPIES},
        **{file: ("eval_decontaminate", "eval_overlap") for file in IN_EVAL},
        "broken.jpg": ("image", "decode_error"),
    }
    for copy, original in COPIES.items():
        assert ledger[copy]["drop_detail"].startswith(f"near duplicate of f:{original} (perceptual hashes")
        assert ledger[original]["outcome"] == "kept"
    assert ledger["camera01.jpg"]["drop_detail"].startswith("val: camera01.png at distance ")
    summary = run["manifest"]["global"]["near_dedup"]["summary"]
    assert summary["groups"] == 3 and summary["grouped_rows"] == 7 and summary["band_keys"] == 35


def test_kept_pairs_carry_their_hash_into_the_sidecars(run):
    sidecars = read_sidecars(run["out"], "pair", columns=["id", "image_phash"]).to_pylist()
    assert len(sidecars) == read_manifest(run["out"])["counts"]["kept"]
    assert all(isinstance(r["image_phash"], int) for r in sidecars)
