"""Dedup over documents' images through the runner: OBELICS-style documents whose images a
loopback server serves, beside an image folder of pairs. `phash` hashes each doc image into its
segment and `near_dedup` with `docs: true` removes a document's copy of an image another document
keeps (with `across_kinds`, a pair's copy too); the documents stay, their ledger rows count the
removed segments, their shards hold the kept images only, and the output verifies."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from skimage import data

from curate.contract import read_ledger, read_manifest, shard_urls
from curate.recipe import parse_recipe
from tools.demo.server import serve
from tools.verify import verify

pytestmark = pytest.mark.usefixtures("loopback_only")


def _jpeg(pixels, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docdedup")
    www = root / "www"
    www.mkdir()
    (www / "astronaut.jpg").write_bytes(_jpeg(data.astronaut()))
    (www / "astronaut_q50.jpg").write_bytes(_jpeg(data.astronaut(), 50))  # a re-encoded copy
    (www / "coffee.jpg").write_bytes(_jpeg(data.coffee()))
    (www / "rocket.jpg").write_bytes(_jpeg(data.rocket()))
    folder = root / "folder"
    folder.mkdir()
    (folder / "rocket.jpg").write_bytes(_jpeg(data.rocket(), 70))  # the same picture as a pair
    (folder / "rocket.txt").write_text("A rocket on its launch pad at dusk")
    with serve(www) as base:
        docs = [("An astronaut in a suit, then a cup of coffee on a saucer.", ["astronaut.jpg", "coffee.jpg"]),
                ("The same astronaut, saved again at a lower quality, and a rocket.", ["astronaut_q50.jpg",
                                                                                       "rocket.jpg"])]
        rows = {"texts": [], "images": [], "general_metadata": []}
        for i, (text, images) in enumerate(docs):
            rows["texts"].append([text, *([None] * len(images))])
            rows["images"].append([None, *(f"{base}/img/{name}" for name in images)])
            rows["general_metadata"].append(json.dumps({"url": f"{base}/page{i}.html"}))
        pq.write_table(pa.table(rows), root / "docs.parquet")
        yield root


def _run(shared_cluster, root, out, **near):
    recipe = parse_recipe({
        "name": "doc-dedup",
        "sources": [{"kind": "obelics", "name": "pages", "path": str(root / "docs.parquet"), "metadata_column": None},
                    {"kind": "image_folder", "name": "folder", "path": str(root / "folder")}],
        "stages": [{"kind": "download", "allow_networks": ["127.0.0.0/8"], "deadline_s": 10},
                   {"kind": "image", "image_size": 128, "resize_mode": "keep_ratio"},
                   {"kind": "phash"},
                   {"kind": "near_dedup", "docs": True, **near}],
        "output": {"path": str(out)}}, "<test recipe>")
    shared_cluster.run(recipe)
    assert verify(out).ok
    samples = {}
    for s in wds.WebDataset(shard_urls(out, "doc"), shardshuffle=False):
        meta = json.loads(s["json"])
        samples[meta["id"] if "id" in meta else s["__key__"]] = [
            seg["url"].rsplit("/", 1)[1] for seg in meta["segments"] if seg["type"] == "image"]
    return samples, read_ledger(out).to_pylist(), read_manifest(out)


def test_near_dedup_removes_a_documents_copy_of_an_image(inputs, shared_cluster, tmp_path):
    """One run with across_kinds (pairs apart by default: the decide-level tests in
    tests/curate/stages/test_doc_model_stages.py): the second page's re-encoded astronaut goes as a
    segment, the page stays; of the pair's rocket and the page's, one survives."""
    docs, ledger, manifest = _run(shared_cluster, inputs, tmp_path / "out", across_kinds=True)
    assert sum("astronaut" in name for images in docs.values() for name in images) == 1
    assert ["astronaut.jpg", "coffee.jpg"] in docs.values()
    second = next(r for r in ledger if r["id"].endswith("#1") and r["kind"] == "doc")
    assert second["outcome"] == "kept" and second["segments_dropped"] >= 1
    pair = next(r for r in ledger if r["id"].startswith("folder:"))
    rockets = sum("rocket.jpg" in images for images in docs.values()) + (pair["outcome"] == "kept")
    assert rockets == 1, (docs, pair)  # the pair's and the doc's rocket are one: one survives
    assert manifest["global"]["near_dedup"]["decides_on"] == "segments"
