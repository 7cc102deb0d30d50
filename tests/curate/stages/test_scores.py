"""Score rules (curate/stages/score_filter.py): the threshold filter, and the exact top fraction through
Dask, equal to the same rule computed on all scores at once, ties and nulls included, whatever
the partitioning and however many histogram passes it takes."""

from __future__ import annotations

import math

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from curate.recipe import RecipeError, parse_recipe
from curate.stages.base import build_stage
from curate.stages.score_filter import ScoreFilter, ScoreTopFraction, find_cutoff, key_score, score_keys


def _reference(frame: pd.DataFrame, fraction: float, lowest: bool = False) -> set[str]:
    """The ids a top-fraction keeps, by the rule written out: sort everything at once (nulls last
    in either order)."""
    n = len(frame)
    k = math.ceil(fraction * n - 1e-9)
    key = (-frame["score"] if lowest else frame["score"]).fillna(-np.inf)
    order = frame.assign(_s=key).sort_values(["_s", "id"], ascending=[False, True], kind="mergesort")
    return set(order["id"].iloc[:k])


def _frame(n: int, seed: int, ties: bool, nulls: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.25, 0.05, n).astype(np.float32).astype(np.float64)
    if ties:  # a few values shared by many rows, right where cutoffs fall
        scores[rng.random(n) < 0.4] = 0.25
        scores[rng.random(n) < 0.1] = np.float32(0.3)
    if nulls:
        scores[rng.random(n) < 0.05] = np.nan
    ids = [f"src:{i:07d}" for i in rng.permutation(n)]
    return pd.DataFrame({"id": ids, "_partition": np.arange(n) % 7, "score": scores})


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.01, 0.999, 1.0])
@pytest.mark.parametrize("ties,nulls", [(False, False), (True, True)])
def test_top_fraction_equals_the_rule_on_all_scores_at_once(fraction, ties, nulls):
    frame = _frame(3000, seed=int(fraction * 1000), ties=ties, nulls=nulls)
    want = _reference(frame, fraction)
    stage = build_stage(ScoreTopFraction.Config(column="score", fraction=fraction, exact_fetch_rows=1000))
    kept_sets = []
    with dask.config.set(scheduler="synchronous"):
        for nparts in (1, 4, 13):
            live = dd.from_pandas(frame, npartitions=nparts)
            dropped = stage.decide(live).compute()
            assert set(dropped["drop_reason"]) <= {"score_low"}
            kept_sets.append(set(frame["id"]) - set(dropped["id"]))
            summary = stage.summary()
            assert summary["rows"] == len(frame) and summary["kept"] == len(want)
    assert all(kept == want for kept in kept_sets)
    if fraction < 1:
        assert summary["cutoff_id"] in want


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_lowest_fraction_keeps_the_lowest_scores_nulls_last(fraction):
    """order: lowest (an NSFW probability): the same exact rule on the reversed order, ties by id,
    nulls still ranked last; the rows dropped are the high ones."""
    frame = _frame(3000, seed=11, ties=True, nulls=True)
    want = _reference(frame, fraction, lowest=True)
    stage = build_stage(ScoreTopFraction.Config(column="score", fraction=fraction, order="lowest",
                                                exact_fetch_rows=1000))
    with dask.config.set(scheduler="synchronous"):
        for nparts in (1, 6):
            dropped = stage.decide(dd.from_pandas(frame, npartitions=nparts)).compute()
            assert set(frame["id"]) - set(dropped["id"]) == want
            assert set(dropped["drop_reason"]) == {"score_high"}
    summary = stage.summary()
    assert summary["cutoff_id"] in want and summary["kept"] == len(want)
    kept = frame[frame["id"].isin(want)]["score"]
    assert summary["cutoff_score"] == pytest.approx(float(np.float32(kept.max())))
    assert "not in the lowest" in dropped["drop_detail"].iloc[0]


def test_histogram_passes_and_a_huge_tie_resolve_exactly():
    """exact_fetch_rows tiny: the cutoff is found through every histogram level, and inside one
    score shared by most rows the rank falls to the id sort."""
    frame = _frame(5000, seed=3, ties=False, nulls=False)
    frame.loc[frame.index[:4000], "score"] = 0.2  # 4,000 rows on one score
    keyed = dd.from_pandas(frame.assign(_key=score_keys(frame["score"].to_numpy())), npartitions=5)
    order = frame.assign(_k=score_keys(frame["score"].to_numpy())).sort_values(
        ["_k", "id"], ascending=[False, True], kind="mergesort")
    with dask.config.set(scheduler="synchronous"):
        for k in (1, 999, 1000, 1001, 2500, 5000):
            key, cut_id = find_cutoff(keyed, k, len(frame), exact_fetch_rows=10)
            assert (key, cut_id) == (int(order["_k"].iloc[k - 1]), order["id"].iloc[k - 1])
    assert key_score(key) == pytest.approx(float(np.float32(order["score"].iloc[-1])))


def test_score_keys_keep_the_order_of_floats():
    values = np.array([np.nan, -1.0, -0.25, -1e-30, 0.0, 1e-30, 0.28, 0.2800001, 1.0, 3.5])
    keys = score_keys(values)
    assert keys[0] == 0 and np.all(np.diff(keys.astype(np.int64)) > 0)
    assert [key_score(int(k)) for k in keys[1:]] == pytest.approx(values[1:].astype(np.float32).tolist())


def test_score_filter_threshold_and_missing_scores():
    stage = ScoreFilter(ScoreFilter.Config(min_score=0.28))
    assert stage.check({"clip_score": 0.3}) is None
    drop = stage.check({"clip_score": 0.2})
    assert (drop.reason, drop.detail) == ("clip_score_low", "clip_score 0.2000 < 0.28")
    assert stage.check({"clip_score": None}).reason == "clip_score_low"
    assert stage.check({}).detail == "no clip_score"


def test_score_filter_max_score_and_both_bounds(tmp_path):
    """max_score keeps scores at most the bound (`<column>_high` above it); with both bounds each
    side drops with its own code; a missing score fails the first bound; no bound fails at load."""
    high = ScoreFilter(ScoreFilter.Config(column="nsfw_score", max_score=0.5))
    assert high.check({"nsfw_score": 0.5}) is None
    assert high.check({"nsfw_score": 0.9}) == ("nsfw_score_high", "nsfw_score 0.9000 > 0.5")
    assert high.check({"nsfw_score": None}) == ("nsfw_score_high", "no nsfw_score")
    band = ScoreFilter(ScoreFilter.Config(column="aesthetic_score", min_score=4.5, max_score=9))
    assert [getattr(band.check({"aesthetic_score": v}), "reason", None) for v in (4.0, 5.0, 9.5)] == [
        "aesthetic_score_low", None, "aesthetic_score_high"]
    data = {
        "name": "x", "sources": [{"kind": "image_folder", "name": "f", "path": str(tmp_path)}],
        "stages": [{"kind": "score_filter", "column": "caption"}], "output": {"path": str(tmp_path / "o")},
    }
    with pytest.raises(RecipeError, match="stages.0.*give min_score, max_score or both"):
        parse_recipe(data, "<test>")


def test_bad_fraction_fails_at_recipe_load(tmp_path):
    data = {
        "name": "x", "sources": [{"kind": "image_folder", "name": "f", "path": str(tmp_path)}],
        "stages": [{"kind": "score_top_fraction", "fraction": 1.5}], "output": {"path": str(tmp_path / "o")},
    }
    with pytest.raises(RecipeError, match="stages.0.*fraction"):
        parse_recipe(data, "<test>")
