"""Segment bookkeeping: removing segments keeps image indices dense and aligned with the image
lists, records every removal, and counts segments for the ledger."""

from __future__ import annotations

import json

from curate.documents import (
    paragraphs,
    record_text,
    remove_segments,
    segment_counts,
    table_kind,
    text_segments,
)
from curate.contract import record_schema


def _doc():
    segments = [
        {"type": "text", "text": "Title"},
        {"type": "image", "image": 0, "url": "http://h/0.jpg", "alt": "zero"},
        {"type": "text", "text": "Body"},
        {"type": "image", "image": 1, "url": "http://h/1.jpg", "alt": "one"},
        {"type": "image", "image": 2, "url": "http://h/2.jpg", "alt": "two"},
    ]
    return {
        "id": "d:1", "segments": json.dumps(segments),
        "images": [b"0", b"1", b"2"], "image_formats": ["jpg", "png", "jpg"],
        "image_sha256s": ["a", "b", "c"], "image_nbytes_list": [1, 1, 1],
        "image_widths": [10, 11, 12], "image_heights": [20, 21, 22],
    }


def test_removing_an_image_renumbers_the_rest_and_its_bytes_go():
    row = _doc()
    assert remove_segments("doc", row, {1: ("decode_error", "bad"), 2: ("duplicate", "in d:0")}, "image") == 2
    segments = json.loads(row["segments"])
    assert segments == [
        {"type": "text", "text": "Title"},
        {"type": "image", "image": 0, "url": "http://h/1.jpg", "alt": "one"},
        {"type": "image", "image": 1, "url": "http://h/2.jpg", "alt": "two"},
    ]
    assert row["images"] == [b"1", b"2"] and row["image_widths"] == [11, 12] and row["image_formats"] == ["png", "jpg"]
    drops = json.loads(row["segment_drops"])
    assert [(d["segment"], d["type"], d["reason"], d["stage"]) for d in drops] == [
        (1, "image", "decode_error", "image"), (2, "text", "duplicate", "image")]
    assert drops[0]["url"] == "http://h/0.jpg" and drops[1]["excerpt"] == "Body"
    assert segment_counts("doc", row) == (5, 2)


def test_text_paragraphs():
    row = {"text": "One.\n\n  \nTwo.\n \t\nThree."}
    assert paragraphs(row["text"]) == ["One.", "Two.", "Three."] == text_segments("text", row)
    remove_segments("text", row, {1: ("duplicate", "x")})
    assert row["text"] == "One.\n\nThree." and segment_counts("text", row) == (3, 1)
    assert record_text("doc", _doc()) == "Title\n\nBody"


def test_kinds_from_schemas():
    assert [table_kind(record_schema(k)) for k in ("pair", "doc", "text")] == ["pair", "doc", "text"]
