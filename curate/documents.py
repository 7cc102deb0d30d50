"""Documents inside a record: the segments of a `doc`, the paragraphs of a `text`, and the one
way to remove some of them with a reason (DESIGN.md: a segment dropped inside a document is
recorded in the document's `segment_drops`, and the ledger carries per-document counts).

A doc's `segments` is a JSON list in reading order:

    {"type": "text", "text": "..."}
    {"type": "image", "url": "https://...", "alt": "..."}              before its image is fetched
    {"type": "image", "image": i, "url": "...", "alt": "..."}          after: i indexes `images`,
                                                                       `image_formats`, ...

Image indices are dense and in reading order: removing an image segment removes its bytes from
the image lists and renumbers the later ones, so `KEY.<i>.jpg` in a tar always matches the
segment that names `i`.

A text record's segments are its paragraphs: `text` split on blank lines. Removing one rewrites
`text` without it.

Every stage that reads the words of a record (language, quality rules, MinHash, decontamination,
token counts) goes through `record_text`, so a pair's caption, a doc's text segments and a text
record's body are judged the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A pair's image column -> the doc's list of it, aligned with the image indices of its segments.
DOC_IMAGE_FIELDS: dict[str, str] = {
    "image": "images",
    "image_format": "image_formats",
    "image_sha256": "image_sha256s",
    "image_nbytes": "image_nbytes_list",
    "width": "image_widths",
    "height": "image_heights",
    "original_width": "image_original_widths",
    "original_height": "image_original_heights",
}
IMAGE_LISTS = tuple(DOC_IMAGE_FIELDS.values())
# A doc column named `<column>_per_image` is a list aligned with `images` (a model stage's value per
# image that is too big for the segments JSON: an embedding); removing an image removes its entry.
PER_IMAGE = "_per_image"
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
_WORD = re.compile(r"\w+", re.UNICODE)


def load_segments(row: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(row.get("segments") or "[]")


def dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def paragraphs(text: str | None) -> list[str]:
    """A text record's segments: its paragraphs (blank-line separated), stripped, empty ones out."""
    return [p.strip() for p in PARAGRAPH_BREAK.split(text or "") if p.strip()]


def text_segments(kind: str, row: dict[str, Any]) -> list[str]:
    """The texts of a record, in order: a caption, a doc's text segments, a text's paragraphs."""
    if kind == "pair":
        return [row["caption"]] if row.get("caption") else []
    if kind == "doc":
        return [s.get("text") or "" for s in load_segments(row) if s.get("type") == "text"]
    if kind == "text":
        return paragraphs(row.get("text"))
    raise ValueError(f"unknown record kind {kind!r}")


def record_text(kind: str, row: dict[str, Any]) -> str:
    """All the words of a record as one string (segments joined by a blank line)."""
    if kind == "text":
        return row.get("text") or ""
    return "\n\n".join(text_segments(kind, row))


def words(text: str) -> list[str]:
    """Words as the document rules count them (runs of word characters, any script)."""
    return _WORD.findall(text)


def image_segments(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in load_segments(row) if s.get("type") == "image"]


def _summary(segment: dict[str, Any], limit: int = 80) -> dict[str, Any]:
    """What a segment_drops entry keeps of the segment: its type and url or a text excerpt."""
    out: dict[str, Any] = {"type": segment.get("type")}
    if segment.get("type") == "image":
        out["url"] = segment.get("url")
    else:
        text = segment.get("text") or ""
        out["excerpt"] = text[:limit]
    return out


def append_drops(row: dict[str, Any], drops: list[dict[str, Any]]) -> None:
    if drops:
        row["segment_drops"] = dump_json(json.loads(row.get("segment_drops") or "[]") + drops)


def remove_segments(kind: str, row: dict[str, Any], drops: dict[int, tuple[str, str]],
                    stage: str | None = None) -> int:
    """Remove segments of a doc (indices into `segments`) or paragraphs of a text (indices into
    `paragraphs(text)`) with their (reason, detail), by `stage`; record each in `segment_drops`
    with the index it had when it was removed. Image lists of a doc are renumbered. Returns how
    many went."""
    if not drops:
        return 0
    by = {"stage": stage} if stage else {}
    if kind == "text":
        paras = paragraphs(row.get("text"))
        gone = [i for i in sorted(drops) if 0 <= i < len(paras)]
        append_drops(row, [{"segment": i, "type": "text", "excerpt": paras[i][:80], **by,
                            "reason": drops[i][0], "detail": drops[i][1]} for i in gone])
        row["text"] = "\n\n".join(p for i, p in enumerate(paras) if i not in drops)
        return len(gone)
    if kind != "doc":
        raise ValueError(f"{kind} records have no segments")
    segments = load_segments(row)
    aligned = [*IMAGE_LISTS, *(name for name in row if name.endswith(PER_IMAGE))]
    lists = {name: list(row.get(name) or []) for name in aligned}
    kept, recorded, removed_images = [], [], set()
    for i, seg in enumerate(segments):
        if i not in drops:
            kept.append(seg)
            continue
        reason, detail = drops[i]
        recorded.append({"segment": i, **_summary(seg), **by, "reason": reason, "detail": detail})
        if seg.get("type") == "image" and seg.get("image") is not None:
            removed_images.add(int(seg["image"]))
    if removed_images:
        remap, n = {}, 0
        for old in range(max(len(v) for v in lists.values()) if any(lists.values()) else 0):
            if old not in removed_images:
                remap[old] = n
                n += 1
        for seg in kept:
            if seg.get("type") == "image" and seg.get("image") is not None:
                seg["image"] = remap[int(seg["image"])]
        for name, values in lists.items():
            if row.get(name) is not None:
                row[name] = [v for j, v in enumerate(values) if j not in removed_images]
    row["segments"] = dump_json(kept)
    append_drops(row, recorded)
    return len(recorded)


EMPTY_DOCUMENT = "empty_document"


def is_empty(kind: str, row: dict[str, Any]) -> bool:
    """A doc with no segment left, or a text with no paragraph: nothing to train on."""
    if kind == "doc":
        return not load_segments(row)
    if kind == "text":
        return not paragraphs(row.get("text"))
    return False


def image_views(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One pair-shaped dict per image of a doc (`image`, `image_format`, `width`, ...): what a
    per-image stage (the image stage, the size filters) reads and writes; with the numbers a model
    stage wrote into the image's segment (`clip_score`, `nsfw_score`: a score filter reads them)."""
    n = len(row.get("images") or [])
    lists = {pair: list(row.get(name) or [None] * n) for pair, name in DOC_IMAGE_FIELDS.items()}
    scores: dict[int, dict[str, Any]] = {}
    for seg in load_segments(row):
        if seg.get("type") == "image" and seg.get("image") is not None:
            scores[int(seg["image"])] = {k: v for k, v in seg.items() if k != "image"
                                         and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [{"id": row.get("id"), "url": None, **scores.get(i, {}), **{pair: lists[pair][i] for pair in lists}}
            for i in range(n)]


def store_image_views(row: dict[str, Any], views: list[dict[str, Any]]) -> None:
    """Write per-image views back into the doc's image lists."""
    for pair, name in DOC_IMAGE_FIELDS.items():
        row[name] = [v.get(pair) for v in views]


def image_segment_index(row: dict[str, Any]) -> dict[int, int]:
    """Image index -> the index of the segment that shows it."""
    return {int(s["image"]): i for i, s in enumerate(load_segments(row))
            if s.get("type") == "image" and s.get("image") is not None}


def segment_counts(kind: str, row: dict[str, Any]) -> tuple[int | None, int | None]:
    """(segments seen, segments dropped) of a doc or text, for the ledger; (None, None) for pairs."""
    if kind == "pair":
        return None, None
    dropped = len(json.loads(row.get("segment_drops") or "[]"))
    present = len(load_segments(row)) if kind == "doc" else len(paragraphs(row.get("text")))
    return present + dropped, dropped


def table_kind(schema: Any) -> str:
    """The record kind of a batch, from its columns: a row stage that applies to several kinds
    is handed one kind's batches at a time and tells them apart by what they hold."""
    names = set(schema.names)
    if "segments" in names:
        return "doc"
    if "caption" in names:
        return "pair"
    if "text" in names:
        return "text"
    raise ValueError(f"a batch with columns {sorted(names)} is no record kind")
