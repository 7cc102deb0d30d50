"""The model stages on the images inside documents (curate/stages/doc_images.py): clip_score, the
score heads and score_filter see each image of a doc as a pair; scores land in the image's
segment and, aggregated, in the doc's column; embeddings per image stay aligned with `images`; a
failed or cut image removes its segment, not the document. Tiny models with RANDOM weights: the
mechanics, not the scores' quality."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from skimage import data as skdata

from curate.contract import record_schema
from curate.documents import dump_json, image_views, load_segments
from curate.stages import STAGES, build_stage
from curate.stages.base import counting
from curate.stages.clip_score import ClipScoreStage
from curate.stages.doc_images import image_caption
from curate.stages.score_filter import ScoreFilter

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
    from tools.convert_heads import write_random_head

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
