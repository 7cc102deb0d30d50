"""Document rules and datatrove's quality filters as stages, on real texts: English prose from
CPython's own help topics (`pydoc_data.topics`, shuffled into documents by
tools.bench.text_filters.corpus), junk of the kinds web pages hold, and a few written here. The
datatrove stages are checked against datatrove itself, called directly on the same texts."""

from __future__ import annotations

import inspect
import json
import random
import socket

import pyarrow as pa
import pytest
from pydantic import ValidationError

import curate.stages.text_quality as tq
from curate.contract import record_schema
from curate.documents import record_text
from curate.stages import STAGES
from curate.stages.text_quality import (
    C4Quality, DocRules, FineWebQuality, GopherQuality, GopherRepetition, char_repetition_ratio, special_char_ratio,
    stop_words, word_repetition_ratio, word_tokenizer,
)
from tools.bench.text_filters import corpus, topic_blocks

RULES = dict(min_images=1, max_images=30, min_words=10, max_words=2000, min_stopword_ratio=0.1,
             max_word_repetition_ratio=0.2, max_char_repetition_ratio=0.2, max_special_char_ratio=0.3)
GERMAN = ("Die Kinder spielen am Nachmittag im Garten, und die Eltern sitzen auf der Terrasse und "
          "trinken Kaffee. Wenn es regnet, bleiben sie im Haus und lesen ein Buch, das sie in der "
          "Bibliothek ausgeliehen haben.")


@pytest.fixture(scope="module")
def prose() -> list[str]:
    """Prose documents of distinct paragraphs (pydoc repeats some paragraphs across topics)."""
    paragraphs = sorted(set(topic_blocks()[0]))
    rng = random.Random(1)
    rng.shuffle(paragraphs)
    return ["\n\n".join(paragraphs[i : i + 6]) for i in range(0, 240, 6)]


def text_table(texts: list[str | None], language: list[str | None] | None = None) -> pa.Table:
    rows = [{"id": f"t:{i}", "source": "t", "text": t} for i, t in enumerate(texts)]
    schema = record_schema("text")
    if language is not None:
        schema = schema.append(pa.field("language", pa.string()))
        for row, lang in zip(rows, language):
            row["language"] = lang
    return pa.Table.from_pylist(rows, schema=schema)


def doc_row(i: int, texts: list[str], images: int = 1) -> dict:
    segments = []
    for j, text in enumerate(texts):
        segments.append({"type": "text", "text": text})
        if j < images:
            segments.append({"type": "image", "url": f"https://example.com/{i}/{j}.jpg", "alt": ""})
    segments += [{"type": "image", "url": f"https://example.com/{i}/x{k}.jpg"} for k in range(images - len(texts))]
    return {"id": f"d:{i}", "source": "d", "url": f"https://example.com/{i}", "segments": json.dumps(segments)}


def doc_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=record_schema("doc"))


def outcomes(out: pa.Table) -> list[tuple[str | None, str | None]]:
    return list(zip(out.column("drop_reason").to_pylist(), out.column("drop_detail").to_pylist()))


# ---------------------------------------------------------------------------------------------
# doc_rules
# ---------------------------------------------------------------------------------------------

def test_prose_passes_every_rule_as_docs_and_as_text(prose):
    stage = DocRules(DocRules.Config(**RULES))
    out = stage.process(doc_table([doc_row(i, p.split("\n\n"), images=2) for i, p in enumerate(prose)]))
    assert outcomes(out) == [(None, None)] * len(prose)
    assert out.schema.field("word_count").type == pa.int32()
    assert out.schema.field("stopword_ratio").type == pa.float32()
    counts = out.column("word_count").to_pylist()
    assert all(50 < n < 2000 for n in counts)
    assert all(0.3 < r < 0.7 for r in out.column("stopword_ratio").to_pylist())  # English prose: ~half
    text_out = stage.process(text_table(prose))
    assert outcomes(text_out) == [(None, None)] * len(prose)
    assert text_out.column("word_count").to_pylist() == counts  # a doc's words are its segments'


def test_each_rule_has_its_code_and_names_value_and_bound(prose):
    spam = "Buy cheap watches online today and save money on every order.\n"
    rng = random.Random(0)
    symbols = " ".join("".join(rng.choice("#$%&*+=<>|~^@/") for _ in range(6)) for _ in range(200))
    rows = [
        doc_row(0, [prose[0]], images=0),
        doc_row(1, [prose[1]], images=31),
        doc_row(2, ["Home. About us. Contact."], images=1),
        doc_row(3, prose[2:14], images=1),
        doc_row(4, ["Widget 3000 Pro Max, Widget 3000 Mini, Gadget X2 Ultra, Gadget X2 Lite, USB cable 2m, "
                    "charger 65W, case black, case blue, screen protector, stylus pen, SD card 128GB"], images=1),
        doc_row(5, [spam * 20], images=1),
        doc_row(6, ["abcabcabcabcabcabcabc" * 40 + " is what the keyboard test printed, said the cat."], images=1),
        doc_row(7, [prose[3] + " " + symbols], images=1),
    ]
    out = outcomes(DocRules(DocRules.Config(**RULES)).process(doc_table(rows)))
    assert out[0] == ("too_few_images", "0 images < min_images 1")
    assert out[1] == ("too_many_images", "31 images > max_images 30")
    assert out[2] == ("too_few_words", "4 words < min_words 10")
    n = len(tq.words("\n\n".join(prose[2:14])))
    assert n > 2000 and out[3] == ("too_many_words", f"{n} words > max_words 2000")
    assert out[4][0] == "low_stopword_ratio" and out[4][1].endswith("< min_stopword_ratio 0.1 (en)")
    assert out[5][0] == "repetitive" and out[5][1].startswith("word 5-gram repetition 1.000 >")
    assert out[6][0] == "repetitive" and out[6][1].startswith("char 10-gram repetition ")
    assert out[6][1].endswith("> max_char_repetition_ratio 0.2")
    assert out[7][0] == "special_characters" and out[7][1].endswith("> max_special_char_ratio 0.3")


def test_too_many_words_and_text_records_skip_image_rules(prose):
    stage = DocRules(DocRules.Config(min_images=1, max_words=100))
    out = stage.process(text_table([prose[0], "A short note, written in plain words, with no images at all."]))
    n = len(tq.words(prose[0]))
    assert outcomes(out) == [("too_many_words", f"{n} words > max_words 100"), (None, None)]


def test_stop_words_follow_the_row_language():
    assert "und" in stop_words("de") and "the" in stop_words("en")
    assert stop_words("zzz") == stop_words(None) == stop_words("EN; import os") == stop_words("en")
    stage = DocRules(DocRules.Config(min_stopword_ratio=0.25))
    out = stage.process(text_table([GERMAN, GERMAN], language=["de", "en"]))
    ratios = out.column("stopword_ratio").to_pylist()
    assert ratios[0] > 0.3 > ratios[1]
    assert outcomes(out)[0] == (None, None)
    assert outcomes(out)[1][0] == "low_stopword_ratio" and outcomes(out)[1][1].endswith("(en)")


def test_measures():
    assert word_repetition_ratio("a b c d e".split(), 5) == 0.0
    assert word_repetition_ratio("a b a b a b".split(), 2) == 1.0
    assert word_repetition_ratio("x y".split(), 5) == 0.0
    assert char_repetition_ratio("", 10) == 0.0 and char_repetition_ratio("abcdefghijk", 10) == 0.0
    assert char_repetition_ratio("a" * 100, 10) == 1.0
    # ROOTS counts only the floor(sqrt(V)) most frequent n-grams: 1 of the 2 here
    assert char_repetition_ratio("ab" * 50, 10) == pytest.approx(46 / 91)
    assert special_char_ratio("") == 0.0 and special_char_ratio("ab cd") == 0.0
    assert special_char_ratio("a_b #") == pytest.approx(2 / 4)


def test_empty_documents_and_earlier_drops():
    stage = DocRules(DocRules.Config(min_words=1))
    t = text_table(["", None, "Kept because it has words."])
    t = t.set_column(t.schema.get_field_index("drop_reason"), "drop_reason", pa.array([None, None, "duplicate"]))
    out = stage.process(t).to_pylist()
    assert [(r["drop_reason"], r["word_count"]) for r in out] == [("too_few_words", 0), ("too_few_words", 0),
                                                                  ("duplicate", None)]
    assert out[2]["drop_detail"] is None and out[2]["drop_stage"] is None


@pytest.mark.parametrize("bad", [{}, {"min_words": 10, "max_words": 5}, {"min_images": 3, "max_images": 1},
                                 {"min_stopword_ratio": 1.5}, {"max_words": 0}, {"word_ngram": 0, "min_words": 1}])
def test_doc_rules_config_is_validated_at_load(bad):
    with pytest.raises(ValidationError):
        DocRules.Config(**bad)


# ---------------------------------------------------------------------------------------------
# datatrove's filters
# ---------------------------------------------------------------------------------------------

DATATROVE = [
    (GopherQuality, "gopher_quality_filter", "GopherQualityFilter"),
    (GopherRepetition, "gopher_repetition_filter", "GopherRepetitionFilter"),
    (C4Quality, "c4_filters", "C4QualityFilter"),
    (FineWebQuality, "fineweb_quality_filter", "FineWebQualityFilter"),
]


def datatrove_class(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(f"datatrove.pipeline.filters.{module}"), name)


@pytest.mark.parametrize("stage_cls, module, name", DATATROVE)
def test_config_defaults_are_datatroves(stage_cls, module, name):
    params = inspect.signature(datatrove_class(module, name)).parameters
    fields = {k: v for k, v in stage_cls.Config.model_fields.items() if k not in tq.StageConfig.model_fields}
    for field_name, field in fields.items():
        assert field_name in params, f"{field_name} is no argument of datatrove's {name}"
        assert field.default == params[field_name].default, field_name
    assert STAGES[stage_cls.Config.model_fields["kind"].default] is stage_cls
    assert stage_cls.kinds == ("doc", "text")


@pytest.fixture(scope="module")
def mixed() -> list[dict[str, str]]:
    return corpus(300, seed=3)


@pytest.mark.parametrize("stage_cls, module, name", DATATROVE)
def test_same_decisions_as_datatrove_called_directly(mixed, stage_cls, module, name):
    """Ours on text and doc records vs a fresh datatrove filter (its own tokenizer, memory zone
    and all) on the same text: the same keep/drop, and datatrove's reason as our detail."""
    from datatrove.data import Document

    reference = datatrove_class(module, name)()
    expected = []
    for d in mixed:
        result = reference.filter(Document(text=d["text"], id=d["id"]))
        expected.append((None, None) if result is True else (stage_cls.name, result[1]))
    assert 0.2 < sum(e[0] is None for e in expected) / len(expected) < 0.9  # both outcomes well represented
    stage = stage_cls(stage_cls.Config())
    texts = [d["text"] for d in mixed]
    batches = [text_table(texts[i : i + 64]) for i in range(0, len(texts), 64)]
    assert [o for b in batches for o in outcomes(stage.process(b))] == expected
    docs = doc_table([doc_row(i, t.split("\n\n"), images=1) for i, t in enumerate(texts)])
    for row, text in zip(docs.to_pylist(), texts):  # a doc's text is its segments with blank lines
        assert record_text("doc", row) == "\n\n".join(p for p in text.split("\n\n"))
    assert outcomes(stage.process(docs)) == expected


def test_codes_on_written_examples(prose):
    rows = {
        "gopher_quality": ("A one-line page.", "gopher_short_doc"),
        "gopher_repetition": ("\n".join(["Click here to buy cheap watches now!"] * 30), "dup_line_frac"),
        "c4_quality": (prose[0] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
        "fineweb_quality": ("\n".join(["Home", "About us", "Contact", "Products", "Blog"] * 4), "line_punct_ratio"),
    }
    for kind, (text, reason) in rows.items():
        out = STAGES[kind](STAGES[kind].Config()).process(text_table([text, "", "   \n"]))
        assert outcomes(out) == [(kind, reason), (kind, "empty"), (kind, "empty")]
        assert out.column("drop_stage").to_pylist() == [kind] * 3


def test_thresholds_reach_datatrove_and_a_named_instance_keeps_the_code():
    text = "Short but fine: the weather stayed pleasant and the children played outside all afternoon."
    assert outcomes(GopherQuality(GopherQuality.Config()).process(text_table([text])))[0][1] == "gopher_short_doc"
    stage = GopherQuality(GopherQuality.Config(min_doc_words=5, name="gopher_lenient"))
    assert outcomes(stage.process(text_table([text]))) == [(None, None)]
    out = stage.process(text_table(["Too short."]))
    assert out.column("drop_stage").to_pylist() == ["gopher_lenient"]
    assert outcomes(out) == [("gopher_quality", "gopher_short_doc")]


def test_rows_dropped_earlier_pass_untouched():
    t = text_table(["A one-line page."])
    t = t.set_column(t.schema.get_field_index("drop_reason"), "drop_reason", pa.array(["lang_mismatch"]))
    for cls, _, _ in DATATROVE:
        row = cls(cls.Config()).process(t).to_pylist()[0]
        assert (row["drop_stage"], row["drop_reason"], row["drop_detail"]) == (None, "lang_mismatch", None)


def test_row_language_picks_datatroves_tokenizer_else_english():
    assert word_tokenizer("fr").language == "fr"
    assert word_tokenizer(None).language == "en"
    assert word_tokenizer("zzz") is word_tokenizer("en")  # no tokenizer for it: English
    stage = GopherQuality(GopherQuality.Config())
    stage.ensure_setup()
    assert stage.datatrove_filter("fr").language is word_tokenizer("fr")
    assert stage.datatrove_filter("zzz") is stage.datatrove_filter(None)


def test_shared_tokenizer_gives_datatroves_words_and_bounds_its_memory(mixed, monkeypatch):
    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    reference = SpaCyTokenizer("en")
    monkeypatch.setattr(tq, "MAX_LEXEMES", 2000)  # renew spaCy's vocabulary often
    shared = tq._shared_tokenizer_class()(SpaCyTokenizer("en"), budget=50_000)
    texts = [d["text"] for d in mixed[:120]] + ["IS_ALPHA breaks spaCy's matcher, says datatrove."]
    for text in texts + texts[:10]:
        assert shared.word_tokenize(text) == reference.word_tokenize(text)
        assert shared.held <= 50_000
        assert len(shared._nlp.vocab) <= 2000 + len(text)
    assert shared.span_tokenize(texts[0]) == reference.span_tokenize(texts[0])


def test_never_downloads(monkeypatch, prose):
    """Stop words, tokenizers and filters load from installed packages: a socket attempt fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("a text quality stage tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(tq, "_TOKENIZERS", {})
    monkeypatch.setattr(tq, "_STOP_WORDS", {})
    texts = text_table([prose[0] + "\n\n" + prose[1], GERMAN], language=["en", "de"])
    for kind in ("doc_rules", "gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality"):
        config = STAGES[kind].Config(**({"min_words": 1} if kind == "doc_rules" else {}))
        STAGES[kind](config).process(texts)
