"""The model stages on the images inside documents (curate/stages/doc_images.py): clip_score, the
score heads and score_filter see each image of a doc as a pair; scores land in the image's
segment and, aggregated, in the doc's column; embeddings per image stay aligned with `images`; a
failed or cut image removes its segment, not the document. Tiny models with RANDOM weights: the
mechanics, not the scores' quality."""

from __future__ import annotations

import io
import json

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from curate.contract import record_schema
from curate.documents import dump_json, image_views, load_segments
from curate.engine.driver import live_schema, read_live
from curate.stages import STAGES, build_stage
from curate.stages.base import counting
from curate.stages.clip_score import ClipScoreStage
from curate.stages.doc_images import image_caption
from curate.stages.near_dedup import NearDedup
from curate.stages.phash import PhashStage
from curate.stages.score_filter import ScoreFilter
from curate.stages.semantic_dedup import SemanticDedup
from tools.convert_heads import write_random_head

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def _doc(doc_id: str, images: list[bytes | None], alts: list[str]) -> dict:
    segments = [{"type": "text", "text": f"Opening words of {doc_id}."}]
    for i, alt in enumerate(alts):
        segments.append({"type": "image", "image": i, "url": f"http://127.0.0.1:1/{doc_id}/{i}.jpg", "alt": alt})
        segments.append({"type": "text", "text": f"Words after image {i} of {doc_id}."})
    return {"id": doc_id, "source": "t", "segments": dump_json(segments), "images": images,
            "image_formats": ["jpg"] * len(images), "image_sha256s": [None] * len(images),
            "image_nbytes_list": [len(b or b"") for b in images], "image_widths": [8] * len(images),
            "image_heights": [8] * len(images), "image_original_widths": [8] * len(images),
            "image_original_heights": [8] * len(images)}


@pytest.fixture(scope="module")
def docs() -> pa.Table:
    astro, coffee = _jpeg(skdata.astronaut()[::4, ::4]), _jpeg(skdata.coffee()[::4, ::4])
    rows = [_doc("d:1", [astro, coffee], ["an astronaut", ""]),
            _doc("d:2", [b"not an image", coffee], ["broken", "a cup"]),
            _doc("d:3", [b"not an image either"], ["only a broken image"]),
            {**_doc("d:4", [astro], ["dropped earlier"]), "drop_stage": "x", "drop_reason": "earlier"}]
    return pa.Table.from_pylist(rows, schema=record_schema("doc"))


@pytest.fixture(scope="module")
def scored(docs) -> pa.Table:
    stage = ClipScoreStage(ClipScoreStage.Config(model="ViT-B-32", pretrained=None, model_overrides=TINY))
    return stage.process(docs)


def test_image_caption_is_the_alt_text_or_the_nearest_text():
    segments = [{"type": "text", "text": "before"}, {"type": "image", "alt": "the alt"},
                {"type": "image", "alt": ""}, {"type": "text", "text": "after"}]
    assert image_caption(segments, 1) == "the alt"
    assert image_caption(segments, 1, "nearest_text") == "before"
    assert image_caption(segments, 2) == "after"  # no alt: distance 1 is an image, 2 holds both; before first
    assert image_caption([{"type": "image", "alt": ""}], 0) == ""


def test_clip_score_scores_each_image_of_a_doc(scored):
    rows = {r["id"]: r for r in scored.to_pylist()}
    one = rows["d:1"]
    images = [s for s in load_segments(one) if s["type"] == "image"]
    assert [type(s.get("clip_score")) for s in images] == [float, float]
    assert one["clip_score"] == pytest.approx(np.mean([s["clip_score"] for s in images]), abs=1e-5)
    embeddings = one["clip_embedding_per_image"]
    assert len(embeddings) == 2 and all(len(e) == 32 for e in embeddings)
    assert abs(np.linalg.norm(np.asarray(embeddings[0], np.float32)) - 1) < 1e-2
    # a broken image's segment removed with the reason, the lists renumbered and aligned
    two = rows["d:2"]
    assert two["drop_reason"] is None and len(two["images"]) == 1 and len(two["clip_embedding_per_image"]) == 1
    drops = json.loads(two["segment_drops"])
    assert [(d["stage"], d["reason"]) for d in drops] == [("clip_score", "decode_error")]
    assert [s["image"] for s in load_segments(two) if s["type"] == "image"] == [0]
    # a doc whose every image failed keeps its text (segments remain): not empty
    assert rows["d:3"]["drop_reason"] is None and rows["d:3"]["images"] == []
    assert rows["d:4"]["drop_reason"] == "earlier" and rows["d:4"]["clip_score"] is None


def test_score_filter_cuts_images_of_docs_by_their_segment_scores(scored):
    one = next(r for r in scored.to_pylist() if r["id"] == "d:1")
    values = sorted(s["clip_score"] for s in load_segments(one) if s["type"] == "image")
    assert [v["clip_score"] for v in image_views(one)] == [s["clip_score"] for s in load_segments(one)
                                                           if s["type"] == "image"]
    cut = build_stage(ScoreFilter.Config(max_score=float(np.mean(values))))
    with counting():
        out = {r["id"]: r for r in cut.process(scored).to_pylist()}
    kept = out["d:1"]
    assert kept["drop_reason"] is None and len(kept["images"]) == 1
    assert [s["clip_score"] for s in load_segments(kept) if s["type"] == "image"] == [values[0]]
    assert json.loads(kept["segment_drops"])[-1]["reason"] == "clip_score_high"
    assert len(kept["clip_embedding_per_image"]) == 1  # the embedding went with its image


def test_score_heads_score_each_image_of_a_doc(tmp_path, scored):
    """RANDOM-weight heads: the aesthetic and NSFW heads read each image's clip_score embedding,
    the watermark model its bytes; a doc's column is the mean (aesthetic) or its worst image (max)."""
    heads = {kind: write_random_head(tmp_path / f"{kind}.safetensors", kind, model, None, dim, seed=3)
             for kind, model, dim in [("aesthetic", "ViT-B-32", 32), ("nsfw", "ViT-B-32", 32),
                                      ("watermark", "test_efficientnet", None)]}
    out = scored
    for kind in ("aesthetic", "nsfw", "watermark"):
        out = build_stage(STAGES[f"{kind}_score"].Config(weights=str(heads[kind]))).process(out)
    one = next(r for r in out.to_pylist() if r["id"] == "d:1")
    images = [s for s in load_segments(one) if s["type"] == "image"]
    for column, aggregate in (("aesthetic_score", np.mean), ("nsfw_score", max), ("watermark_score", max)):
        values = [s[column] for s in images]
        assert len(values) == 2 and all(isinstance(v, float) for v in values)
        assert one[column] == pytest.approx(aggregate(values), abs=1e-5)
    assert 0 < one["watermark_score"] < 1 and 0 < one["nsfw_score"] < 1


def test_semantic_dedup_groups_doc_images_and_with_across_kinds_pairs_too():
    """Two docs sharing an image keep it where it scores best, a pair copying a pair goes whole;
    with across_kinds a doc image that copies a pair's image is removed from the doc too (the
    pair has the better score); decisions name segments for docs, nothing for pairs."""

    rng = np.random.default_rng(0)
    a, b, c = (v / np.linalg.norm(v) for v in rng.standard_normal((3, 16)))

    def near(v):
        w = v + 0.01 * rng.standard_normal(16)
        return (w / np.linalg.norm(w)).astype(np.float16).tolist()

    def doc(images, scores):
        segments = [{"type": "text", "text": "words"}]
        for i, s in enumerate(scores):
            segments += [{"type": "image", "image": i, "clip_score": s}, {"type": "text", "text": "more"}]
        return json.dumps(segments), images

    d1, d1_images = doc([near(a), near(b)], [0.3, 0.2])
    d2, d2_images = doc([near(b)], [0.9])
    frame = pd.DataFrame({
        "id": ["p:1", "p:2", "p:3", "d:1", "d:2"],
        "_partition": [0, 0, 1, 2, 2],
        "clip_embedding": [near(a), near(a), near(c), None, None],
        "clip_score": [0.5, 0.4, 0.1, 0.25, 0.9],
        "clip_embedding_per_image": [None, None, None, d1_images, d2_images],
        "segments": [None, None, None, d1, d2],
    })

    def decide(**cfg):
        stage = SemanticDedup(SemanticDedup.Config(threshold=0.95, bands=16, bits_per_band=8, docs=True, **cfg))
        with dask.config.set({"dataframe.convert-string": False}):  # lists stay lists (parquet's do)
            decisions = stage.decide(dd.from_pandas(frame, npartitions=2)).compute()
        return {r["id"]: r for r in decisions.to_dict("records")}, stage.summary()

    # by default each kind on its own: the pairs' copy goes, the docs' shared image goes from d:1
    rows, _ = decide()
    assert set(rows) == {"p:2", "d:1"} and json.loads(rows["d:1"]["segments"]) == [3]
    rows, summary = decide(across_kinds=True)
    assert set(rows) == {"p:2", "d:1"}
    assert rows["p:2"]["drop_reason"] == "duplicate" and pd.isna(rows["p:2"]["segments"])  # None, or NaN on pandas 3
    assert "p:1" in rows["p:2"]["drop_detail"]
    assert json.loads(rows["d:1"]["segments"]) == [1, 3]  # both its images: one copies p:1, one d:2's
    assert "p:1" in rows["d:1"]["drop_detail"] and "d:2 segment 1" in rows["d:1"]["drop_detail"]
    assert summary["groups"] == 2


def test_a_global_pass_over_two_kinds_reads_the_columns_each_has(tmp_path):
    """The runner's read of a global stage's input over pair and doc files (read_live): a column
    one kind lacks (a pair's `segments`) comes as nulls, typed as the other kind has it, and the
    input's schema (live_schema) types every column; semantic_dedup with docs decides over both."""
    vec = pa.list_(pa.float16())
    rng = np.random.default_rng(1)
    v = (rng.standard_normal(16) / 4).astype(np.float16).tolist()
    pairs = pa.table({"id": ["p:1"], "_partition": pa.array([0], pa.int32()), "drop_reason": pa.nulls(1, pa.string()),
                      "clip_embedding": pa.array([v], vec), "clip_score": pa.array([0.5], pa.float32()),
                      "clip_embedding_per_image": pa.nulls(1, pa.list_(vec))})
    segments = json.dumps([{"type": "image", "image": 0, "clip_score": 0.1},
                           {"type": "image", "image": 1, "clip_score": 0.2}])
    docs = pa.table({"id": ["d:1"], "_partition": pa.array([1], pa.int32()), "drop_reason": pa.nulls(1, pa.string()),
                     "clip_embedding": pa.nulls(1, vec), "clip_score": pa.array([0.15], pa.float32()),
                     "clip_embedding_per_image": pa.array([[v, v]], pa.list_(vec)), "segments": [segments]})
    files = [tmp_path / "00000.parquet", tmp_path / "00001.parquet"]
    pq.write_table(pairs, files[0])
    pq.write_table(docs, files[1])
    stage = SemanticDedup(SemanticDedup.Config(docs=True, across_kinds=True))
    schema = live_schema(files, stage.columns)
    assert schema.field("segments").type == pa.string() and schema.field("clip_embedding").type == vec
    live = read_live(files, stage.columns, ["pair", "doc"])
    assert sorted(live.compute()["id"]) == ["d:1", "p:1"]
    decisions = stage.decide(live).compute()
    assert decisions.to_dict("records") == [{
        "id": "d:1", "_partition": 1, "drop_reason": "duplicate", "segments": "[0, 1]",
        "drop_detail": "image embedding within cosine 0.95 of p:1"}]


def test_phash_and_near_dedup_on_doc_images(docs):
    """phash writes each doc image's hash into its segment (an int, all 64 bits); near_dedup with
    docs removes a doc's copy of an image another doc keeps, and with across_kinds a pair's copy."""
    hashed = PhashStage(PhashStage.Config()).process(docs)
    rows = {r["id"]: r for r in hashed.to_pylist()}
    one = [s for s in load_segments(rows["d:1"]) if s["type"] == "image"]
    assert all(isinstance(s["image_phash"], int) for s in one) and rows["d:1"]["image_phash"] == 0
    assert json.loads(rows["d:2"]["segment_drops"])[0]["reason"] == "decode_error"  # "not an image"
    astro, coffee = (s["image_phash"] for s in one)
    coffee2 = next(s["image_phash"] for s in load_segments(rows["d:2"]) if s["type"] == "image")
    assert coffee2 == coffee
    frame = pd.DataFrame({
        "id": ["p:1", "d:1", "d:2"], "_partition": [0, 1, 1],
        "image_phash": pd.array([astro, 0, 0], dtype="Int64"),
        "segments": [None, rows["d:1"]["segments"], rows["d:2"]["segments"]],
    })

    def decide(**cfg):
        stage = NearDedup(NearDedup.Config(docs=True, **cfg))
        with dask.config.set({"dataframe.convert-string": False}):
            out = stage.decide(dd.from_pandas(frame, npartitions=2)).compute()
        return {r["id"]: r for r in out.to_dict("records")}

    within = decide()  # d:1 and d:2 share the coffee image: the smaller id keeps it
    assert set(within) == {"d:2"} and json.loads(within["d:2"]["segments"]) == [2]  # after its broken image went
    across = decide(across_kinds=True)  # and p:1's astronaut is d:1's: no scores, the smaller id ("d:1...") keeps it
    assert set(across) == {"d:2", "p:1"} and pd.isna(across["p:1"]["segments"])
    assert "d:1 segment 1" in across["p:1"]["drop_detail"]
