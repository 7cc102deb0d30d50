import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from curate.sources import build_source
from curate.sources.webdataset import WebDatasetConfig

PICTURES = [skdata.astronaut, skdata.camera, skdata.coffee, skdata.chelsea]
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def picture(i: int, ext: str = "jpg") -> bytes:
    img = Image.fromarray(PICTURES[i % 4]()).convert("RGB")
    img.thumbnail((40 + 8 * i, 40 + 8 * i))
    buf = io.BytesIO()
    img.save(buf, format=PIL_FORMATS[ext])
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_shard(folder: Path, shard: int, n: int, exts=("jpg",)) -> list[tuple[str, bytes]]:
    """An img2dataset-style shard `NNNNN.tar` (KEY.jpg KEY.json KEY.txt) and its parquet."""
    members, meta = [], []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        ext = exts[i % len(exts)]
        url = f"https://example.com/{shard}/{i}.{ext}"
        info = {"url": url, "key": key, "caption": f"photo {shard}-{i}", "status": "success", "width": 40 + i}
        members += [(f"{key}.{ext}", picture(i, ext)), (f"{key}.json", json.dumps(info).encode()),
                    (f"{key}.txt", f"photo {shard}-{i}".encode())]
        meta.append(info)
    write_tar(folder / f"{shard:05d}.tar", members)
    pq.write_table(pa.Table.from_pylist(meta), folder / f"{shard:05d}.parquet")
    return members


def source(path, **kw):
    return build_source(WebDatasetConfig(name="web", path=path, **kw))


def read_all(src, batch_size: int = 64) -> list[dict]:
    return [row for p in src.partitions() for t in src.read(p, batch_size) for row in t.to_pylist()]


def test_img2dataset_shards_round_trip(tmp_path):
    members = img2dataset_shard(tmp_path, 0, 4, exts=("jpg", "png", "webp"))
    img2dataset_shard(tmp_path, 1, 3)
    src = source(str(tmp_path))
    parts = src.partitions()
    assert parts == src.partitions() and len(parts) == 2
    json.dumps([p.payload for p in parts])
    rows = read_all(src)
    assert [r["id"] for r in rows] == [f"web:00000.tar/00000000{i}" for i in range(4)] + \
        [f"web:00001.tar/00001000{i}" for i in range(3)]
    assert all(r["drop_reason"] is None for r in rows)
    first, second = rows[0], rows[1]
    assert first["image"] == members[0][1] and first["image_format"] == "jpg"
    assert second["image_format"] == "png" and rows[2]["image_format"] == "webp"
    assert first["url"] == "https://example.com/0/0.jpg" and first["caption"] == "photo 0-0"
    assert json.loads(first["extra"]) == {"status": "success", "width": 40}
    assert Image.open(io.BytesIO(second["image"])).format == "PNG"


def test_paths_globs_lists_and_batches(tmp_path):
    for shard in range(3):
        img2dataset_shard(tmp_path / "a", shard, 3)
    img2dataset_shard(tmp_path / "b", 0, 2)
    src = source(str(tmp_path / "a" / "0000[01].tar"))
    assert [len(p.payload["tars"]) for p in src.partitions()] == [1, 1]
    grouped = source(str(tmp_path / "a"), shards_per_partition=2)
    assert [t.num_rows for p in grouped.partitions() for t in grouped.read(p, batch_size=4)] == [4, 2, 3]
    both = read_all(source([str(tmp_path / "a" / "00000.tar"), str(tmp_path / "b")]))
    ids = [r["id"] for r in both]  # two 00000.tar: ids keep their folder, so they stay unique
    assert ids[0] == "web:a/00000.tar/000000000" and ids[-1] == "web:b/00000.tar/000000001"
    assert len(set(ids)) == len(ids) == 5
    with pytest.raises(FileNotFoundError, match="no tar shards"):
        source(str(tmp_path / "nothing-*.tar")).partitions()


def test_unsafe_members_are_dropped_never_followed(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(picture(1))
    link = tarfile.TarInfo("000000001.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, str(secret)
    hard = tarfile.TarInfo("000000002.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "000000000.jpg"
    folder = tarfile.TarInfo("somedir")
    folder.type = tarfile.DIRTYPE
    shard = write_tar(tmp_path / "shards" / "00000.tar", [
        ("000000000.jpg", picture(0)), ("000000000.txt", b"a cat"),
        link, ("000000001.txt", b"linked"),
        hard, ("000000002.txt", b"hard linked"),
        ("../evil.jpg", picture(2)), ("/abs/evil.txt", b"x"), folder,
        ("000000003.jpg", picture(3)), ("000000003.txt", b"fine"),
    ])
    before = set(os.listdir(tmp_path))
    rows = {r["id"]: r for r in read_all(source(str(shard)))}
    assert set(os.listdir(tmp_path)) == before  # nothing extracted
    unsafe = {k: r["drop_detail"] for k, r in rows.items() if r["drop_reason"] == "unsafe_member"}
    assert set(unsafe) == {"web:00000.tar/000000001.jpg", "web:00000.tar/000000002.jpg", "web:00000.tar/../evil.jpg",
                           "web:00000.tar//abs/evil.txt", "web:00000.tar/somedir"}
    assert "'../evil.jpg'" in unsafe["web:00000.tar/../evil.jpg"] and "link" in unsafe["web:00000.tar/000000001.jpg"]
    assert rows["web:00000.tar/000000001"]["drop_reason"] == "missing_image"  # its image was the link
    assert rows["web:00000.tar/000000000"]["drop_reason"] is None
    assert rows["web:00000.tar/000000003"]["caption"] == "fine"
    assert all(r["image"] != secret.read_bytes() for r in rows.values())


def test_missing_image_no_caption_json_caption_duplicates_and_too_large(tmp_path):
    big = picture(3)
    shard = write_tar(tmp_path / "00000.tar", [
        ("a.txt", b"caption only"),
        ("b.jpg", picture(0)), ("b.json", b'{"url": "https://x.org/b.jpg"}'),
        ("c.jpg", picture(1)), ("c.json", b'{"caption": "from json", "url": "https://x.org/c.jpg"}'),
        ("d.jpg", picture(2)), ("d.txt", b"first d"),
        ("e.jpg", big), ("e.txt", b"big"),
        ("d.jpg", picture(2)), ("d.txt", b"second d"),  # a key seen again later
        ("f.jpg", picture(0)), ("f.json", b"{not json"), ("f.txt", b"\xffbad utf-8"),
    ])
    rows = read_all(source(str(shard), max_member_bytes=len(big) - 1))
    got = {r["id"].removeprefix("web:00000.tar/"): (r["drop_reason"], r["caption"]) for r in rows}
    assert got == {
        "a": ("missing_image", None), "b": ("no_caption", None), "c": (None, "from json"),
        "d": (None, "first d"), "e": ("too_large", None), "d#9": (None, "second d"), "f": (None, "\ufffdbad utf-8"),
    }
    assert rows[1]["url"] == "https://x.org/b.jpg"  # dropped rows keep the url for the ledger


def sample_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [m.offset for m in tar.getmembers()]


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    img2dataset_shard(tmp_path, 0, 8)
    shard = tmp_path / "00000.tar"
    whole = [r["id"] for r in read_all(source(str(shard)))]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    rows = read_all(source(str(shard)))
    kept = [r["id"] for r in rows if r["drop_reason"] is None]
    dropped = [r for r in rows if r["drop_reason"]]
    assert 0 < len(kept) < len(whole) and kept == whole[: len(kept)]
    assert [(r["id"], r["drop_reason"]) for r in dropped] == [("web:00000.tar#error", "read_error")]
    assert "ReadError" in dropped[0]["drop_detail"] or "EOF" in dropped[0]["drop_detail"]
    # the sample cut in the middle is named in the detail, not kept
    assert whole[len(kept)].split("/")[-1] in dropped[0]["drop_detail"]


@pytest.mark.parametrize("damage", ["cut_in_data", "cut_at_header", "corrupt_header", "gzip_cut", "empty"])
def test_damage_tarfile_would_take_for_the_end(tmp_path, damage):
    img2dataset_shard(tmp_path, 0, 4)
    shard = tmp_path / "00000.tar"
    data = bytearray(shard.read_bytes())
    offsets = sample_offsets(shard)  # member header offsets; sample 2 starts at member 6
    if damage == "cut_in_data":  # tarfile notices this one itself
        data = data[: offsets[6] + 512 + 100]
    elif damage == "cut_at_header":  # tarfile alone would take these two for the end
        data = data[: offsets[6]]
    elif damage == "corrupt_header":
        data[offsets[6] : offsets[6] + 512] = b"\x07" * 512
    elif damage == "gzip_cut":
        data = gzip.compress(bytes(data))[:-20]
    else:
        data = b""
    shard.write_bytes(bytes(data))
    rows = read_all(source(str(shard)))
    assert [r["id"] for r in rows if r["drop_reason"] == "read_error"] == ["web:00000.tar#error"]
    kept = [r["id"].rpartition("/")[2] for r in rows if r["drop_reason"] is None]
    # sample 1 is whole when cut at or corrupted in the header after it, but only reading that
    # header would show it ended: the sample at the damage is named in the detail, not kept
    expected = {"cut_in_data": 2, "cut_at_header": 1, "corrupt_header": 1, "gzip_cut": 2, "empty": 0}[damage]
    assert kept == [f"00000000{i}" for i in range(expected)]


def test_gzipped_tar_reads_like_a_plain_one(tmp_path):
    img2dataset_shard(tmp_path / "plain", 0, 3)
    packed = tmp_path / "packed" / "00000.tar"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress((tmp_path / "plain" / "00000.tar").read_bytes()))
    strip = lambda rows: [(r["id"], r["image_sha256"], r["caption"]) for r in rows]  # noqa: E731
    assert strip(read_all(source(str(packed)))) == strip(read_all(source(str(tmp_path / "plain"))))


def test_fingerprints_change_when_a_tar_changes(tmp_path):
    for shard in range(2):
        img2dataset_shard(tmp_path, shard, 2)
    src = source(str(tmp_path))
    before = [p.fingerprint for p in src.partitions()]
    os.utime(tmp_path / "00001.tar", ns=(1, 1))
    after = [p.fingerprint for p in src.partitions()]
    assert before[0] == after[0] and before[1] != after[1]
