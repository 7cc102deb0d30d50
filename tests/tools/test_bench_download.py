"""The download benchmark at a toy size: both pipelines fetch and resize every URL from the
loopback server, and the report carries what BENCHMARKS.md quotes."""

from __future__ import annotations

import pytest

from tools.bench.download_vs_img2dataset import bench, print_table

pytest.importorskip("img2dataset")

RUN_KEYS = {
    "seconds", "inputs", "ok", "failed", "images_per_s", "images_per_s_per_core", "cpu_ms_per_image",
    "worker_peak_rss_mib", "driver_peak_rss_mib", "tree_peak_rss_mib", "server_cpu_s",
}


@pytest.mark.slow
def test_both_pipelines_fetch_every_url(capsys: pytest.CaptureFixture[str]) -> None:
    urls = 40
    report = bench(urls=urls, workers=2, threads=8, unique=20, log=lambda s: None)

    expected = {"machine", "settings", "corpus", "server", "ours", "img2dataset", "outputs", "ratio", "goal_met"}
    assert expected <= set(report)
    assert report["corpus"]["urls"] == urls and report["corpus"]["large_ge_2800px"] > 0
    assert report["server"]["requests"] == urls
    for which in ("ours", "img2dataset"):
        run = report[which]
        assert RUN_KEYS <= set(run), which
        assert (run["ok"], run["inputs"], run["failed"]) == (urls, urls, 0), (which, run["failures"])
        assert run["worker_peak_rss_mib"] > 0 and len(run["worker_peak_rss_each_mib"]) == 2, which
    # identical work: the same output size for every URL (smaller side 256)
    assert report["outputs"] == {"compared": urls, "same_size": urls, "within_1px": urls, "min_side_256": urls}
    assert report["ratio"] > 0

    print_table(report)
    assert "ratio ours / img2dataset" in capsys.readouterr().out
