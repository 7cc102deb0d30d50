"""Text decontamination: a record holding a word n-gram of an eval item is dropped with
`eval_overlap`, whatever its case and punctuation; short items are indexed whole; a bad eval set
fails at recipe load."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.contract import record_schema
from curate.documents import dump_json
from curate.stages.text_decontaminate import TextDecontaminate

QUESTION = ("Which river flows through the city of Vienna and then continues east towards "
            "Bratislava and Budapest before reaching the Black Sea")


@pytest.fixture
def eval_jsonl(tmp_path):
    path = tmp_path / "riverqa.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in [
        QUESTION, "What is the capital city of the country of Austria today", "Too short"]) + "\n")
    return path


def _run(config, kind, rows):
    table = pa.Table.from_pylist(rows, schema=record_schema(kind))
    return TextDecontaminate(config).process(table).to_pylist()


def test_overlapping_texts_and_docs_are_dropped(eval_jsonl):
    cfg = TextDecontaminate.Config(eval_texts=str(eval_jsonl), ngram=8)
    leaked = "Quiz night! which RIVER flows through the city of Vienna, and then continues east? Nobody knew."
    texts = _run(cfg, "text", [
        {"id": "t:1", "source": "t", "text": leaked},
        {"id": "t:2", "source": "t", "text": "The river Danube is long; this sentence shares only short runs."},
        {"id": "t:3", "source": "t", "text": "Is the capital city of the country of Austria today Vienna?"},
        {"id": "t:4", "source": "t", "text": "Too short to matter: too short.", "drop_reason": "x",
         "drop_stage": "earlier"},
    ])
    assert texts[0]["drop_reason"] == "eval_overlap" and texts[0]["drop_detail"].startswith("riverqa: item 0 (Which river")
    assert texts[1]["drop_reason"] is None
    assert texts[2]["drop_reason"] == "eval_overlap" and "item 1" in texts[2]["drop_detail"]  # shorter than n: whole
    assert texts[3]["drop_reason"] == "x"  # already dropped: untouched
    segments = [{"type": "text", "text": "Intro paragraph."}, {"type": "image", "url": "http://127.0.0.1/x.jpg"},
                {"type": "text", "text": QUESTION.upper()}]
    docs = _run(cfg, "doc", [{"id": "d:1", "source": "d", "segments": dump_json(segments)}])
    assert docs[0]["drop_reason"] == "eval_overlap"


def test_bad_eval_sets_fail_at_load(tmp_path):
    with pytest.raises(ValidationError, match="no such file"):
        TextDecontaminate.Config(eval_texts=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValidationError, match="no items"):
        TextDecontaminate.Config(eval_texts=str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ValidationError, match="line 1 has no 'text'"):
        TextDecontaminate.Config(eval_texts=str(tmp_path / "bad.jsonl"))
