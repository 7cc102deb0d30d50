"""tools/bench/object_store.py at a toy size: the run on moto's S3 server (loopback) writes what
the local run writes, and the request counts add up to at least what the output holds."""

from __future__ import annotations

import pytest

from tools.bench.object_store import bench, classify

pytestmark = pytest.mark.usefixtures("loopback_only")


def test_classify_names_the_s3_calls():
    assert classify("GET", "/bucket/out/manifest.json") == "GET"
    assert classify("GET", "/bucket?list-type=2&prefix=out%2F") == "LIST"
    assert classify("POST", "/bucket/out/x.tar?uploads") == "multipart"
    assert classify("POST", "/bucket?delete") == "DELETE (batch)"
    assert classify("PUT", "/bucket/out/_work/done/seg0-00000.json") == "PUT"


def test_the_bench_at_a_toy_size():
    result = bench(n_images=40, per_partition=20, workers=1)
    assert result["same_output"] and result["partitions"] == 2 and result["kept"] >= 30
    # every shard, sidecar, ledger file and marker is one PUT at least
    assert result["requests"]["PUT"] >= 2 * result["shards"] + 2 * result["partitions"]
    assert result["requests_total"] == sum(result["requests"].values())
    assert result["local_wall_s"] > 0 and result["s3_wall_s"] > 0
