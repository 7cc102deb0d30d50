"""The download benchmark at a toy size: both pipelines fetch and resize every URL from the
loopback server, and the report carries what BENCHMARKS.md quotes. One worker each: every
pipeline starts its own processes (img2dataset's import alone is seconds of CPU each), and the
per-worker accounting shows with one as with two."""

from __future__ import annotations

import pytest

from tools.bench.download_vs_img2dataset import bench, print_table

pytest.importorskip("img2dataset")
pytestmark = pytest.mark.usefixtures("loopback_only")

RUN_KEYS = {
    "seconds", "inputs", "ok", "failed", "images_per_s", "images_per_s_per_core", "cpu_ms_per_image",
    "worker_peak_rss_mib", "driver_peak_rss_mib", "tree_peak_rss_mib", "server_cpu_s", "foreign_cpu_share",
    "runs",
}


@pytest.mark.slow
def test_both_pipelines_fetch_every_url(capsys: pytest.CaptureFixture[str]) -> None:
    urls, workers = 20, 1
    report = bench(urls=urls, workers=workers, threads=8, unique=10,
                   dask_config={"distributed.worker.profile.enabled": False}, log=lambda s: None)

    expected = {"machine", "settings", "corpus", "server", "ours", "ours_tuned", "img2dataset", "outputs",
                "ratio", "ratio_tuned", "goal_met"}
    assert expected <= set(report)
    assert report["corpus"]["urls"] == urls and report["corpus"]["large_ge_2800px"] > 0
    assert report["server"]["requests"] == urls
    for which in ("ours", "ours_tuned", "img2dataset"):
        run = report[which]
        assert RUN_KEYS <= set(run), which
        assert (run["ok"], run["inputs"], run["failed"]) == (urls, urls, 0), (which, run["failures"])
        assert run["worker_peak_rss_mib"] > 0 and len(run["worker_peak_rss_each_mib"]) == workers, which
    # identical work: the same output size for every URL (smaller side 256)
    assert report["outputs"] == {"compared": urls, "same_size": urls, "within_1px": urls, "min_side_256": urls}
    assert report["ratio"] > 0 and report["ratio_tuned"] > 0

    print_table(report)
    out = capsys.readouterr().out
    assert "ratio ours / img2dataset" in out and "ours, tuned" in out
