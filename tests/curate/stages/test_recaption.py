"""The recaptioning stage (curate/stages/recaption.py) on record batches: the transformers backend
on tiny RANDOM-weight models (mechanics only), the server backend against a real chat server
process on loopback, whose answers are scripted where a test needs a given caption (to reach
each guard's code: the models' own noise reaches only some). Columns added, none rewritten;
which caption KEY.txt holds; every fallback and failure code; the cache (a second stage makes
zero model calls); documents; recipe checks and the recipe hash."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.contract import encode_sample, record_schema
from curate.recipe import RecipeError, parse_recipe
from curate.stages.recaption import RecaptionStage, model_calls

pytestmark = pytest.mark.usefixtures("loopback_only")


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((36, 48, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def pairs(*items: tuple[str, bytes], dropped: set[int] = frozenset()) -> pa.Table:
    rows = []
    for i, (caption, data) in enumerate(items):
        rows.append({"id": f"p{i}", "source": "s", "caption": caption, "image": data, "image_format": "jpg",
                     "image_sha256": hashlib.sha256(data).hexdigest(), "width": 48, "height": 36,
                     **({"drop_stage": "earlier", "drop_reason": "too_small", "drop_detail": "x"} if i in dropped else {})})
    return pa.Table.from_pylist(rows, schema=record_schema("pair"))


def local(tiny_models, **changes) -> RecaptionStage:
    vlm, llm = tiny_models
    cfg = {"captioner": {"backend": "transformers", "model": str(vlm), "max_new_tokens": 8, "device": "cpu"},
           "fusion": {"backend": "transformers", "model": str(llm), "max_new_tokens": 8, "device": "cpu"}, **changes}
    return RecaptionStage(RecaptionStage.Config(**cfg))


def served(server, **changes) -> RecaptionStage:
    common = {"backend": "openai", "base_url": server.base_url, "concurrency": 1, "timeout_s": 5, "retries": 1,
              "backoff_s": 0.01}
    cfg = {"captioner": {**common, "model": "vlm", "max_new_tokens": 8},
           "fusion": {**common, "model": "llm", "max_new_tokens": 8}, **changes}
    return RecaptionStage(RecaptionStage.Config(**cfg))


def test_columns_are_added_and_the_alt_text_is_untouched(tiny_models):
    table = pairs(("The Eiffel Tower, 1889", jpeg(0)), ("", jpeg(1)), ("a cat", jpeg(2)), dropped={2})
    out = local(tiny_models).process(table).to_pylist()
    assert [r["caption"] for r in out] == ["The Eiffel Tower, 1889", "", "a cat"]
    first, no_alt, dropped = out
    assert first["caption_alt"] == "The Eiffel Tower, 1889" and first["caption_synthetic"]
    assert first["caption_model"].startswith("vlm@") and first["fusion_model"].startswith("llm@")
    assert len(first["caption_prompt_hash"]) == len(first["fusion_prompt_hash"]) == 16
    # the random LM never ends within 8 tokens: its fusion is cut, the synthetic caption stands in
    assert (first["caption_vecap"], first["vecap_fallback"]) == (first["caption_synthetic"], "fusion_too_long")
    assert (no_alt["caption_vecap"], no_alt["vecap_fallback"]) == (no_alt["caption_synthetic"], "no_alt_text")
    assert first["txt_source"] == "alt" and dropped["caption_synthetic"] is None and dropped["drop_reason"] == "too_small"


@pytest.mark.parametrize("txt, expected", [("alt", "caption"), ("synthetic", "caption_synthetic"),
                                           ("vecap", "caption_vecap")])
def test_the_recipe_chooses_what_key_txt_holds(tiny_models, txt, expected):
    [row] = local(tiny_models, txt=txt).process(pairs(("The Eiffel Tower, 1889", jpeg(0)))).to_pylist()
    assert row["txt_source"] == txt
    members = dict(encode_sample("pair", row, "0000000000"))
    assert members["0000000000.txt"].decode() == row[expected]
    meta = json.loads(members["0000000000.json"])
    assert meta["caption_alt"] == "The Eiffel Tower, 1889" and meta["caption_synthetic"] == row["caption_synthetic"]


def test_undecodable_images_are_dropped_and_identical_images_captioned_once(tiny_models):
    same = jpeg(5)
    stage = local(tiny_models)
    out = stage.process(pairs(("a", same), ("b", same), ("c", b"\xff\xd8\xff broken"))).to_pylist()
    assert [r["drop_reason"] for r in out] == [None, None, "decode_error"]
    assert out[0]["caption_synthetic"] == out[1]["caption_synthetic"]
    calls = model_calls(stage)  # the shared image generated once; the broken one never reaches the model
    assert (calls["caption_calls"], calls["caption_items"]) == (1, 1)


def test_a_second_run_with_the_cache_makes_no_model_call(tiny_models, tmp_path):
    table = pairs(("The Louvre in Paris", jpeg(0)), ("Big Ben 1859", jpeg(1)), ("", jpeg(2)))
    first = local(tiny_models, cache_dir=str(tmp_path / "cache"))
    a = first.process(table)
    assert model_calls(first) == {"caption_calls": 1, "caption_items": 3, "fusion_calls": 1, "fusion_items": 2}
    second = local(tiny_models, cache_dir=str(tmp_path / "cache"))
    b = second.process(table)
    assert model_calls(second) == {"caption_calls": 0, "caption_items": 0, "fusion_calls": 0, "fusion_items": 0}
    assert a.equals(b)
    other_prompt = local(tiny_models, cache_dir=str(tmp_path / "cache"),
                         captioner={"backend": "transformers", "model": str(tiny_models[0]), "max_new_tokens": 8,
                                    "prompt": "What is in the picture?"})
    other_prompt.process(table)
    assert model_calls(other_prompt)["caption_items"] == 3  # another prompt is another namespace


# ---------------------------------------------------------------------------------------------
# guards and failures, with scripted server answers (concurrency 1: requests in order)


def reply(text: str) -> dict:
    return {"mode": "reply", "text": text}


GOOD = "A tall iron lattice tower against a blue evening sky with trees below"


@pytest.mark.parametrize("caption, fusion, vecap, fallback", [
    (GOOD, "The Eiffel Tower in Paris at dusk, built in 1889, with trees below", "fused", None),
    (GOOD, "", GOOD, "fusion_empty"),
    (GOOD, " ".join(["word"] * 2 + [f"w{i}" for i in range(130)]), GOOD, "fusion_too_long"),
    (GOOD, "Eiffel tower tower tower tower tower in Paris", GOOD, "fusion_repetition"),
    (GOOD, "A tall iron structure under a blue sky with trees", GOOD, "fusion_lost_alt_facts"),
    ("", None, None, "caption_empty"),
    ("a red a red a red a red car", None, None, "caption_repetition"),
])
def test_each_guard_records_its_code(chat_server, caption, fusion, vecap, fallback):
    chat_server.reset()
    chat_server.script(reply(caption), *([reply(fusion)] if fusion is not None else []))
    stage = served(chat_server, txt="vecap")
    [row] = stage.process(pairs(("The Eiffel Tower, Paris 1889", jpeg(0)))).to_pylist()
    assert row["vecap_fallback"] == fallback and row["drop_reason"] is None
    if vecap == "fused":
        assert row["caption_vecap"] == fusion and row["txt_source"] == "vecap"
    else:
        assert row["caption_vecap"] == vecap
    if caption == "" or fallback == "caption_repetition":
        assert row["caption_synthetic"] is None and row["txt_source"] == "alt"
    assert chat_server.stats()["requests"] == (2 if fusion is not None else 1)


def test_a_fusion_server_failure_falls_back_to_the_synthetic_caption(chat_server):
    chat_server.reset()
    chat_server.script(reply(GOOD), {"mode": "status", "status": 503}, {"mode": "status", "status": 503})
    [row] = served(chat_server).process(pairs(("The Eiffel Tower", jpeg(0)))).to_pylist()
    assert (row["caption_vecap"], row["vecap_fallback"], row["drop_reason"]) == (GOOD, "fusion_error", None)


@pytest.mark.parametrize("steps, code", [
    ([{"mode": "status", "status": 503}] * 2, "http_503"),
    ([{"mode": "malformed"}] * 2, "bad_response"),
    ([{"mode": "status", "status": 400}], "http_400"),
    ([{"mode": "slow", "delay_s": 3}] * 2, "timeout"),
])
def test_a_caption_that_cannot_be_had_drops_the_pair_with_the_code(chat_server, steps, code):
    """Transient codes (timeout, 5xx) are those --retry-failed asks again for."""
    from curate.stages.download import is_transient

    chat_server.reset()
    chat_server.script(*steps)
    stage = served(chat_server, captioner={"backend": "openai", "base_url": chat_server.base_url, "model": "vlm",
                                           "concurrency": 1, "timeout_s": 1.5, "retries": 1, "backoff_s": 0.01})
    [row] = stage.process(pairs(("The Eiffel Tower", jpeg(0)))).to_pylist()
    assert (row["drop_stage"], row["drop_reason"]) == ("recaption", code)
    assert row["drop_detail"].startswith("captioner:")
    assert is_transient(code) == (code in ("http_503", "timeout"))


def test_on_unavailable_keep_keeps_the_pair_with_its_alt_text(chat_server):
    chat_server.reset()
    chat_server.script(*[{"mode": "status", "status": 500}] * 2)
    [row] = served(chat_server, on_unavailable="keep", txt="vecap").process(
        pairs(("The Eiffel Tower", jpeg(0)))).to_pylist()
    assert row["drop_reason"] is None and row["vecap_fallback"] == "caption_unavailable"
    assert row["caption_synthetic"] is None and row["txt_source"] == "alt"


def test_the_server_backend_without_a_script_captions_with_the_served_models(chat_server, tiny_models):
    """Unscripted, the served tiny models answer: the same synthetic captions as the local backend."""
    chat_server.reset()
    table = pairs(("The Eiffel Tower", jpeg(0)), ("Big Ben", jpeg(1)))
    remote = served(chat_server).process(table).column("caption_synthetic").to_pylist()
    mine = local(tiny_models).process(table).column("caption_synthetic").to_pylist()
    assert remote == mine and all(remote)


# ---------------------------------------------------------------------------------------------
# documents


def doc_table(images: list[bytes]) -> pa.Table:
    segments = [{"type": "text", "text": "A page about towers."}]
    for i, _ in enumerate(images):
        segments.append({"type": "image", "image": i, "url": f"http://x/{i}.jpg", "alt": "The Eiffel Tower 1889" if i == 0 else ""})
    row = {"id": "d0", "source": "s", "segments": json.dumps(segments), "images": images,
           "image_formats": ["jpg"] * len(images), "image_sha256s": [hashlib.sha256(d).hexdigest() for d in images]}
    return pa.Table.from_pylist([row], schema=record_schema("doc"))


def test_document_images_get_captions_in_their_segments_only_when_asked(tiny_models):
    table = doc_table([jpeg(0), jpeg(1)])
    untouched = local(tiny_models).process(table)
    assert untouched.column("segments").to_pylist() == table.column("segments").to_pylist()
    [row] = local(tiny_models, docs=True).process(table).to_pylist()
    images = [s for s in json.loads(row["segments"]) if s["type"] == "image"]
    assert all(s["caption_synthetic"] for s in images)
    assert [s["vecap_fallback"] for s in images] == ["fusion_too_long", "no_alt_text"]
    assert row["caption_model"].startswith("vlm@") and row["drop_reason"] is None


def test_a_document_is_never_dropped_for_a_caption(chat_server):
    chat_server.reset()
    chat_server.script(*[{"mode": "status", "status": 500}] * 4)
    [row] = served(chat_server, docs=True).process(doc_table([jpeg(0)])).to_pylist()
    [image] = [s for s in json.loads(row["segments"]) if s["type"] == "image"]
    assert row["drop_reason"] is None and image["vecap_fallback"] == "caption_unavailable"


# ---------------------------------------------------------------------------------------------
# the recipe


def _recipe(stage: dict) -> dict:
    return {"name": "r", "sources": [{"kind": "image_folder", "name": "f", "path": "/nowhere"}],
            "stages": [stage], "output": {"path": "/tmp/out"}}


BASE = {"kind": "recaption", "captioner": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "vlm"},
        "fusion": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "llm"}}


@pytest.mark.parametrize("change, message", [
    ({"fusion": None, "txt": "vecap"}, "txt: vecap needs a fusion model"),
    ({"captioner": {"backend": "openai", "model": "vlm"}}, "needs base_url"),
    ({"fusion": {**BASE["fusion"], "prompt": "Rewrite {alt_text}"}}, "synthetic_caption"),
    ({"txt": "best"}, "txt"),
])
def test_bad_recaption_recipes_fail_at_load_naming_the_key(change, message):
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(_recipe({**BASE, **change}), "<r>")
    assert "stages.0" in str(info.value)


def test_the_hash_covers_models_and_prompts_not_how_they_run():
    h = parse_recipe(_recipe(BASE)).hash()
    faster = {**BASE, "cache_dir": "/c", "captioner": {**BASE["captioner"], "concurrency": 64, "timeout_s": 5,
                                                       "batch_size": 32, "device": "cuda",
                                                       "base_url": "http://10.0.0.9:8000/v1"}}
    assert parse_recipe(_recipe(faster)).hash() == h
    for change in ({"captioner": {**BASE["captioner"], "prompt": "Describe it."}},
                   {"fusion": {**BASE["fusion"], "model": "other"}}, {"txt": "vecap"}):
        assert parse_recipe(_recipe({**BASE, **change})).hash() != h
