"""The recipe reference (tools/reference.py): `mm1 sources` / `mm1 stages` list every registered kind
with its options from the config models; docs/recipes.md is that same reference, not stale; its
"Writing a stage of your own" example registers and runs."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pyarrow as pa

from curate.contract import record_schema
from curate.sources.base import SOURCES
from curate.stages.base import STAGES
from tools.cli import main
from tools.reference import EXAMPLE_STAGE, entries, render_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_every_kind_listed_with_its_options(capsys):
    for which, registry in (("sources", SOURCES), ("stages", STAGES)):
        assert main([which]) == 0
        out = capsys.readouterr().out
        for kind, cls in registry.items():
            assert re.search(rf"^{kind} \(", out, re.M), f"{which}: {kind} missing"
            common = {"kind", "name", "on_error", "resources"}
            for field in set(cls.Config.model_fields) - common:
                assert re.search(rf"^    {field}: ", out, re.M), f"{kind}.{field} missing"
        assert all(e.summary for e in entries(which)), "a kind without a description"


def test_one_kind_in_full(capsys):
    assert main(["stages", "image_size_filter"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("image_size_filter (applies to pair, doc)")
    assert "    min_width: int | None = None  -- >= 1" in out
    assert "    on_error: 'drop' | 'raise' = 'drop'" in out  # the options every stage has
    assert main(["sources", "image_folder"]) == 0
    assert "    path: str = required" in capsys.readouterr().out


def test_unknown_kind_is_one_message(capsys):
    assert main(["stages", "no_such_stage"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm1 stages: no stage kind 'no_such_stage'; the kinds: ") and "image_size_filter" in err
    assert "Traceback" not in err


def test_docs_recipes_md_is_not_stale():
    assert (ROOT / "docs" / "recipes.md").read_text() == render_markdown(), (
        "docs/recipes.md is stale: regenerate it with `.venv/bin/python -m tools.reference --write docs/recipes.md`")


def test_the_documented_example_stage_runs(monkeypatch):
    assert EXAMPLE_STAGE in render_markdown()
    # the doc's code as written, run as a module of its own (pydantic resolves annotations in it)
    module = types.ModuleType("caption_words_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(EXAMPLE_STAGE, "docs/recipes.md", "exec"), module.__dict__)
    namespace = module.__dict__
    try:
        cls = STAGES["caption_words_filter"]
        assert cls is namespace["CaptionWordsFilter"]
        stage = cls(cls.Config(min_words=3))
        schema = record_schema("pair")
        rows = [{"id": "s:a", "source": "s", "caption": "a red bicycle"},
                {"id": "s:b", "source": "s", "caption": "logo"},
                {"id": "s:c", "source": "s", "caption": None}]
        out = stage.process(pa.Table.from_pylist(rows, schema=schema)).to_pylist()
        assert [r["drop_reason"] for r in out] == [None, "caption_too_few_words", "caption_too_few_words"]
        assert out[1]["drop_stage"] == "caption_words_filter" and out[1]["drop_detail"] == "1 < 3"
    finally:
        STAGES.pop("caption_words_filter", None)  # the registry is shared by every test in this process
