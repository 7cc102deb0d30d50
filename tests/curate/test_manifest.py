"""The typed manifest (curate/manifest.py): it reads what the engine writes and gives it back
exactly, reads from a folder or a URL, and names the key of a structure it cannot walk."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import fsspec
import pytest

from curate.contract import (
    FORMAT_VERSION, MANIFEST, KindEntry, Manifest, ManifestError, ShardEntry, WithdrawnEntry, read_manifest,
    sizes_json, withdrawn_keys,
)


def _shard(kind: str, folder: str, n: int, count: int) -> dict[str, Any]:
    """A shard entry as curate/engine/pack.py writes it (same keys, same order)."""
    stem = f"{folder}/{n:05d}"
    return {"name": f"{stem}.tar", "sidecar": f"{stem}.parquet", "kind": kind, "shard": n, "count": count,
            "bytes": 10240 * count, "sha256": f"{n:064x}", "sidecar_sha256": f"{n + 1:064x}"}


# What a --retry-failed round leaves (curate/engine/retry.py): withdrawn samples, retries, global
# state; the keys in the writer's order.
AFTER_A_RETRY_ROUND: dict[str, Any] = {
    "format_version": FORMAT_VERSION, "name": "demo", "code_version": "abc123",
    "recipe": {"name": "demo", "stages": [{"kind": "exact_dedup"}]}, "recipe_hash": "0123456789abcdef",
    "input_fingerprint": "fedcba9876543210",
    "kinds": {
        "pair": {"shards": [_shard("pair", "pairs", 0, 3), _shard("pair", "pairs", 1, 2)], "count": 4,
                 "bytes": 51200, "withdrawn": [{"id": "laion:3", "shard": "pairs/00000.tar", "key": "0000000001"}]},
        "text": {"shards": [_shard("text", "text", 0, 2)], "count": 2, "bytes": 20480},
    },
    "ledger": ["ledger/00000.parquet", "ledger/00001.r1.parquet"],
    "counts": {"partitions": 2, "inputs": 9, "kept": 6, "dropped": 3},
    "drops": {"download/http_404": 2, "exact_dedup/duplicate": 1},
    "global": {"exact_dedup": {"segment": 1, "state": {"decisions": "_work/global1"}, "summary": {"cutoff": None}}},
    "stages": {"download": {"order": 0, "pass": "rows", "wall_s": 1.5, "cpu_s": 0.25, "rows_in": 9, "rows_out": 7},
               "exact_dedup": {"order": 1, "pass": "global", "wall_s": 0.5, "cpu_s": 0.125, "rows_in": 7,
                               "rows_out": 6}},
    "retries": [{"round": 1, "retried": 2, "recovered": 1, "new_shards": {"pair": 1},
                 "stages": {"download": {"order": 0, "pass": "rows", "wall_s": 0.5, "cpu_s": 0.125, "rows_in": 2,
                                         "rows_out": 1}}}],
}


def test_an_engine_manifest_round_trips_byte_for_byte(demo_output) -> None:
    out, _ = demo_output
    path = Path(out) / MANIFEST
    raw = json.loads(path.read_text())
    manifest = Manifest.read(out)
    assert manifest.to_dict() == raw
    # the bytes the engine's writer (Storage.write_json) gives the same dict
    assert json.dumps(manifest.to_dict(), sort_keys=True, indent=1).encode() == path.read_bytes()
    assert set(manifest.kinds) == {"pair", "doc", "text"}
    for kind, entry in manifest.kinds.items():
        assert entry.count == sum(s.count for s in entry.shards) == raw["kinds"][kind]["count"]
        assert all(isinstance(s, ShardEntry) and s.kind == kind for s in entry.shards)
        assert entry.withdrawn is None and manifest.withdrawn_keys(kind) == {}
    assert manifest.ledger == tuple(raw["ledger"]) and manifest.global_stages == raw["global"]
    assert manifest.retries is None and "retries" not in manifest.to_dict()
    assert manifest.stages == raw["stages"] and "stages" not in manifest.extra  # a typed field


def test_a_retried_manifest_round_trips_in_the_writers_order() -> None:
    before = copy.deepcopy(AFTER_A_RETRY_ROUND)
    manifest = Manifest.from_dict(AFTER_A_RETRY_ROUND)
    assert AFTER_A_RETRY_ROUND == before  # not changed by reading
    again = manifest.to_dict()
    assert again == AFTER_A_RETRY_ROUND
    assert json.dumps(again) == json.dumps(AFTER_A_RETRY_ROUND)  # key order too
    pair = manifest.kinds["pair"]
    assert pair.withdrawn == (WithdrawnEntry(id="laion:3", shard="pairs/00000.tar", key="0000000001"),)
    assert manifest.withdrawn_keys("pair") == {"pairs/00000.tar": {"0000000001"}}
    assert withdrawn_keys(AFTER_A_RETRY_ROUND, "pair") == withdrawn_keys(manifest, "pair")  # a dict reads the same
    assert manifest.withdrawn_keys("text") == {} and manifest.withdrawn_keys("doc") == {}
    assert [s.name for s in manifest.shards("pair")] == ["pairs/00000.tar", "pairs/00001.tar"]
    assert manifest.shards("doc") == ()
    assert sizes_json(manifest.shards("pair")) == sizes_json(AFTER_A_RETRY_ROUND["kinds"]["pair"]["shards"]) == {
        "00000.tar": 3, "00001.tar": 2}


def test_absent_and_unknown_keys_stay_as_they_were() -> None:
    d = {"format_version": FORMAT_VERSION, "kinds": {"text": {"shards": [{"name": "text/00000.tar", "note": 1}]}},
         "ledger": [], "counts": {}, "drops": {}, "written_by": "a newer engine"}
    manifest = Manifest.from_dict(d)
    assert manifest.to_dict() == d
    shard = manifest.shards("text")[0]
    assert (shard.name, shard.count, shard.extra) == ("text/00000.tar", None, {"note": 1})
    assert manifest.name is None and manifest.extra == {"written_by": "a newer engine"}
    assert KindEntry.from_dict({"shards": []}).to_dict() == {"shards": []}


def test_leaf_values_are_kept_as_written_for_verify_to_judge() -> None:
    d = copy.deepcopy(AFTER_A_RETRY_ROUND)
    d["kinds"]["text"]["shards"][0]["count"] = "2"
    assert Manifest.from_dict(d).shards("text")[0].count == "2"


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.update(kinds=[]), "`kinds` must map each kind"),
    (lambda m: m["kinds"]["pair"].update(shards=["pairs/00000.tar"]), "`kinds` must map each kind"),
    (lambda m: m["kinds"]["pair"].update(withdrawn=["pairs/00000.tar/0000000001"]), "`kinds.pair.withdrawn` must"),
    (lambda m: m.update(ledger="ledger/00000.parquet"), "`ledger` must be a list"),
    (lambda m: m.pop("ledger"), "`ledger` must be a list"),
    (lambda m: m["counts"].update(kept="6"), "`counts` must map names to integers"),
    (lambda m: m.update(drops=None), "`drops` must map names to integers"),
    (lambda m: m.update({"global": []}), "`global` must be an object"),
    (lambda m: m.update(stages=[]), "`stages` must be an object"),
    (lambda m: m.update(retries={}), "`retries` must be a list"),
])
def test_a_structure_a_reader_cannot_walk_names_the_key(change, problem, tmp_path: Path) -> None:
    d = copy.deepcopy(AFTER_A_RETRY_ROUND)
    change(d)
    with pytest.raises(ManifestError, match=problem) as err:
        Manifest.from_dict(d)
    assert err.value.problem.startswith("`") and err.value.path is None
    (tmp_path / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(ManifestError) as err:
        Manifest.read(tmp_path)
    assert str(err.value) == f"{tmp_path / MANIFEST}: {err.value.problem}"


def test_read_from_a_folder_and_a_url_and_what_fails(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps(AFTER_A_RETRY_ROUND))
    url = "memory://manifest-test/out"
    fsspec.filesystem("memory").pipe(f"{url}/{MANIFEST}", json.dumps(AFTER_A_RETRY_ROUND).encode())
    for out in (tmp_path, str(tmp_path), tmp_path.as_uri(), url):
        assert Manifest.read(out).to_dict() == AFTER_A_RETRY_ROUND
        assert read_manifest(out) == AFTER_A_RETRY_ROUND
    with pytest.raises(FileNotFoundError, match=f"{url}/elsewhere/{MANIFEST}: no manifest"):
        Manifest.read(f"{url}/elsewhere")
    (tmp_path / MANIFEST).write_text(json.dumps({**AFTER_A_RETRY_ROUND, "format_version": 99}))
    with pytest.raises(ValueError, match=f"{tmp_path / MANIFEST}: format_version 99, expected {FORMAT_VERSION}"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST).write_text("[]")
    with pytest.raises(ManifestError, match="must be a JSON object"):
        Manifest.read(tmp_path)
