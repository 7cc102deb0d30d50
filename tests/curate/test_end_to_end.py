"""The demo recipe end to end on a real LocalCluster, its URL list and its crawled pages' images
served by a real HTTP server on loopback: the ledger invariant over the three kinds (pairs, WARC
documents, a text corpus) in one run, the drop reasons of the intentionally bad inputs, and the
shards read back by the stock webdataset library and by open_clip's own WebDataset training
loader. The run is the session's one demo curation (tests/conftest.py `demo_run`), which the
manifest, report, training and demo tests read too.

The demo's bad inputs are dropped by the cheap stages; on top of that its quality passes drop
samples that are not bad: near copies (near_dedup: the corpus's resized, re-encoded and grayscale
variants), the bottom 10% by a random-weight CLIP score (score_top_fraction) and embedding
near-copies (semantic_dedup). Those are checked here as what they are, not counted as bad."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from curate.contract import KIND_DIRS, read_ledger, read_manifest, read_sidecars, shard_urls
from tools.stats import compute_stats, format_stats
from tools.verify import verify


@pytest.fixture(scope="module")
def demo(demo_run):
    """The session's demo curation (tests/conftest.py `demo_run`), as this module reads it."""
    return {"out": demo_run.out, "summary": demo_run.summary, "manifest": demo_run.manifest}


QUALITY_STAGES = {"near_dedup", "score_top_fraction", "semantic_dedup"}


def _quality_drops(ledger: list[dict]) -> list[dict]:
    return [r for r in ledger if r["outcome"] == "dropped" and r["stage"] in QUALITY_STAGES]


def test_ledger_invariant(demo):
    out, summary, manifest = demo["out"], demo["summary"], demo["manifest"]
    ledger = read_ledger(out).to_pylist()
    ids = [r["id"] for r in ledger]
    assert len(ids) == len(set(ids)), "an input id appears twice in the ledger"
    kept = [r for r in ledger if r["outcome"] == "kept"]
    dropped = [r for r in ledger if r["outcome"] == "dropped"]
    assert len(ledger) == len(kept) + len(dropped) == summary["expected_inputs"]
    quality = _quality_drops(ledger)
    assert len(kept) == summary["expected_kept"] - len(quality) == manifest["counts"]["kept"]
    assert manifest["counts"]["inputs"] == summary["expected_inputs"]
    assert all(r["drop_reason"] and r["stage"] for r in dropped)
    assert all(r["shard"] and r["key"] and not r["drop_reason"] for r in kept)
    # every kept sample is in exactly one sidecar, under the shard (and kind) the ledger names
    in_sidecars = sorted((KIND_DIRS[kind], r["key"], r["id"]) for kind in ("pair", "doc", "text")
                         for r in read_sidecars(out, kind, columns=["key", "id"]).to_pylist())
    assert in_sidecars == sorted((r["shard"].split("/")[0], r["key"], r["id"]) for r in kept)
    assert {r["kind"] for r in kept} == {"pair", "doc", "text"}
    assert manifest["kinds"]["doc"]["count"] == summary["sources"]["crawl"]["expected_kept"]
    assert manifest["kinds"]["text"]["count"] == summary["sources"]["corpus"]["expected_kept"]


def test_each_bad_input_is_one_ledger_row_with_its_reason(demo):
    ledger = read_ledger(demo["out"]).to_pylist()
    reasons = Counter(r["drop_reason"] for r in ledger
                      if r["outcome"] == "dropped" and r["stage"] not in QUALITY_STAGES)
    assert dict(reasons) == demo["summary"]["expected_drops"]
    by_id = {r["id"]: r for r in ledger}
    corrupt = by_id["folder:broken.jpg"]
    assert (corrupt["outcome"], corrupt["stage"], corrupt["drop_reason"]) == ("dropped", "image", "decode_error")
    malformed = sorted((r["source"], r["stage"]) for r in ledger if r["drop_reason"] == "malformed_row")
    # a cut JSON line in the text corpus, a bad JSON line, a broken CSV row
    assert malformed == [("corpus", "source"), ("mapped", "source"), ("web", "source")]
    dup = by_id["folder:espresso_cup.jpg"]
    assert dup["drop_reason"] == "duplicate" and "folder:coffee.jpg" in dup["drop_detail"]
    assert by_id["folder:coffee.jpg"]["outcome"] == "kept"
    web = {r["drop_reason"]: r for r in ledger if r["source"] == "web" and r["outcome"] == "dropped"}
    assert web["http_404"]["stage"] == "download" and web["http_404"]["domain"] == "127.0.0.1"
    assert web["http_500"]["attempts"] >= 1
    assert web["lang_mismatch"]["stage"] == "language_filter"
    assert web["bad_url"]["url"].startswith("file://")
    assert web["dns_error"]["domain"] == "unknown.demo.test"
    fetched = [r for r in ledger if r["source"] == "web" and (r["outcome"] == "kept" or r["stage"] in QUALITY_STAGES)]
    assert any(r["domain"] == "images.demo.test" for r in fetched)  # the redirect, via the resolver


def test_quality_passes_drop_what_they_should(demo):
    """near_dedup drops only the corpus's own variants (resized, re-encoded, grayscale copies of
    another input, in the folder, the shards and on the web), each for the input it came from;
    the top-90% cut drops exactly n - ceil(0.9 n) of the n rows that reach it."""
    ledger = read_ledger(demo["out"]).to_pylist()
    by_id = {r["id"]: r for r in ledger}
    related = {r["path"]: r["derived_from"] for r in demo["summary"]["related"]}
    near = [r for r in ledger if r["stage"] == "near_dedup"]
    assert len(near) >= 3
    for r in near:
        kept_id = r["drop_detail"].split("near duplicate of ", 1)[1].split(" ", 1)[0]
        assert by_id[kept_id]["outcome"] == "kept" or by_id[kept_id]["stage"] in QUALITY_STAGES
    for path in ("folder/astronaut_half.jpg", "folder/chelsea_q40.jpg", "folder/coffee_gray.jpg"):
        assert path in related and by_id[path.replace("/", ":", 1)]["stage"] == "near_dedup"
    summary = demo["manifest"]["global"]["score_top_fraction"]["summary"]
    cut = [r for r in ledger if r["stage"] == "score_top_fraction"]
    assert summary["kept"] == -(-9 * summary["rows"] // 10) and len(cut) == summary["rows"] - summary["kept"]


def test_manifest_and_stats_agree_with_ledger(demo):
    out = demo["out"]
    manifest = read_manifest(out)
    stats = compute_stats(out)
    assert manifest["counts"]["dropped"] == sum(manifest["drops"].values())
    assert json.dumps(stats)  # serialisable for the report
    sizes = json.loads((out / "pairs" / "sizes.json").read_text())
    assert sum(sizes.values()) == manifest["kinds"]["pair"]["count"]
    for kind in ("pair", "doc", "text"):  # the token totals the trainer's mixture plans with
        tokens = read_sidecars(out, kind, columns=["token_count"]).column("token_count").to_pylist()
        assert stats["kinds"][kind]["token_count"]["sum"] == sum(tokens) > 0
        assert len(stats["kinds"][kind]["tokenizers"]) == 1
    # full shards: the pairs of several partitions in shards of 16 (only the last short; cut per
    # partition they were 7/8/5/3/2/1), so a shard holds several partitions' samples
    cap = manifest["recipe"]["output"]["shard_max_samples"]
    pairs = [s["count"] for s in manifest["kinds"]["pair"]["shards"]]
    assert pairs[:-1] == [cap] * (len(pairs) - 1) and 0 < pairs[-1] <= cap and len(pairs) >= 2, pairs
    assert verify(out).ok


def test_every_stage_has_its_time_and_rows_in_the_manifest(demo):
    """`stages`: each stage of the recipe, in its order, timed (> 0: no timing beyond that), and
    its rows in less rows out are the ledger's drops by it (a global stage that removes segments
    also drops the documents it empties later, in the ledger under its name)."""
    manifest = read_manifest(demo["out"])
    names = [cfg.get("name") or cfg["kind"] for cfg in manifest["recipe"]["stages"]]
    stages = manifest["stages"]
    assert sorted(stages, key=lambda n: stages[n]["order"]) == names
    drops = Counter(r["stage"] for r in read_ledger(demo["out"], columns=["stage", "outcome"]).to_pylist()
                    if r["outcome"] == "dropped")
    for name, t in stages.items():
        assert t["wall_s"] > 0 and t["cpu_s"] > 0, name
        assert t["rows_in"] >= t["rows_out"] >= 0, name
        if t["pass"] == "rows" or manifest["global"][name]["decides_on"] == "rows":
            assert t["rows_in"] - t["rows_out"] == drops[name], name
        else:
            assert t["rows_in"] - t["rows_out"] <= drops[name], name
    assert stages["download"]["rows_in"] > 0 and stages["download"]["pass"] == "rows"
    assert stages["near_dedup"]["pass"] == "global" and "wall_s" not in manifest["global"]["near_dedup"]
    text = format_stats(compute_stats(demo["out"]))
    assert all(f"\n  {n}" in text for n in names) and "stage times" in text


def test_no_intermediate_or_temporary_files_left(demo):
    out = demo["out"]
    assert not list(out.rglob("*.tmp"))
    assert not list((out / "_work").glob("seg*/*.parquet"))


def test_stock_webdataset_reads_pairs(demo):
    import webdataset as wds

    urls = shard_urls(demo["out"], "pair")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == demo["manifest"]["kinds"]["pair"]["count"]
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for s in samples:
        assert s["jpg"].size[0] >= 32 and s["jpg"].mode == "RGB"
        assert isinstance(s["txt"], str) and len(s["txt"]) >= 5
        assert s["json"]["key"] == s["__key__"] and s["json"]["caption"] == s["txt"]


def _openclip_args(shards: str, batch_size: int, train: bool):
    import argparse

    return argparse.Namespace(
        train_data=shards if train else None,
        val_data=None if train else shards,
        train_num_samples=None,
        val_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch_size,
        workers=0,
        world_size=1,
    )


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_open_clip_loader_reads_pairs(demo, train):
    """open_clip_train's own get_wds_dataset, with sizes.json for the train-set length."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    out = demo["out"]
    n_shards = len(read_manifest(out)["kinds"]["pair"]["shards"])
    shards = str(out / "pairs" / f"{{00000..{n_shards - 1:05d}}}.tar")
    preprocess = open_clip.image_transform(64, is_train=False)
    tokenizer = open_clip.get_tokenizer("RN50")  # the BPE vocabulary ships inside open_clip
    info = get_wds_dataset(_openclip_args(shards, 4, train), preprocess, is_train=train, tokenizer=tokenizer)
    expected = demo["manifest"]["kinds"]["pair"]["count"]
    if train:
        assert info.dataloader.num_samples >= expected  # rounded up to whole batches
    seen = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 64, 64)
        assert texts.shape[0] == images.shape[0]
        seen += images.shape[0]
    assert seen == expected if not train else seen >= expected - 4


def test_unpackable_format_without_image_stage_is_dropped_not_fatal(tmp_path, shared_cluster):
    """A recipe with no image stage meets a GIF: the run finishes, the GIF is one ledger row."""
    from PIL import Image
    from skimage import data as skdata

    from curate.recipe import parse_recipe

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(skdata.coffee()).save(folder / "coffee.jpg", quality=80)
    Image.fromarray(skdata.chelsea()).convert("P").save(folder / "cat.gif")
    for name in ("coffee", "cat"):
        (folder / f"{name}.txt").write_text(f"a photograph of a {name}")
    recipe = parse_recipe({
        "name": "no-image-stage",
        "sources": [{"kind": "image_folder", "name": "f", "path": str(folder)}],
        "output": {"path": str(tmp_path / "out")},
        "cluster": {"n_workers": 1, "dashboard": False},
    })
    manifest = shared_cluster.run(recipe)
    ledger = {r["id"]: r for r in read_ledger(tmp_path / "out").to_pylist()}
    assert ledger["f:coffee.jpg"]["outcome"] == "kept"
    gif = ledger["f:cat.gif"]
    assert (gif["stage"], gif["drop_reason"]) == ("pack", "unsupported_format")
    assert manifest["counts"] == {"partitions": 1, "inputs": 2, "kept": 1, "dropped": 1}
    assert verify(tmp_path / "out").ok


def test_documents_keep_their_images_and_lose_repeated_paragraphs(demo):
    """Docs: each image segment names a KEY.N.jpg of its sample (fetched from loopback, resized);
    the cookie notice every page repeats survives in exactly one document (paragraph dedup removes
    the others' copies as segments, recorded in the sidecar's count) and the logo on every page in
    none (doc_image_dedup, max_occurrences 3); token counts come with the tokenizer's id, for
    every kind."""
    import webdataset as wds

    from tools.demo.docs import COOKIE_NOTICE

    out = demo["out"]
    samples = list(wds.WebDataset(shard_urls(out, "doc"), shardshuffle=False))
    assert len(samples) == read_manifest(out)["kinds"]["doc"]["count"] == 8
    notices = 0
    for sample in samples:
        meta = json.loads(sample["json"])
        images = [s for s in meta["segments"] if s["type"] == "image"]
        assert images and [s["image"] for s in images] == list(range(len(images)))
        assert not any(s["url"].endswith("/img/logo.jpg") for s in images)
        for s in images:
            assert sample[f"{s['image']}.jpg"][:3] == b"\xff\xd8\xff" and s["url"].startswith("http://news.demo.test:")
        texts = [s["text"] for s in meta["segments"] if s["type"] == "text"]
        assert not any("Copyright Demo News" in t or "Home | Topics" in t for t in texts)  # boilerplate out
        notices += texts.count(COOKIE_NOTICE)
    assert notices == 1
    side = read_sidecars(out, "doc", columns=["segments_dropped", "n_images", "token_count", "tokenizer"]).to_pylist()
    # 7 cookie notices (one stays) and 8 logos (in more than 3 places: gone from every page)
    assert sum(r["segments_dropped"] for r in side) == 15 and all(r["n_images"] >= 1 for r in side)
    texts = list(wds.WebDataset(shard_urls(out, "text"), shardshuffle=False).decode())
    assert len(texts) == 10 and all(len(t["txt"].split()) >= 10 and t["json"]["source"] == "corpus" for t in texts)
    for kind in ("pair", "doc", "text"):
        counts = read_sidecars(out, kind, columns=["token_count", "tokenizer"]).to_pylist()
        assert all(r["token_count"] > 0 and r["tokenizer"].startswith("tokenizer@") for r in counts)
    ledger = {r["id"]: r for r in read_ledger(out).to_pylist()}
    truncated = ledger["crawl:crawl.warc.gz#error"]
    assert (truncated["stage"], truncated["drop_reason"]) == ("source", "read_error")
    dead = [r for r in ledger.values() if r["drop_reason"] == "too_few_images"]
    assert len(dead) == 1 and dead[0]["segments_dropped"] >= 1  # its image 404'd: the segment went first


def test_sidecars_hold_texts_and_the_url_lists_columns(demo):
    """The text sidecar holds each record's text, exactly its KEY.txt; the URL list's extra column
    (license) reaches the pair sidecar as `meta_license`, typed as the csv declares it (text), and
    so do the other sources' carried values (the mapped folder's json), whichever shard they share;
    null for pairs that carry none."""
    import pyarrow as pa
    import webdataset as wds

    out = demo["out"]
    txt = {s["__key__"]: s["txt"].decode() for s in wds.WebDataset(shard_urls(out, "text"), shardshuffle=False)}
    side = read_sidecars(out, "text", columns=["key", "text"])
    assert side.schema.field("text").type == pa.string() and dict(zip(*side.to_pydict().values())) == txt
    pairs = read_sidecars(out, "pair", columns=["source", "meta_license"])
    assert pairs.schema.field("meta_license").type == pa.string()
    by_source = Counter((r["source"], r["meta_license"]) for r in pairs.to_pylist())
    licenses = {src: {lic for s, lic in by_source if s == src} for src, _ in by_source}
    assert licenses["web"] == {"cc0"} and licenses["folder"] == {None}, licenses
    assert licenses["mapped"] == {"CC0-1.0", "public-domain", "unknown"}, licenses


def test_safety_and_quality_stages_leave_their_marks(demo):
    """The demo's score heads (RANDOM weights) fill the pair and doc sidecars (a doc's from its
    images, each image's score in its segment); face_blur and pii_redact record their counts per
    sample and in the manifest; the blocklists dropped what they list."""
    import json

    out = demo["out"]
    scores = ["clip_score", "aesthetic_score", "nsfw_score", "watermark_score"]
    for kind in ("pair", "doc"):
        side = read_sidecars(out, kind, columns=["key", *scores, "faces_blurred", "pii_emails"]).to_pylist()
        assert side and all(r[c] is not None for r in side for c in scores), kind
        assert all(r["faces_blurred"] is not None and r["pii_emails"] is not None for r in side), kind
    manifest = read_manifest(out)
    counts = {name: t.get("counts", {}) for name, t in manifest["stages"].items()}
    assert counts["face_blur"]["faces"] >= 1 and counts["url_blocklist"] == {"domains.txt": 1}
    assert counts["hash_blocklist"] == {"takedowns.sha256": 1}
    blocked = [r for r in read_ledger(out, columns=["drop_reason", "stage"]).to_pylist()
               if r["drop_reason"] == "blocklisted"]
    assert sorted(r["stage"] for r in blocked) == ["hash_blocklist", "url_blocklist"]
    import webdataset as wds

    first = next(iter(wds.WebDataset(shard_urls(out, "doc"), shardshuffle=False)))
    images = [s for s in json.loads(first["json"])["segments"] if s["type"] == "image"]
    assert images and all(isinstance(s.get("nsfw_score"), float) for s in images), images
