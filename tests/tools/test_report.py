"""`mm1 report` on the session's curated demo output (all three kinds, curated by the real runner),
checked in headless Chromium (Debian's chromium, driven through chromedriver by selenium; started
as the issue says: --headless --no-sandbox --disable-gpu --disable-background-networking
--disable-component-update --disable-sync --no-first-run and a fresh user-data dir): the page
loads with no console error and no network request, its figures are there, every number it marks
as `mm1 stats`' (data-stat) equals compute_stats', and a screenshot is saved
(test-output/report.png). Then two runs side by side: the demo against its own inputs curated
again with another score cut. In both, no chart's tick labels overlap (their boxes as Chromium
lays them out). Without the browser: the funnel lists every stage of the recipe, the mixture
section needs more than one kind, stage times are listed in recipe order (and only where the
manifest records them), score histograms count dropped rows, and recipes are compared stage by
stage."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tools.report import build_report, collect, dropped_score, score_histograms
from tools.report_html import align_stages, recipe_changes, render
from tools.stats import compute_stats

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "test-output"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Debian's chromium and chromium-driver are missing: `make test` installs them with apt-get")
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _open(driver, path: Path) -> tuple[list[dict], list[str]]:
    """Load the page; return (console entries, URLs of every request the page made). Chromium's
    own pages (chrome://new-tab-page at start) are not the page's requests; any request to a
    network scheme, from whatever document, fails the test."""
    driver.get_log("browser"), driver.get_log("performance")  # drop what came before
    driver.get(path.as_uri())
    console = driver.get_log("browser")
    requests = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            assert not url.startswith(("http:", "https:", "ws:", "wss:", "ftp:")), f"a network request: {url}"
            if msg["params"].get("documentURL") == path.as_uri():
                requests.append(url)
    return console, requests


def _resolve(stats: dict, path: str):
    value = stats
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _shown(text: str) -> float:
    text = text.strip().replace(",", "")
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


# every chart's tick labels as laid out: [chart label, [[text, left, top, right, bottom], ...]]
_TICKS = """return Array.from(document.querySelectorAll('svg.chart')).map(svg => [svg.getAttribute('aria-label'),
  Array.from(svg.querySelectorAll('text')).map(t => { const r = t.getBoundingClientRect();
    return [t.textContent, r.left, r.top, r.right, r.bottom]; })]);"""


def _overlapping_labels(driver) -> list:
    bad = []
    for chart, boxes in driver.execute_script(_TICKS):
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]:
                    bad.append((chart, a[0], b[0]))
    return bad


def test_the_report_in_a_real_browser(demo_output, browser, tmp_path):
    from selenium.webdriver.common.by import By

    out = demo_output[0]
    path = build_report([out], tmp_path / "report.html")
    console, requests = _open(browser, path)
    assert [e for e in console if e["level"] in ("SEVERE", "WARNING")] == []
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests
    assert [u for u in requests if u.startswith("file://")] == [path.as_uri()]

    # the figures: every section, charts, the score cut drawn, thumbnails that decoded
    for section in ("overview", "funnel", "stages", "domains", "distributions", "mixture", "samples"):
        assert browser.find_element(By.ID, section).is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) >= 20
    assert len(browser.find_elements(By.CSS_SELECTOR, "line.threshold")) == 1  # score_top_fraction's cutoff
    assert browser.find_elements(By.CSS_SELECTOR, "rect.dropped")  # the rows below it, from the ledger
    assert _overlapping_labels(browser) == []
    images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= 12 and all(done and width > 0 for done, width in images)
    cards = browser.find_elements(By.CSS_SELECTOR, "#samples .sample")
    assert len(cards) == 12 + 8 + 10  # 12 of the 26 pairs, every doc and text (fewer than 12)

    # the numbers: each marked one equals mm1 stats', in its data and as shown
    stats = compute_stats(out)
    marked = browser.find_elements(By.CSS_SELECTOR, "[data-stat]")
    assert len(marked) >= 60
    for el in marked:
        key, value = el.get_attribute("data-stat"), json.loads(el.get_attribute("data-value"))
        assert value == _resolve(stats, key), key
        assert math.isclose(_shown(el.text), value, rel_tol=1e-3, abs_tol=5.01e-4), (key, el.text, value)  # half a shown digit (6.25% shows 6.2%)
    kept = browser.find_element(By.CSS_SELECTOR, '[data-stat="outcomes.kept"]').text
    assert kept == f"{stats['outcomes']['kept']:,}" == "44"

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(int(height), 16000))
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "report.png"))
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000


def test_hostile_strings_in_the_data_stay_text(demo_output, browser, tmp_path):
    """A caption holding markup and a script tag: the page shows it as text and runs nothing."""
    import pyarrow.parquet as pq

    out = tmp_path / "curated"
    shutil.copytree(demo_output[0], out)
    from curate.contract import read_manifest

    shard = read_manifest(out)["kinds"]["pair"]["shards"][0]
    table = pq.read_table(out / shard["sidecar"])
    captions = table.column("caption").to_pylist()
    captions[0] = '<script>document.title="owned"</script><img src="http://127.0.0.1:9/x.png"> &amp; "quotes"'
    table = table.set_column(table.schema.get_field_index("caption"), "caption",
                             __import__("pyarrow").array(captions, table.schema.field("caption").type))
    pq.write_table(table, out / shard["sidecar"])
    run = collect(out, samples=40)
    assert any("<script>" in (s.get("caption") or "") for s in run.samples["pair"])
    path = build_report([out], tmp_path / "hostile.html", samples=40)
    console, requests = _open(browser, path)
    assert browser.title.startswith("mm1 report") and "owned" not in browser.title
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    assert '<script>document.title="owned"</script>' in browser.find_element("id", "samples").text


@pytest.fixture(scope="module")
def stricter(demo_run, shared_cluster, tmp_path_factory):
    """The session demo's pair sources curated again with score_top_fraction at 0.5 instead of
    0.9, on the session's cluster (the crawl and the text corpus left out: the comparison is about
    the pairs' cut, and their stages are most of the demo's work). The URL list names the demo
    server's port, so the demo's www is served again on that port; the demo's recaption cache is
    copied in (the same images: the models are asked nothing); the demo's own files stay
    untouched."""
    from curate.recipe import parse_recipe
    from curate.recipe_io import read_recipe_yaml
    from curate.stages import STAGES
    from tools.demo.run import DEMO_RECIPE, demo_overrides
    from tools.demo.server import PORT_ENV, serve

    root = tmp_path_factory.mktemp("stricter")
    shutil.copytree(demo_run.root / "recaption_cache", root / "recaption_cache")
    data = read_recipe_yaml(DEMO_RECIPE, {**demo_overrides(demo_run.root), "output.path": str(root / "strict")})
    data["sources"] = [s for s in data["sources"] if s["kind"] not in ("warc", "text_corpus")]
    data["stages"] = [s for s in data["stages"] if "pair" in STAGES[s["kind"]].kinds]
    for stage in data["stages"]:
        if stage["kind"] == "score_top_fraction":
            stage["fraction"] = 0.5
        if stage["kind"] == "recaption":
            stage["cache_dir"] = str(root / "recaption_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PORT_ENV, demo_run.summary["server"].rsplit(":", 1)[1])
        with serve(demo_run.root / "inputs" / "www"):
            shared_cluster.run(parse_recipe(data, "<stricter demo>"))
    return root / "strict"


def test_two_runs_side_by_side_show_what_the_threshold_moved(demo_output, stricter, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from tools.cli import main

    path = tmp_path / "compare.html"
    assert main(["report", str(demo_output[0]), str(stricter), "-o", str(path), "--samples", "4"]) == 0
    console, requests = _open(browser, path)
    assert [e for e in console if e["level"] == "SEVERE"] == []
    assert all(u.startswith(("file://", "data:")) for u in requests)
    changes = browser.find_element(By.ID, "changes").text
    a, b = compute_stats(demo_output[0]), compute_stats(stricter)
    assert b["outcomes"]["kept"] < a["outcomes"]["kept"]
    row = next(line for line in changes.splitlines() if line.startswith("score_top_fraction/clip_score_low"))
    count_a = next(d["count"] for d in a["drops"]["ranked"] if d["stage"] == "score_top_fraction")
    count_b = next(d["count"] for d in b["drops"]["ranked"] if d["stage"] == "score_top_fraction")
    assert row.split()[1:] == [str(count_a), str(count_b), f"+{count_b - count_a}"]
    assert "fraction: 0.9 → 0.5" in changes  # the recipe difference, by stage
    assert _overlapping_labels(browser) == []
    for section in ("funnel", "stages", "distributions", "samples"):
        columns = browser.find_elements(By.CSS_SELECTOR, f"#{section} [data-run]")
        assert [c.get_attribute("data-run") for c in columns] == ["0", "1"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "line.threshold")) == 2  # each run's cut


def _recipe(stages: list[dict]) -> dict:
    return {"output": {"path": "out"}, "sources": [{"kind": "url_list", "path": "a.parquet"}], "stages": stages}


def test_recipes_compare_stage_by_stage():
    """A stage inserted in the middle: it is the one difference reported (not every later stage),
    a later stage whose option changed is named with that option, a removed one as removed."""
    a = [{"kind": "download"}, {"kind": "image"}, {"kind": "score_filter", "name": "clip_cut", "min_score": 0.2},
         {"kind": "exact_dedup"}]
    b = [{"kind": "download"}, {"kind": "caption_length_filter", "min_words": 2}, {"kind": "image"},
         {"kind": "score_filter", "name": "clip_cut", "min_score": 0.3}]
    assert [(st, (sa or sb)["kind"]) for st, sa, sb in align_stages(a, b)] == [
        ("same", "download"), ("added", "caption_length_filter"), ("same", "image"), ("changed", "score_filter"),
        ("removed", "exact_dedup")]
    diff = recipe_changes(_recipe(a), {**_recipe(b), "output": {"path": "out2"}})
    assert [(d["status"], d["where"]) for d in diff] == [
        ("added", "stage caption_length_filter"), ("changed", "stage clip_cut (score_filter)"),
        ("removed", "stage exact_dedup"), ("changed", "output.path")]
    assert diff[1]["what"] == "min_score: 0.2 → 0.3"
    assert diff[0]["what"] == 'added: {"min_words": 2}'


def test_funnel_lists_every_stage_and_the_mixture_needs_two_kinds(curated, edit_manifest, tmp_path):
    """The fixture's recipe names stages that dropped nothing: they are in the funnel, in order,
    with 0. With pairs only, the page has no mixture section."""
    out = curated["out"]
    stages = [{"kind": "caption_length_filter"}, {"kind": "download"},
              {"kind": "image_size_filter", "name": "image_filter"}, {"kind": "score_filter", "min_score": 0.1},
              {"kind": "language_filter", "name": "lang"}]
    edit_manifest(out, lambda m: m.update(recipe={"stages": stages}))
    run = collect(out, samples=1)
    assert [(r["stage"], r["dropped"], r["remaining"]) for r in run.funnel["pair"]] == [
        ("inputs", 0, 10), ("caption_length_filter", 0, 10), ("download", 4, 6), ("image_filter", 1, 5),
        ("score_filter", 0, 5), ("lang", 0, 5)]
    assert [r["stage"] for r in run.funnel["text"]] == ["inputs", "lang", "dedup"]  # dedup: not in this recipe
    html = build_report([out], tmp_path / "three.html", samples=1).read_text()
    assert 'id="mixture"' in html and 'href="#mixture"' in html

    def pairs_only(m: dict) -> None:
        for kind in ("doc", "text"):
            del m["kinds"][kind]
    edit_manifest(out, pairs_only)
    html = build_report([out], tmp_path / "pairs.html", samples=1).read_text()
    assert 'id="mixture"' not in html and 'href="#mixture"' not in html and 'id="funnel"' in html


def test_stage_times_list_every_stage_in_recipe_order(demo_output, curated, tmp_path):
    """The demo's manifest records each stage's seconds: the "Stage times" section has a row per
    stage of its recipe, in the recipe's order, in each column of a comparison; an output written
    before the manifest had `stages` (the synthetic fixture's) has no such section."""
    run = collect(demo_output[0], samples=0)
    order = [s.get("name") or s["kind"] for s in run.manifest.recipe["stages"]]

    def listed(page: str, column: str = "") -> list[str]:
        section = re.search(r'<section id="stages".*?</section>', page, re.S).group(0)
        if column:
            section = re.search(rf'<div data-run="{column}">.*?</table>', section, re.S).group(0)
        return re.findall(r"<tr><td>([^<]+)</td><td>(?:rows|global)</td>", section)

    one = render([run])
    assert 'href="#stages"' in one and listed(one) == order
    two = render([run, run])
    assert listed(two, "0") == listed(two, "1") == order
    bare = build_report([curated["out"]], tmp_path / "bare.html", samples=0).read_text()
    assert 'id="stages"' not in bare and 'href="#stages"' not in bare and 'id="funnel"' in bare


def test_score_histograms_count_kept_and_dropped_rows():
    """Dropped rows' scores come from the ledger's details (both score rules lead them with the
    score); kept and dropped are counted over the same bins."""
    assert dropped_score("clip_score_low", "clip_score 0.1234 < 0.28") == ("clip_score", 0.1234)
    assert dropped_score("clip_score_low", "clip_score 0.2000, not in the top 90% by clip_score (cutoff 0.3, id a)") \
        == ("clip_score", 0.2)
    assert dropped_score("clip_score_low", "no clip_score") is None
    assert dropped_score("too_small", "32x32 < 64") is None
    h = score_histograms({"clip_score": [np.array([0.5, 0.9])]}, {"clip_score": [0.1, 0.2]},
                         {"clip_score": [{"value": 0.3, "label": "cut"}]})["clip_score"]
    assert (h["n"], h["n_dropped"], sum(h["counts"]), sum(h["dropped"])) == (2, 2, 2, 2)
    assert h["edges"][0] == 0.1 and h["edges"][-1] == 0.9 and h["dropped"][0] == 1 and h["counts"][-1] == 1
