"""The reader on a misbehaving object store: a small real output (tests/train/data/test_shards.py's
`build_output`) on the session's loopback S3 server (moto; tests/conftest.py `s3_server`), read
through `FlakyProxy` (tools/servers/s3.py), which answers 503 or resets the connection by rule. The
retries are the storage seam's (curate/storage.py), which the reader reads through.

botocore's own retries are off (`NO_RETRIES`: AWS_MAX_ATTEMPTS=1), so every fault reaches the
reader; the exact retry counts below show that the setting takes effect (a botocore retry would
swallow a 503 before the reader saw it). A transient fault is retried and counted, never skipped;
a store that stays down raises StoreUnavailable naming the URL; a missing object is not retried.
Time bounds are generous guards against hangs, not timings."""

from __future__ import annotations

import errno
import re
import time
from collections import Counter
from dataclasses import replace

import fsspec
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from curate import storage
from curate.contract import RETRIES, RETRY_ATTEMPTS, RateLimitedLog, StoreUnavailable, is_transient_error
from tests.train.data.test_shards import build_output
from tools.servers.s3 import NO_RETRIES, Fault, FlakyProxy, forget_clients
from train.data import shards
from train.data.shards import CorruptSample, ShardStream, list_shards, read_sample

pytestmark = pytest.mark.usefixtures("loopback_only")

HANG = 60  # seconds: a bound against a hang


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory):
    """(local output, its copy at s3://BUCKET/out, the same copy less pairs/00000.tar and
    pairs/00001.parquet at s3://BUCKET/broken, the proxy): uploaded straight to the server; while
    the module runs this process reaches the store through the proxy, with botocore's retries off."""
    local = build_output(tmp_path_factory.mktemp("store_faults") / "out")
    with s3_server.environment():
        bucket = s3_server.create_bucket()
        fs = fsspec.filesystem("s3")
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            fs.pipe(f"{bucket}/out/{rel}", path.read_bytes())
            if rel not in ("pairs/00000.tar", "pairs/00001.parquet"):
                fs.pipe(f"{bucket}/broken/{rel}", path.read_bytes())
        proxy = FlakyProxy(s3_server.endpoint)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**proxy.env(), **NO_RETRIES}.items():
                mp.setenv(key, value)
            forget_clients()
            yield local, f"s3://{bucket}/out", f"s3://{bucket}/broken", proxy
            forget_clients()
        proxy.stop()


def _read_all(outs: list[str]) -> tuple[list[tuple[str, dict[str, bytes]]], ShardStream]:
    stream = ShardStream(*list_shards(outs, "pair"), seed=3, slot=0, n_slots=1, open_shards=2, shuffle_buffer=4)
    return [(s.ref.key, s.data) for s in stream], stream


def test_transient_faults_are_retried_counted_and_read_exactly(store, monkeypatch, caplog):
    local, url, _, proxy = store
    clean, _ = _read_all([str(local)])
    assert len(clean) == 7
    monkeypatch.setattr(storage, "retry_log", RateLimitedLog(storage.log))  # this test's retries logged afresh
    proxy.set_faults(
        Fault(r"/out/manifest\.json$", times=1),  # 503
        Fault(r"^/[^/]+/?$", times=1),  # the bucket: list_shards' folder listing
        Fault(r"/out/pairs/00001\.parquet$", times=1),
        Fault(r"/out/pairs/00000\.tar$", times=2, how="reset"),  # aiohttp re-sends once: one reaches us
        Fault(r"/out/pairs/00001\.tar$", times=2),  # two 503s in a row for one read
    )
    before = Counter(RETRIES)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="curate.storage"):
        got, stream = _read_all([url])
    assert time.monotonic() - t0 < HANG
    assert got == clean  # the same samples, the same bytes, the same order
    assert Counter(RETRIES) - before == {"manifest": 1, "listing": 1, "sidecar": 1, "range": 3}
    assert stream.stats == {"read": 7, "retried": 4}  # the sidecar and range retries; nothing skipped
    assert [o for _, _, o in proxy.requests].count("503") == 5
    assert [o for _, _, o in proxy.requests].count("reset") == 2
    assert "[store_retry #1] manifest" in caplog.text and f"{url}/pairs/00001.tar" in caplog.text


@pytest.mark.parametrize("fault, named, requests", [
    (Fault(r"\.tar$", times=None), r"pairs/0000[01]\.tar", RETRY_ATTEMPTS),
    (Fault(r"\.parquet$", times=None, how="reset"), r"pairs/0000[01]\.parquet", 2 * RETRY_ATTEMPTS),
])
def test_a_store_that_stays_down_stops_the_stream_naming_the_url(store, monkeypatch, fault, named, requests):
    _, url, _, proxy = store
    monkeypatch.setattr(storage, "RETRY_FIRST_S", 0.01)  # the schedule's shape, not its 8 s of waiting
    monkeypatch.setattr(storage, "RETRY_MAX_S", 0.05)
    stream = ShardStream(*list_shards([url], "pair"), seed=3, slot=0, n_slots=1)
    proxy.set_faults(fault)
    before = Counter(RETRIES)
    t0 = time.monotonic()
    expected = re.escape(url) + "/" + named + f": the store failed {RETRY_ATTEMPTS} tries"
    with pytest.raises(StoreUnavailable, match=expected) as err:
        next(stream)
    assert time.monotonic() - t0 < HANG
    assert ("(HTTP 503)" if fault.how == "503" else "EndpointConnectionError") in str(err.value)
    assert sum((Counter(RETRIES) - before).values()) == RETRY_ATTEMPTS - 1
    # our tries and no hidden botocore retries (aiohttp re-sends a reset GET or HEAD once)
    assert [o for _, _, o in proxy.requests].count(fault.how) == requests
    assert not [k for k in stream.stats if k.startswith("skipped/")]


def test_a_missing_object_is_not_retried(store):
    _, url, _, proxy = store
    proxy.set_faults()
    ref = shards.list_samples([url], "pair")[0]
    proxy.set_faults()
    before = Counter(RETRIES)
    with pytest.raises(CorruptSample, match="missing"):
        read_sample(replace(ref, shard="elsewhere/00042.tar"))  # a folder no listing cached
    assert Counter(RETRIES) == before  # s3fs's HEAD (404), then its listing to rule out a folder
    assert [(m, o) for m, _, o in proxy.requests] == [("HEAD", "404"), ("GET", "200")]


def test_missing_shard_files_on_the_store_fail_at_list_time_with_one_listing_per_folder(store):
    _, url, broken, proxy = store
    proxy.set_faults()
    with pytest.raises(FileNotFoundError) as err:
        list_shards([url, broken], "pair")
    assert f"{broken}: 2 of the 4 pair shard files" in str(err.value)
    assert f"{broken}/pairs/00000.tar" in str(err.value) and f"{broken}/pairs/00001.parquet" in str(err.value)
    listings = [p for _, p, _ in proxy.requests if "list-type" in p]
    assert len(listings) == 2, proxy.requests  # one folder (pairs/) per output, not one request per shard


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _as_s3fs_raises(error: ClientError) -> OSError:
    exc = OSError(errno.EIO, str(error))  # what s3fs.errors.translate_boto_error makes of an unmapped code
    exc.__cause__ = error
    return exc


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (TimeoutError("read timed out"), True),
    (OSError(errno.EIO, "i/o"), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), True),
    (_as_s3fs_raises(_client_error(503, "ServiceUnavailable")), True),
    (_as_s3fs_raises(_client_error(500, "InternalError")), True),
    (_client_error(429, "TooManyRequests"), True),
    (FileNotFoundError("gone"), False),
    (PermissionError("denied"), False),
    (IsADirectoryError("a folder"), False),
    (_as_s3fs_raises(_client_error(416, "InvalidRange")), False),
    (_client_error(400, "BadRequest"), False),
    (ValueError("a bad parquet footer"), False),
    (StoreUnavailable("already given up"), False),
])
def test_which_errors_are_transient(exc, transient):
    assert is_transient_error(exc) is transient
