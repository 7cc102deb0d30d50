"""The storage seam (curate/storage.py) on a local folder and on fsspec's in-memory store: names
from a manifest stay inside the output, reads give the same bytes wherever the data lies, listings
find what is missing, and transient store errors are retried, counted and bounded. (The retries
against a real failing S3 server: tests/train/data/test_store_faults.py.)"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import storage
from curate.storage import (
    RETRIES, RETRY_ATTEMPTS, StoreUnavailable, exists, inside, is_url, join, list_names, location, missing_files,
    open_read, parquet_files, read_json, read_range, read_schema, read_table, retrying,
)

TABLE = pa.table({"key": ["a", "b", "c"], "n": [1, 2, 3]})


@pytest.fixture
def outputs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """The same small output in a local folder and at a memory:// URL (files: a.bin, t/00000.parquet,
    j.json): [folder, folder as file://, URL]."""
    url = f"memory://storage-test/{request.node.name}"
    fs = fsspec.filesystem("memory")
    files = {"a.bin": bytes(range(256)), "j.json": b'{"x": [1, 2]}'}
    buf = pa.BufferOutputStream()
    pq.write_table(TABLE, buf)
    files["t/00000.parquet"] = buf.getvalue().to_pybytes()
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
        fs.pipe(f"{url}/{name}", data)
    yield [str(tmp_path), tmp_path.as_uri(), url]
    fs.rm(url, recursive=True)


def test_locations_and_names_that_leave_the_output(tmp_path: Path) -> None:
    assert not is_url(tmp_path) and not is_url(tmp_path.as_uri()) and is_url("s3://bucket/out")
    assert location(tmp_path.as_uri()) == tmp_path
    assert join("s3://bucket/out/", "pairs/00000.tar") == "s3://bucket/out/pairs/00000.tar"
    assert join(tmp_path.as_uri(), "pairs/00000.tar") == f"{tmp_path.as_uri()}/pairs/00000.tar"  # spelled as given
    assert join(str(tmp_path), "pairs/00000.tar") == str(tmp_path / "pairs/00000.tar")
    assert inside(tmp_path, "pairs/00000.tar") == tmp_path / "pairs/00000.tar"
    for bad in ("../elsewhere.tar", "/etc/passwd", "pairs/../../x", ""):
        for put in (join, inside):
            with pytest.raises(ValueError, match="outside the output folder"):
                put("s3://bucket/out", bad)


def test_reads_give_the_same_wherever_the_output_lies(outputs: list[str]) -> None:
    for out in outputs:
        assert read_range(join(out, "a.bin"), 10, 14) == bytes([10, 11, 12, 13])
        assert read_range(join(out, "a.bin"), 250, 300) == bytes(range(250, 256))  # shorter: the caller checks
        assert read_range(join(out, "a.bin"), 300, 310) == b""
        assert read_json(join(out, "j.json")) == {"x": [1, 2]}
        assert read_table(join(out, "t/00000.parquet"), ["key"]).column("key").to_pylist() == ["a", "b", "c"]
        assert read_table(location(out) / "t").equals(TABLE)  # a folder of parquet files
        assert read_schema(inside(out, "t/00000.parquet")).names == ["key", "n"]
        with open_read(join(out, "a.bin")) as f:
            assert f.read(3) == bytes([0, 1, 2])
        assert exists(join(out, "a.bin")) and not exists(join(out, "b.bin"))
        assert [Path(str(p)).name for p in parquet_files(location(out))] == ["00000.parquet"]
        with pytest.raises(FileNotFoundError):
            read_json(join(out, "missing.json"))


def test_missing_files_from_one_listing_per_folder(outputs: list[str]) -> None:
    for out in outputs:
        assert list_names(out) >= {"a.bin", "j.json", "t"}
        assert list_names(join(out, "nowhere")) == set()
        wanted = ["a.bin", "b.bin", "t/00000.parquet", "t/00001.parquet", "u/00000.tar"]
        assert missing_files(out, wanted) == ["b.bin", "t/00001.parquet", "u/00000.tar"]


def test_transient_errors_are_retried_and_counted_permanent_ones_are_not(monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRY_FIRST_S", 0.001)
    monkeypatch.setattr(storage, "RETRY_MAX_S", 0.002)
    failures = [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("read timed out")]

    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "read"

    before = Counter(RETRIES)
    assert retrying("test-read", "memory://x/y", flaky) == "read"
    assert Counter(RETRIES) - before == {"test-read": 2}

    def missing() -> None:
        raise FileNotFoundError("memory://x/y")

    with pytest.raises(FileNotFoundError):
        retrying("test-read", "memory://x/y", missing)

    def down() -> None:
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(StoreUnavailable, match=rf"memory://x/y: the store failed {RETRY_ATTEMPTS} tries .*"
                                               r"\(test-read\); last error: ConnectionResetError") as err:
        retrying("test-read", "memory://x/y", down)
    assert isinstance(err.value.__cause__, ConnectionResetError)
    assert Counter(RETRIES) - before == {"test-read": 2 + RETRY_ATTEMPTS - 1}
