"""The recaptioning stage inside real runs: the session's LocalCluster (`shared_cluster`, 2 worker
processes on 127.0.0.1) runs an image folder through the image stage, exact dedup and `recaption`
against a real chat server process on loopback (tools/servers/chat.py over tiny RANDOM-weight
models: mechanics only). The ledger invariant holds; kept pairs carry the caption columns in their
sidecars and KEY.json; KEY.txt holds the caption the recipe chose; stock webdataset reads the
shards; the trainer's sample reader takes the alt-text from caption_alt; and a second run into
another output, with the same cache folder, makes no request to the server and writes the same
captions.

The workers keep a stage instance per stage config (curate/engine/steps.py), and a recaption
stage keeps an index of the cache rows it has read or written: so the second run changes an
execution-only setting (the captioner's concurrency), which makes it another stage instance, one
that starts with an empty index and finds the captions in the cache folder. Each test's cache
folder is its own, so no other run's stage shares its config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from curate.contract import read_sidecars, shard_urls
from curate.recipe import parse_recipe
from tools.bench.partition_memory import build_folder

pytestmark = pytest.mark.usefixtures("loopback_only")

COLUMNS = ["id", "key", "caption", "caption_alt", "caption_synthetic", "caption_vecap", "vecap_fallback",
           "txt_source", "caption_model", "fusion_model"]


def _recipe(inputs: Path, out: Path, cache: Path, base_url: str, concurrency: int = 2) -> dict:
    model = {"backend": "openai", "base_url": base_url, "concurrency": concurrency, "timeout_s": 30, "retries": 2,
             "max_new_tokens": 8}
    return {
        "name": "recaption-run",
        "sources": [{"kind": "image_folder", "name": "bulk", "path": str(inputs), "captions": "sidecar",
                     "files_per_partition": 5}],
        "stages": [
            {"kind": "image", "resize_mode": "keep_ratio", "image_size": 64, "format": "jpg", "quality": 90},
            {"kind": "exact_dedup"},
            {"kind": "recaption", "captioner": {**model, "model": "vlm"}, "fusion": {**model, "model": "llm"},
             "txt": "vecap", "cache_dir": str(cache)},
        ],
        "output": {"path": str(out), "shard_max_samples": 5},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
        "execution": {"batch_size": 4},
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recaption-inputs") / "images"
    build_folder(root, 11)
    shutil.copyfile(root / "000003.jpg", root / "000011_copy.jpg")  # exact dedup drops one before captioning
    (root / "000011_copy.txt").write_text("The Coffee cup, a copy")
    return root


def _captions(out: Path) -> dict[str, dict]:
    table = read_sidecars(out, "pair", columns=COLUMNS)
    return {r["id"]: r for r in table.to_pylist()}


def test_recaptioned_run_then_a_second_run_from_the_cache(inputs, tmp_path, chat_server, output_checks,
                                                          shared_cluster):
    import webdataset as wds

    chat_server.reset()
    cache = tmp_path / "cache"
    first = shared_cluster.run(parse_recipe(_recipe(inputs, tmp_path / "a", cache, chat_server.base_url)))
    output_checks.check_ledger_invariant(tmp_path / "a")
    assert first["counts"] == {"partitions": 3, "inputs": 12, "kept": 11, "dropped": 1}
    asked = chat_server.stats()["requests"]
    assert 11 <= asked <= 22  # a caption per kept image, and a fusion for those with alt-text

    rows = _captions(tmp_path / "a")
    assert len(rows) == 11
    for r in rows.values():
        assert r["caption_alt"] == r["caption"] and r["caption_synthetic"]
        assert r["txt_source"] in ("vecap", "synthetic") and r["caption_model"] == "served:vlm"
    samples = {s["__key__"]: s for s in wds.WebDataset(shard_urls(tmp_path / "a", "pair"), shardshuffle=False)}
    assert len(samples) == 11
    for r in rows.values():
        s = samples[r["key"]]
        assert s["txt"].decode() == r["caption_vecap" if r["txt_source"] == "vecap" else "caption_synthetic"]
        meta = json.loads(s["json"])
        assert meta["caption_alt"] == r["caption"] and meta["vecap_fallback"] == r["vecap_fallback"]

    # the trainer's reader: alt-text from caption_alt, whatever KEY.txt holds
    import random

    from tools.demo.docs import train_tokenizer
    from train.data.samples import TextTokenizer, tokenize_sample

    tok = TextTokenizer.from_file(train_tokenizer(["crop of a sample photograph"] * 50, tmp_path / "tok.json"))
    some = next(iter(rows.values()))
    members = {ext: data for ext, data in samples[some["key"]].items() if not ext.startswith("__")}
    (piece,) = tokenize_sample("pair", members, tok, n_image_tokens=4, max_len=512, caption_ratio=1.0,
                               rng=random.Random(0))
    assert piece.tokens[4:-1] == tok.encode(some["caption"])

    # another stage instance (see the module docstring): its captions come from the cache folder
    second = shared_cluster.run(parse_recipe(_recipe(inputs, tmp_path / "b", cache, chat_server.base_url,
                                                     concurrency=1)))
    assert chat_server.stats()["requests"] == asked  # zero model calls: everything came from the cache
    assert second["counts"] == first["counts"]
    assert _captions(tmp_path / "b") == rows


def test_retry_failed_asks_again_for_pairs_whose_captioner_was_down(inputs, tmp_path, chat_server, output_checks,
                                                                    shared_cluster):
    """Run 1 points at a port where nothing listens: every pair that reached the stage is dropped
    `connection_error` (transient). `mm1 curate --retry-failed` with the server up (base_url is
    execution-only: the recipe hash is the same) recovers all of them into new shards."""
    import socket

    from curate.engine.retry import retry_failed

    chat_server.reset()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    data = _recipe(inputs, tmp_path / "out", tmp_path / "cache", dead)
    for role in ("captioner", "fusion"):
        data["stages"][2][role].update(retries=0, timeout_s=5)
    first = shared_cluster.run(parse_recipe(data))
    assert first["counts"]["kept"] == 0 and first["drops"] == {"exact_dedup/duplicate": 1,
                                                                "recaption/connection_error": 11}
    for role in ("captioner", "fusion"):
        data["stages"][2][role]["base_url"] = chat_server.base_url
    recovered = retry_failed(parse_recipe(data), progress=False, client=shared_cluster.client)
    output_checks.check_ledger_invariant(tmp_path / "out")
    assert recovered["counts"] == {"partitions": 3, "inputs": 12, "kept": 11, "dropped": 1}
    assert recovered["retries"][-1]["recovered"] == 11
    rows = _captions(tmp_path / "out")
    assert len(rows) == 11 and all(r["caption_synthetic"] for r in rows.values())
