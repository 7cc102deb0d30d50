"""`verify` passes on a good output and names each corruption precisely."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.engine.commit import Storage
from curate.contract import shard_urls
from tools.verify import verify

Members = list[tuple[tarfile.TarInfo, bytes]]


def rewrite_tar(path: Path, change: Callable[[Members], Members]) -> None:
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read() if ti.isreg() else b"") for ti in tf]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in change(members):
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    path.write_bytes(buf.getvalue())


def member_offset(out: Path, sidecar: str, name: str) -> int:
    rows = pq.read_table(out / sidecar, columns=["members"])["members"].to_pylist()
    return next(m["offset"] for ms in rows for m in ms if m["name"] == name)


def rewrite_ledger(out: Path, name: str, column: str, where_id: str, value: Any) -> None:
    table = pq.read_table(out / "ledger" / name)
    mask = pc.equal(table["id"], where_id)
    assert pc.sum(mask).as_py() == 1
    new = pc.if_else(mask, pa.scalar(value, table.schema.field(column).type), table[column])
    pq.write_table(table.set_column(table.schema.get_field_index(column), table.schema.field(column), new),
                   out / "ledger" / name)


def test_good_output_passes(curated: dict[str, Any]) -> None:
    report = verify(curated["out"])
    assert report.errors == []
    assert report.ok
    assert report.checked == {"shards": 4, "sidecar_rows": 9, "samples": 9, "byte_checked_samples": 9,
                              "members": 23, "ledger_rows": 16}
    assert "verify OK" in report.format()


def test_byte_checks_can_be_sampled(curated: dict[str, Any]) -> None:
    report = verify(curated["out"], byte_checks_per_shard=1)
    assert report.ok and report.checked["byte_checked_samples"] == 4 and report.checked["samples"] == 9


def test_stock_webdataset_reads_pairs(curated: dict[str, Any]) -> None:
    """What open_clip's loader relies on: stock webdataset, .jpg/.png + .txt per sample."""
    samples = list(wds.WebDataset(shard_urls(curated["out"], "pair"), shardshuffle=False))
    assert [s["txt"].decode() for s in samples] == [r["caption"] for r in curated["pair_rows"]]
    assert [s.get("jpg", s.get("png")) for s in samples] == [r["image"] for r in curated["pair_rows"]]


def test_flipped_byte_is_a_sha_mismatch(curated: dict[str, Any]) -> None:
    out = curated["out"]
    tar = out / "pairs/00000.tar"
    old = Storage().sha256(tar)
    data = bytearray(tar.read_bytes())
    data[member_offset(out, "pairs/00000.parquet", "0000000001.jpg") + 100] ^= 0xFF
    tar.write_bytes(bytes(data))
    report = verify(out)
    assert report.errors == [f"pairs/00000.tar: sha256 {Storage().sha256(tar)}, manifest says {old}"]
    assert not report.ok


def test_truncated_tar(curated: dict[str, Any]) -> None:
    out = curated["out"]
    tar = out / "pairs/00001.tar"
    full = tar.stat().st_size
    cut = member_offset(out, "pairs/00001.parquet", "0000100000.jpg") + 50
    tar.write_bytes(tar.read_bytes()[:cut])
    errors = verify(out).errors
    assert f"pairs/00001.tar: {cut} bytes, manifest says {full}" in errors
    assert any(e.startswith("pairs/00001.tar: member '0000100000.jpg' ends at byte") and "past the end" in e
               for e in errors)
    assert any(e.startswith("pairs/00001.tar: webdataset reads") and e.endswith("manifest says 2") for e in errors)


def test_stray_tar(curated: dict[str, Any]) -> None:
    out = curated["out"]
    shutil.copy(out / "pairs/00000.tar", out / "pairs/00002.tar")
    assert verify(out).errors == ["pairs/00002.tar: not named by the manifest"]


def test_leftover_tmp_files(curated: dict[str, Any]) -> None:
    out = curated["out"]
    (out / "pairs/00000.tar.0123456789ab.tmp").write_bytes(b"partial")
    (out / "_work/seg0").mkdir(parents=True)
    (out / "_work/seg0/00003.parquet.ba9876543210.tmp").write_bytes(b"")
    assert verify(out).errors == [
        "_work/seg0/00003.parquet.ba9876543210.tmp: leftover temporary file",
        "pairs/00000.tar.0123456789ab.tmp: leftover temporary file",
    ]


def test_duplicate_ledger_id(curated: dict[str, Any]) -> None:
    out = curated["out"]
    rewrite_ledger(out, "00001.parquet", "id", "corpus:2", "laion:5")
    assert verify(out).errors == [
        "ledger: id 'laion:5' appears 2 times (in ledger/00000.parquet, ledger/00001.parquet)"]


def test_kept_row_whose_key_is_missing(curated: dict[str, Any]) -> None:
    out = curated["out"]
    rewrite_ledger(out, "00000.parquet", "key", "laion:0", "0000000099")
    assert verify(out).errors == [
        "ledger: kept id 'laion:0' names pairs/00000.tar/0000000099, which no sidecar holds",
        "ledger: pairs/00000.tar/0000000000 is in a sidecar but has no kept ledger row",
    ]


def test_dropped_row_without_reason_and_bad_outcome(curated: dict[str, Any]) -> None:
    out = curated["out"]
    rewrite_ledger(out, "00001.parquet", "drop_reason", "corpus:2", None)
    rewrite_ledger(out, "00001.parquet", "outcome", "warc:2", "maybe")
    errors = verify(out).errors
    assert "ledger/00001.parquet: dropped id corpus:2 has no drop_reason" in errors
    assert "ledger/00001.parquet: id warc:2 has outcome maybe, expected kept or dropped" in errors
    assert "ledger: 6 dropped, manifest counts.dropped says 7" in errors
    assert "ledger: 0 drops lang/lang_mismatch, manifest drops says 1" in errors


def test_manifest_total_disagrees(curated: dict[str, Any], edit_manifest: Any) -> None:
    out = curated["out"]
    edit_manifest(out, lambda m: m["counts"].update(kept=10))
    errors = verify(out).errors
    assert "ledger: 9 kept, manifest counts.kept says 10" in errors
    assert "manifest: counts.kept is 10, the kinds' counts sum to 9" in errors


def test_manifest_shard_count_disagrees(curated: dict[str, Any], edit_manifest: Any) -> None:
    out = curated["out"]
    edit_manifest(out, lambda m: m["kinds"]["pair"]["shards"][0].update(count=4))
    errors = verify(out).errors
    assert "pairs/00000.parquet: 3 rows, manifest says 4" in errors
    assert "pairs/00000.tar: webdataset reads 3 samples, manifest says 4" in errors
    assert "manifest: kinds.pair.count is 5, its shards sum to 6" in errors


def test_sizes_json_disagrees(curated: dict[str, Any]) -> None:
    out = curated["out"]
    (out / "pairs/sizes.json").write_text(json.dumps({"00000.tar": 3, "00001.tar": 3}))
    assert verify(out).errors == [
        "pairs/sizes.json: {'00000.tar': 3, '00001.tar': 3}, manifest counts give {'00000.tar': 3, '00001.tar': 2}"]


def test_symlink_member(curated: dict[str, Any], rehash: Any) -> None:
    out = curated["out"]

    def add_link(members: Members) -> Members:
        link = tarfile.TarInfo("0000100001.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return members + [(link, b"")]

    rewrite_tar(out / "pairs/00001.tar", add_link)
    rehash(out, "pairs/00001.tar")
    assert verify(out).errors == [
        "pairs/00001.tar: member '0000100001.lnk' is a symlink, not a regular file",
        "pairs/00001.tar: member '0000100001.lnk' is not listed in pairs/00001.parquet",
    ]


def test_parent_directory_member(curated: dict[str, Any], rehash: Any) -> None:
    out = curated["out"]

    def add_escape(members: Members) -> Members:
        escape = tarfile.TarInfo("../x.jpg")
        escape.size = 3
        return members + [(escape, b"abc")]

    rewrite_tar(out / "pairs/00001.tar", add_escape)
    rehash(out, "pairs/00001.tar")
    errors = verify(out).errors
    assert "pairs/00001.tar: unsafe member name '../x.jpg'" in errors
    assert "pairs/00001.tar: webdataset sample '../x' is in no sidecar row" in errors


def test_pair_without_caption_member(curated: dict[str, Any], rehash: Any) -> None:
    out = curated["out"]
    rewrite_tar(out / "pairs/00001.tar", lambda ms: [m for m in ms if m[0].name != "0000100001.txt"])
    rehash(out, "pairs/00001.tar")
    errors = verify(out).errors
    assert "pairs/00001.tar: missing member 0000100001.txt" in errors
    assert "pairs/00001.parquet: key 0000100001 lists member 0000100001.txt, which pairs/00001.tar lacks" in errors


def test_wrong_sidecar_offset(curated: dict[str, Any], rehash: Any) -> None:
    out = curated["out"]
    path = out / "pairs/00000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    image = rows[1]["members"][0]
    assert image["name"] == "0000000001.jpg"
    right = image["offset"]
    image["offset"] = right + 512
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    rehash(out, "pairs/00000.parquet")
    size = image["size"]
    assert verify(out).errors == [
        f"pairs/00000.parquet: 0000000001.jpg at offset {right + 512} size {size}, "
        f"but pairs/00000.tar has it at offset {right} size {size}",
        f"pairs/00000.parquet: bytes at offset {right + 512} size {size} differ "
        f"from member 0000000001.jpg as webdataset read it ({size} bytes)",
    ]


def test_manifest_cannot_point_outside(curated: dict[str, Any], edit_manifest: Any) -> None:
    out = curated["out"]
    edit_manifest(out, lambda m: m["kinds"]["text"]["shards"][0].update(name="../../../etc/passwd"))
    errors = verify(out).errors
    assert any(e.startswith("manifest: text shard 0 is named '../../../etc/passwd'") and e.endswith("not opened")
               for e in errors)


def test_garbage_files_are_findings_not_crashes(curated: dict[str, Any], rehash: Any) -> None:
    out = curated["out"]
    (out / "docs/00000.parquet").write_bytes(b"not parquet")
    rehash(out, "docs/00000.parquet")
    (out / "text/00000.tar").write_bytes(b"\x00" * 100 + b"junk" * 300)
    rehash(out, "text/00000.tar")
    report = verify(out)
    assert not report.ok
    assert any(e.startswith("docs/00000.parquet: unreadable") for e in report.errors)
    assert "text/00000.tar: webdataset reads 0 samples, manifest says 2" in report.errors
    assert "ledger: text/00000.tar/0000000000 is in a sidecar but has no kept ledger row" not in report.errors


def test_missing_manifest(tmp_path: Path) -> None:
    report = verify(tmp_path)
    assert not report.ok and report.errors[0].startswith("manifest:")


def test_key_repeated_across_shards_of_a_kind(curated: dict[str, Any], rehash: Any) -> None:
    """pairs/00001.tar's first sample renamed to pairs/00000.tar's first key, consistently everywhere."""
    out = curated["out"]
    old, new = "0000100000", "0000000000"

    def rename(members: Members) -> Members:
        for ti, data in members:
            if ti.name.startswith(old):
                ti.name = new + ti.name[len(old):]
        return [(ti, data.replace(f'"key":"{old}"'.encode(), f'"key":"{new}"'.encode())) for ti, data in members]

    rewrite_tar(out / "pairs/00001.tar", rename)
    rehash(out, "pairs/00001.tar")
    path = out / "pairs/00001.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["key"] = new
    for m in rows[0]["members"]:
        m["name"] = new + m["name"][len(old):]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    rehash(out, "pairs/00001.parquet")
    rewrite_ledger(out, "00000.parquet", "key", "laion:3", new)
    assert verify(out).errors == ["pairs: key '0000000000' appears in pairs/00000.tar, pairs/00001.tar"]


def test_keys_may_repeat_across_kinds(curated: dict[str, Any]) -> None:
    """Shard numbers restart per kind, so pairs, docs and text all hold key 0000000000: not an error."""
    out = curated["out"]
    first = {kind: pq.read_table(out / f"{kind}/00000.parquet", columns=["key"])["key"][0].as_py()
             for kind in ("pairs", "docs", "text")}
    assert set(first.values()) == {"0000000000"}
    assert verify(out).ok


@pytest.mark.parametrize("change", [
    lambda m: m.update(kinds=[]),
    lambda m: m["kinds"]["pair"].update(shards=["pairs/00000.tar"]),
    lambda m: m.update(ledger="ledger/00000.parquet"),
    lambda m: m["counts"].update(kept="9"),
    lambda m: m["kinds"]["pair"].update(withdrawn=["pairs/00000.tar/0000000000"]),
])
def test_malformed_manifest_is_reported(curated: dict[str, Any], edit_manifest: Any, change: Any) -> None:
    edit_manifest(curated["out"], change)
    report = verify(curated["out"])
    assert not report.ok and len(report.errors) == 1 and report.errors[0].startswith("manifest: `")


def test_non_integer_shard_count_is_not_trusted(curated: dict[str, Any], edit_manifest: Any) -> None:
    edit_manifest(curated["out"], lambda m: m["kinds"]["text"]["shards"][0].update(count="2"))
    errors = verify(curated["out"]).errors
    size = curated["manifest"]["kinds"]["text"]["shards"][0]["bytes"]
    assert f"manifest: text/00000.tar count/bytes '2'/{size} are not non-negative integers; not opened" in errors


def test_doc_image_member_missing(curated: dict[str, Any], rehash: Any) -> None:
    out = curated["out"]
    rewrite_tar(out / "docs/00000.tar", lambda ms: [m for m in ms if m[0].name != "0000000000.1.png"])
    rehash(out, "docs/00000.tar")
    errors = verify(out).errors
    assert "docs/00000.tar: 0000000000.json has image segments [0, 1], the tar has image members [0]" in errors


def test_sidecar_copies_disagreeing_with_the_members(curated: dict[str, Any], rehash: Any) -> None:
    """A text sidecar's `text` must be KEY.txt and a carried `meta_<name>` KEY.json's `name`."""
    out = curated["out"]
    for name, column, value in [("text/00000.parquet", "text", "edited"), ("pairs/00000.parquet", "meta_n", 7)]:
        table = pq.read_table(out / name)
        i = table.schema.get_field_index(column)
        values = table[column].to_pylist()
        values[1] = value
        pq.write_table(table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type)),
                       out / name)
        rehash(out, name)
    assert verify(out).errors == [
        "pairs/00000.parquet: key 0000000001: meta_n is 7, 0000000001.json has 'n': 1",
        "text/00000.parquet: key 0000000001: `text` differs from 0000000001.txt",
    ]
