"""`compute_stats` on a small real output: every number equals a hand-computed value."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tools.stats import compute_stats, format_stats


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered) / 100)) - 1]


@pytest.fixture
def stats(curated: dict[str, Any]) -> dict[str, Any]:
    return compute_stats(curated["out"])


def test_json_serialisable_and_formatted(stats: dict[str, Any]) -> None:
    assert json.loads(json.dumps(stats)) == stats
    text = format_stats(stats)
    assert "download/http_404" in text and "(no url)" in text and "pairs/00001.tar" in text


def test_stage_times_when_the_manifest_has_them(curated: dict[str, Any], stats: dict[str, Any],
                                                edit_manifest: Any) -> None:
    assert stats["stages"] == [] and "stage times" not in format_stats(stats)  # an older output: none
    edit_manifest(curated["out"], lambda m: m.update(stages={
        "language_filter": {"order": 1, "pass": "rows", "wall_s": 0.0, "cpu_s": 0.0, "rows_in": 0, "rows_out": 0},
        "download": {"order": 0, "pass": "rows", "wall_s": 2.5, "cpu_s": 1.25, "rows_in": 1000, "rows_out": 900},
        "exact_dedup": {"order": 2, "pass": "global", "wall_s": 0.5, "cpu_s": 0.75, "rows_in": 900, "rows_out": 850},
    }))
    after = compute_stats(curated["out"])
    assert [(s["stage"], s["rows_per_s"]) for s in after["stages"]] == [
        ("download", 400.0), ("language_filter", None), ("exact_dedup", 1800.0)]
    lines = format_stats(after).splitlines()
    at = lines.index(next(line for line in lines if line.startswith("stage times")))
    assert lines[at].split()[2:] == ["wall", "s", "CPU", "s", "rows", "in", "rows", "out", "rows/s"]
    assert lines[at + 1].split() == ["download", "2.500", "1.250", "1,000", "900", "400.0"]
    assert lines[at + 2].split() == ["language_filter", "0.000", "0.000", "0", "0", "-"]
    assert lines[at + 3].split() == ["exact_dedup", "(global)", "0.500", "0.750", "900", "850", "1,800.0"]


def test_counts_per_kind_and_shard(curated: dict[str, Any], stats: dict[str, Any]) -> None:
    out: Path = curated["out"]
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*.tar")}
    pair = stats["kinds"]["pair"]
    assert (pair["shards"], pair["samples"]) == (2, 5)
    assert pair["per_shard"] == [
        {"name": "pairs/00000.tar", "samples": 3, "tar_bytes": sizes["pairs/00000.tar"]},
        {"name": "pairs/00001.tar", "samples": 2, "tar_bytes": sizes["pairs/00001.tar"]},
    ]
    assert pair["tar_bytes"] == sizes["pairs/00000.tar"] + sizes["pairs/00001.tar"]
    assert (stats["kinds"]["doc"]["samples"], stats["kinds"]["text"]["samples"]) == (2, 2)
    assert stats["totals"] == {"shards": 4, "samples": 9, "tar_bytes": sum(sizes.values())}


def test_outcomes_and_keep_rates(stats: dict[str, Any]) -> None:
    o = stats["outcomes"]
    assert (o["inputs"], o["kept"], o["dropped"]) == (16, 9, 7)
    assert o["keep_rate"] == 9 / 16
    assert o["by_source"] == {
        "corpus": {"inputs": 3, "kept": 2, "dropped": 1, "keep_rate": 2 / 3},
        "laion": {"inputs": 7, "kept": 3, "dropped": 4, "keep_rate": 3 / 7},
        "local": {"inputs": 3, "kept": 2, "dropped": 1, "keep_rate": 2 / 3},
        "warc": {"inputs": 3, "kept": 2, "dropped": 1, "keep_rate": 2 / 3},
    }
    assert o["by_kind"]["pair"] == {"inputs": 10, "kept": 5, "dropped": 5, "keep_rate": 0.5}


def test_drop_reasons_ranked_with_examples(stats: dict[str, Any]) -> None:
    ranked = stats["drops"]["ranked"]
    assert [(d["stage"], d["reason"], d["count"]) for d in ranked] == [
        ("download", "http_404", 2),
        ("dedup", "duplicate", 1),
        ("download", "decode_error", 1),
        ("download", "timeout", 1),
        ("image_filter", "too_small", 1),
        ("lang", "lang_mismatch", 1),
    ]
    first = ranked[0]
    assert (first["example_id"], first["example_detail"], first["share_of_dropped"]) == ("laion:5", "404 Not Found", 2 / 7)
    assert stats["drops"]["by_stage"] == {
        "download": {"http_404": 2, "decode_error": 1, "timeout": 1},
        "dedup": {"duplicate": 1},
        "image_filter": {"too_small": 1},
        "lang": {"lang_mismatch": 1},
    }


def test_image_distributions(curated: dict[str, Any], stats: dict[str, Any]) -> None:
    pair = stats["kinds"]["pair"]
    w = pair["width"]
    assert {k: w[k] for k in ("count", "min", "p5", "p25", "p50", "p75", "p95", "max")} == {
        "count": 5, "min": 50, "p5": 50, "p25": 64, "p50": 90, "p75": 120, "p95": 160, "max": 160}
    assert w["mean"] == (64 + 120 + 90 + 160 + 50) / 5
    assert [h["count"] for h in w["histogram"]] == [1, 3, 1, 0, 0, 0, 0, 0]  # <64, [64,128), [128,256)...
    h = pair["height"]
    assert (h["min"], h["p25"], h["p50"], h["p75"], h["max"]) == (60, 64, 80, 100, 100)
    ar = pair["aspect_ratio"]
    assert (ar["min"], ar["p25"], ar["p50"], ar["p95"], ar["max"]) == (0.5, 1.0, 1.5, 1.6, 1.6)
    assert {b["bucket"]: b["count"] for b in ar["histogram"] if b["count"]} == {
        "[0.5,0.75)": 1, "[1,1.34)": 1, "[1.34,2)": 3}
    assert pair["image_formats"] == {"jpg": 4, "png": 1}
    nbytes = [r["image_nbytes"] for r in curated["pair_rows"]]
    b = pair["image_bytes"]
    assert (b["count"], b["sum"], b["min"], b["max"]) == (5, sum(nbytes), min(nbytes), max(nbytes))
    assert [b[f"p{p}"] for p in (5, 25, 50, 75, 95)] == [nearest_rank(nbytes, p) for p in (5, 25, 50, 75, 95)]
    doc = stats["kinds"]["doc"]
    doc_bytes = [n for r in curated["doc_rows"] for n in r["image_nbytes_list"]]
    assert (doc["image_bytes"]["count"], doc["image_bytes"]["sum"]) == (2, sum(doc_bytes))
    assert doc["image_formats"] == {"jpg": 1, "png": 1}
    assert (doc["n_images"]["sum"], doc["n_segments"]["sum"], doc["segments_dropped"]["sum"]) == (2, 5, 1)


def test_text_distributions(stats: dict[str, Any]) -> None:
    chars = stats["kinds"]["pair"]["caption_chars"]  # 12, 26, 7, 0, 13
    assert (chars["min"], chars["p25"], chars["p50"], chars["p75"], chars["max"], chars["mean"]) == (0, 7, 12, 13, 26, 11.6)
    words = stats["kinds"]["pair"]["caption_words"]  # 2, 7, 1, 0, 2
    assert (words["min"], words["p25"], words["p50"], words["max"], words["sum"]) == (0, 1, 2, 7, 12)
    assert [h["count"] for h in words["histogram"]][:3] == [2, 2, 1]  # <2, [2,5), [5,10)
    doc_chars = stats["kinds"]["doc"]["text_chars"]  # "Hello world." + "More text here"; "Only text."
    assert (doc_chars["min"], doc_chars["max"], doc_chars["sum"]) == (10, 26, 36)
    text = stats["kinds"]["text"]["text_chars"]
    assert (text["min"], text["max"], text["count"]) == (20, 40, 2)


def test_attempts_and_domains(stats: dict[str, Any]) -> None:
    a = stats["attempts"]
    assert a["values"] == {"1": 14, "2": 1, "3": 1}
    assert (a["count"], a["p75"], a["p95"], a["max"], a["sum"]) == (16, 1, 3, 3, 19)
    d = stats["domains"]
    assert d["distinct"] == 5
    assert d["without_url"] == {"inputs": 6, "kept": 4, "dropped": 2, "keep_rate": 4 / 6}
    assert [(x["domain"], x["kept"]) for x in d["top_kept"][:3]] == [(None, 4), ("img.example.com", 2), ("blog.other.org", 1)]
    assert [(x["domain"], x["dropped"]) for x in d["top_dropped"][:3]] == [
        (None, 2), ("img.example.com", 2), ("bad.test", 1)]
    assert d["top_dropped"][0] == {"domain": None, "inputs": 6, "kept": 4, "dropped": 2, "keep_rate": 4 / 6}


def test_reads_ledger_in_batches(curated: dict[str, Any]) -> None:
    """Many small row groups (as big ledgers have) give the same numbers as one."""
    out: Path = curated["out"]
    before = compute_stats(out)
    for name in ("00000.parquet", "00001.parquet"):
        path = out / "ledger" / name
        table = pq.read_table(path)
        pq.write_table(table, path, row_group_size=2)
        assert pq.ParquetFile(path).metadata.num_row_groups > 1
    assert compute_stats(out) == before


def test_kind_without_shards(curated: dict[str, Any], edit_manifest: Any) -> None:
    """A kind whose every input was dropped: zero counts and empty distributions, no crash."""
    out: Path = curated["out"]
    edit_manifest(out, lambda m: m["kinds"]["text"].update(shards=[], count=0, bytes=0))
    stats = compute_stats(out)
    text = stats["kinds"]["text"]
    assert (text["shards"], text["samples"], text["tar_bytes"]) == (0, 0, 0)
    assert text["text_chars"]["count"] == 0 and text["text_chars"]["p50"] is None
    json.dumps(stats)
    format_stats(stats)
