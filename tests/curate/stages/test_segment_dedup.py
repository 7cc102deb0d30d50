"""Segment dedup across documents: the first occurrence of a paragraph or an image (smallest
document id, then the earliest segment) stays, every other occurrence is removed as a segment,
not as a document; a document left empty is dropped; an image in too many places goes from all
of them; the decisions do not depend on the partitioning."""

from __future__ import annotations

import hashlib
import json

import dask
import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pytest

from curate.contract import record_schema
from curate.documents import dump_json
from curate.stages.segment_dedup import HASH_COLUMN, NO_HASH, ParagraphDedup, ParagraphHash, paragraph_digest
from curate.engine.steps import apply_decision

COOKIE = "We use cookies to improve your experience on this site."
PITCH = "Subscribe to our newsletter for weekly updates and offers."


def _doc(doc_id, *texts, image_at=None):
    segments = [{"type": "text", "text": t} for t in texts]
    if image_at is not None:
        segments.insert(image_at, {"type": "image", "url": "http://127.0.0.1/a.jpg", "alt": ""})
    return {"id": doc_id, "source": "s", "segments": dump_json(segments)}


def _hashed(kind, rows):
    table = pa.Table.from_pylist(rows, schema=record_schema(kind))
    return ParagraphHash(ParagraphHash.Config(min_chars=20)).process(table).to_pylist()


def test_hashes_are_per_segment_normalised_and_skip_images_and_short_text():
    row = _hashed("doc", [_doc("s:a", COOKIE, "  WE use   cookies to improve your experience on this SITE. ",
                               "Short.", image_at=1)])[0]
    hashes = row[HASH_COLUMN]
    assert len(hashes) == 4 and hashes[1] == hashes[3] == NO_HASH  # image, under min_chars
    assert hashes[0] == hashes[2] == paragraph_digest(" ".join(COOKIE.lower().split()))


def test_text_records_hash_their_paragraphs():
    row = _hashed("text", [{"id": "t:1", "source": "t", "text": f"{COOKIE}\n\n{PITCH}\n \n{COOKIE}"}])[0]
    assert row[HASH_COLUMN][0] == row[HASH_COLUMN][2] != row[HASH_COLUMN][1]


def _live(rows, kinds, npartitions):
    frame = pd.DataFrame({
        "id": [r["id"] for r in rows],
        "_partition": [i % 3 for i in range(len(rows))],
        HASH_COLUMN: [r[HASH_COLUMN] for r in rows],
    })
    return dd.from_pandas(frame, npartitions=npartitions, sort=False)


@pytest.mark.parametrize("npartitions", [1, 2, 4])
def test_first_occurrence_kept_others_removed_as_segments(npartitions):
    docs = _hashed("doc", [
        _doc("s:b", "A first paragraph that only b has, long enough.", COOKIE),
        _doc("s:a", COOKIE, "Only in a: a paragraph about gardens and bees.", COOKIE),
        _doc("s:c", PITCH, COOKIE),
        _doc("s:d", COOKIE),
    ])
    texts = _hashed("text", [{"id": "t:1", "source": "t", "text": f"{PITCH}\n\nA paragraph only the text has here."}])
    with dask.config.set({"scheduler": "sync", "dataframe.convert-string": False}):
        out = ParagraphDedup(ParagraphDedup.Config()).decide(_live(docs + texts, None, npartitions)).compute()
    decided = {r["id"]: r for r in out.to_dict("records")}
    # the cookie notice is first in s:a (segment 0), the pitch in s:c ("s:c" < "t:1")
    assert sorted(decided) == ["s:a", "s:b", "s:c", "s:d", "t:1"]
    assert json.loads(decided["s:a"]["segments"]) == [2]  # a repeat inside the same document
    assert json.loads(decided["s:b"]["segments"]) == [1]
    assert json.loads(decided["s:c"]["segments"]) == [1]
    assert json.loads(decided["s:d"]["segments"]) == [0]
    assert json.loads(decided["t:1"]["segments"]) == [0]
    assert "s:a" in decided["s:b"]["drop_detail"]
    assert set(out["drop_reason"]) == {"duplicate"}

    # applied: segments go, the documents stay, unless nothing is left
    rows = {r["id"]: r for r in docs}
    for doc_id, row in rows.items():
        hit = decided.get(doc_id)
        apply_decision("doc", row, hit and ("paragraph_dedup", hit["drop_reason"], hit["drop_detail"],
                                             json.loads(hit["segments"])))
    assert [s["text"] for s in json.loads(rows["s:a"]["segments"])] == [
        COOKIE, "Only in a: a paragraph about gardens and bees."]
    drops = json.loads(rows["s:a"]["segment_drops"])
    assert drops[0]["segment"] == 2 and drops[0]["reason"] == "duplicate" and drops[0]["stage"] == "paragraph_dedup"
    assert rows["s:a"].get("drop_reason") is None
    assert rows["s:d"]["drop_reason"] == "empty_document"  # its only paragraph went
    assert rows["s:c"].get("drop_reason") is None and json.loads(rows["s:c"]["segments"]) == [
        {"type": "text", "text": PITCH}]
    text = texts[0]
    hit = decided["t:1"]
    apply_decision("text", text, ("paragraph_dedup", hit["drop_reason"], hit["drop_detail"], json.loads(hit["segments"])))
    assert text["text"] == "A paragraph only the text has here." and len(json.loads(text["segment_drops"])) == 1


def _image_docs():
    """Documents as the image stage leaves them: image segments index `image_sha256s`."""
    def doc(doc_id, *names):
        segments = [{"type": "text", "text": f"Text of {doc_id}."}]
        segments += [{"type": "image", "image": i, "url": f"http://127.0.0.1/{n}"} for i, n in enumerate(names)]
        return {"id": doc_id, "_partition": 0, "segments": dump_json(segments),
                "image_sha256s": [hashlib.sha256(n.encode()).hexdigest() for n in names]}
    return [doc("d:1", "a", "logo"), doc("d:2", "logo", "b", "a"), doc("d:3", "logo"), doc("d:4", "c")]


@pytest.mark.parametrize("npartitions", [1, 3])
def test_doc_images_keep_first_or_drop_frequent(npartitions):
    from curate.stages.segment_dedup import DocImageDedup

    with dask.config.set({"scheduler": "sync", "dataframe.convert-string": False}):
        live = dd.from_pandas(pd.DataFrame(_image_docs()), npartitions=npartitions, sort=False)
        first = DocImageDedup(DocImageDedup.Config()).decide(live).compute()
        frequent = DocImageDedup(DocImageDedup.Config(max_occurrences=2)).decide(live).compute()
    first = {r["id"]: (json.loads(r["segments"]), r["drop_detail"]) for r in first.to_dict("records")}
    assert first == {"d:2": ([1, 3], "image first seen in d:1"), "d:3": ([1], "image first seen in d:1")}
    frequent = {r["id"]: json.loads(r["segments"]) for r in frequent.to_dict("records")}
    assert frequent == {"d:1": [2], "d:2": [1], "d:3": [1]}  # the logo, in 3 places, goes everywhere
