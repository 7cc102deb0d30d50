"""pii_redact on a fixture of pairs, docs and texts holding emails, public and private IPs, US and
international phone numbers, and numbers that are no phones (years, prices, ISBNs): what is
replaced, what is kept, the per-record columns, the stage's counts, and that output depends on the
input only (rerun, batch order, a second pass)."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.contract import encode_sample, record_schema, sidecar_row, sidecar_schema, sidecar_table
from curate.recipe import RecipeError, parse_recipe
from curate.stages.base import build_stage, counting
from curate.stages.pii import PiiRedact, is_isbn

REGIONS = ["US", "GB", "DE"]
NOT_PHONES = ("Built in 1999, sold for $1,299.99 in 2024 and 12,500,000 copies since; "
              "ISBN 0-306-40615-2, see also 978-0-306-40615-7.")
PAIRS = [
    "Contact jane.doe@example.net or call (415) 555-2671 for prints",  # email + US phone
    "Mirror at 8.8.8.8; the router 192.168.1.20 and 127.0.0.1 are private",  # public IP only
    "London desk 020 7946 0958, Berlin 030 901820, Paris +33 1 42 68 53 00",  # GB, DE national; +33
    NOT_PHONES,
    "A red bicycle leaning on a wall",
]
CAPTIONS = [
    ("Contact <EMAIL> or call <PHONE> for prints", (1, 0, 1)),
    ("Mirror at <IP>; the router 192.168.1.20 and 127.0.0.1 are private", (0, 1, 0)),
    ("London desk <PHONE>, Berlin <PHONE>, Paris <PHONE>", (0, 0, 3)),
    (NOT_PHONES, (0, 0, 0)),
    ("A red bicycle leaning on a wall", (0, 0, 0)),
]
COUNT_COLUMNS = ["pii_emails", "pii_ips", "pii_phones"]


def stage(**config) -> PiiRedact:
    return build_stage(PiiRedact.Config(phone_regions=REGIONS, **config))


def pair_table(captions: list[str], **columns: list) -> pa.Table:
    rows = [{"id": f"p:{i}", "source": "p", "caption": c} for i, c in enumerate(captions)]
    schema = record_schema("pair", {name: pa.string() for name in columns})
    for name, values in columns.items():
        for row, value in zip(rows, values):
            row[name] = value
    return pa.Table.from_pylist(rows, schema=schema)


def counts(out: pa.Table) -> list[tuple]:
    return list(zip(*(out.column(c).to_pylist() for c in COUNT_COLUMNS)))


def run(stage_: PiiRedact, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    with counting() as counter:
        out = stage_.process(table)
    return out, dict(counter)


def test_pairs_replaced_kept_and_counted_per_record_and_in_total():
    out, total = run(stage(), pair_table(PAIRS))
    # private IPs, years, prices, ISBNs and words kept
    assert out.column("caption").to_pylist() == [c for c, _ in CAPTIONS]
    assert counts(out) == [n for _, n in CAPTIONS]
    assert {c: out.schema.field(c).type for c in COUNT_COLUMNS} == dict.fromkeys(COUNT_COLUMNS, pa.int32())
    assert total == {"emails": 1, "ips": 1, "phones": 4, "records": 3}
    assert out.column("drop_reason").null_count == out.num_rows  # never drops


def test_a_national_number_needs_its_region_and_an_isbn_is_no_phone():
    """With US only, the GB and DE national numbers are not phones (the +33 one still is); with
    DE, an ISBN-10 that starts with 0 is a valid German number to phonenumbers: the ISBN guard
    keeps it, labelled or hyphenated as an ISBN with a valid check digit."""
    out, _ = run(build_stage(PiiRedact.Config()), pair_table([PAIRS[2]]))
    assert out.column("caption").to_pylist() == ["London desk 020 7946 0958, Berlin 030 901820, Paris <PHONE>"]
    text = "ISBN 0-306-40615-2 or 0-306-40615-2, but 0-306-40615-3 is a number"
    assert is_isbn(text, 5, 18) and is_isbn(text, 22, 35) and not is_isbn(text, 41, 54)
    out, _ = run(stage(), pair_table([text]))
    assert out.column("caption").to_pylist() == ["ISBN 0-306-40615-2 or 0-306-40615-2, but <PHONE> is a number"]


def test_synthetic_captions_redacted_and_dropped_rows_untouched():
    table = pair_table(PAIRS[:2], caption_alt=PAIRS[:2], caption_synthetic=["a man, mail bob@example.org", None],
                       caption_vecap=["bob@example.org at 8.8.4.4", "a server rack"])
    table = table.set_column(table.schema.get_field_index("drop_reason"), "drop_reason",
                             pa.array([None, "too_short"], pa.string()))
    out, total = run(stage(), table)
    first, dropped = out.to_pylist()
    assert first["caption_alt"] == first["caption"] == "Contact <EMAIL> or call <PHONE> for prints"
    assert first["caption_synthetic"] == "a man, mail <EMAIL>"
    assert first["caption_vecap"] == "<EMAIL> at <IP>"
    assert (first["pii_emails"], first["pii_ips"], first["pii_phones"]) == (4, 1, 2)  # over every caption
    assert dropped["caption"] == PAIRS[1] and dropped["pii_ips"] is None  # an earlier drop: not read
    assert total == {"emails": 4, "ips": 1, "phones": 2, "records": 1}


def doc_table() -> pa.Table:
    segments = [
        {"type": "text", "text": "Write to editor@news.example.com or ring +1 212 736 5000."},
        {"type": "image", "url": "https://example.com/a.jpg", "alt": "photo by ann.lee@example.org", "image": 0,
         "caption_vecap": "Ann (ann.lee@example.org) at her desk"},  # the recaption stage's key
        {"type": "text", "text": "Our 2019 report cost 25 dollars; served from 93.184.216.34."},
        {"type": "image", "url": "https://example.com/b.jpg", "alt": "a chart"},
    ]
    clean = [{"type": "text", "text": "Nothing personal in 2020."}, {"type": "image", "url": "https://e.com/c.jpg"}]
    rows = [{"id": "d:0", "source": "d", "segments": json.dumps(segments)},
            {"id": "d:1", "source": "d", "segments": json.dumps(clean)}]
    return pa.Table.from_pylist(rows, schema=record_schema("doc"))


def test_doc_segments_and_image_alt_text():
    table = doc_table()
    out, total = run(stage(), table)
    segments = json.loads(out.column("segments")[0].as_py())
    assert [s.get("text") or s.get("alt") for s in segments] == [
        "Write to <EMAIL> or ring <PHONE>.", "photo by <EMAIL>",
        "Our 2019 report cost 25 dollars; served from <IP>.", "a chart"]
    assert segments[1]["caption_vecap"] == "Ann (<EMAIL>) at her desk"
    assert segments[1]["url"] == "https://example.com/a.jpg" and segments[1]["image"] == 0
    assert counts(out) == [(3, 1, 1), (0, 0, 0)]
    assert out.column("segments")[1] == table.column("segments")[1]  # no PII: the JSON as it came
    assert total == {"emails": 3, "ips": 1, "phones": 1, "records": 1}


def test_text_record():
    text = "Logs from 8.8.8.8 and 10.0.0.7.\n\nMail root@example.com, fax +44 20 7946 0958.\n\nIn 1999: $1,299."
    table = pa.Table.from_pylist([{"id": "t:0", "source": "t", "text": text}], schema=record_schema("text"))
    out, total = run(stage(), table)
    assert out.column("text").to_pylist() == [
        "Logs from <IP> and 10.0.0.7.\n\nMail <EMAIL>, fax <PHONE>.\n\nIn 1999: $1,299."]
    assert counts(out) == [(1, 1, 1)]
    assert total == {"emails": 1, "ips": 1, "phones": 1, "records": 1}


def test_same_input_same_output_whatever_the_batch_order_and_a_second_pass_finds_nothing():
    table = pair_table(PAIRS)
    first, _ = run(stage(), table)
    assert run(stage(), table)[0].equals(first)
    one = stage(email_placeholder="email@example.com")  # datatrove's example address, one instance
    forward = one.process(table).column("caption").to_pylist()
    backward = one.process(table.take(list(range(table.num_rows))[::-1])).column("caption").to_pylist()
    assert forward == backward[::-1] and forward[0].startswith("Contact email@example.com")
    again, total = run(stage(), first.drop_columns(COUNT_COLUMNS))
    assert again.column("caption").equals(first.column("caption"))
    assert counts(again) == [(0, 0, 0)] * len(PAIRS) and total == {}


def test_kinds_switched_off_are_kept_and_not_counted():
    out, total = run(stage(emails=False, phones=False), pair_table(PAIRS[:2]))
    assert out.column("caption").to_pylist() == [PAIRS[0], CAPTIONS[1][0]]
    assert counts(out) == [(None, 0, None), (None, 1, None)]
    assert total == {"ips": 1, "records": 1}
    out, _ = run(stage(only_public_ips=False), pair_table(PAIRS[1:2]))
    assert out.column("caption").to_pylist() == ["Mirror at <IP>; the router <IP> and <IP> are private"]


def test_phone_min_digits_and_bare_digits():
    # fewer digits close together than phone_min_digits: phonenumbers is not asked
    out, _ = run(stage(phone_min_digits=11), pair_table(PAIRS[:1]))
    assert out.column("caption").to_pylist() == ["Contact <EMAIL> or call (415) 555-2671 for prints"]
    bare = "INT_MAX is 2147483647; call 415-555-2671"  # (214) 748-3647 is a valid Dallas number
    assert run(stage(), pair_table([bare]))[0].column("caption").to_pylist() == ["INT_MAX is <PHONE>; call <PHONE>"]
    out, _ = run(stage(phone_bare_digits=False), pair_table([bare]))
    assert out.column("caption").to_pylist() == ["INT_MAX is 2147483647; call <PHONE>"]


def test_counts_reach_sidecars_and_key_json():
    """Scalar stage columns need no contract change: sidecar_schema takes them from the record."""
    out, _ = run(stage(), pair_table(PAIRS[:1]))
    assert {c: sidecar_schema("pair", out.schema).field(c).type for c in COUNT_COLUMNS} == \
        dict.fromkeys(COUNT_COLUMNS, pa.int32())
    row = {**out.to_pylist()[0], "image": b"x", "image_format": "jpg"}
    sidecar = sidecar_table("pair", out.schema, [sidecar_row("pair", row, "0000000000", [])])
    assert sidecar.select(COUNT_COLUMNS).to_pylist() == [{"pii_emails": 1, "pii_ips": 0, "pii_phones": 1}]
    meta = json.loads(dict(encode_sample("pair", row, "0000000000"))["0000000000.json"])
    assert (meta["pii_emails"], meta["pii_phones"]) == (1, 1)


def test_bad_config_fails_at_load(monkeypatch):
    with pytest.raises(ValidationError, match="UK"):
        PiiRedact.Config(phone_regions=["US", "UK"])
    with pytest.raises(ValidationError, match="all off"):
        PiiRedact.Config(emails=False, ips=False, phones=False)
    assert PiiRedact.Config(phone_regions=["gb"]).phone_regions == ["GB"]
    monkeypatch.setitem(sys.modules, "phonenumbers", None)  # as if the safety extra were not installed
    recipe = {"name": "t", "sources": [{"kind": "text_corpus", "name": "a", "path": "x.jsonl"}],
              "output": {"path": "out"}, "stages": [{"kind": "pii_redact"}]}
    with pytest.raises(RecipeError, match=r"stages\.0.*pip install 'mm1-pipeline\[safety\]'"):
        parse_recipe(recipe)
    recipe["stages"] = [{"kind": "pii_redact", "phones": False}]
    assert parse_recipe(recipe).stages[0].kind == "pii_redact"
