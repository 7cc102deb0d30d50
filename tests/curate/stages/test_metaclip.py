"""metaclip_balance: MetaCLIP's matching, its balancing statistics, determinism and load checks.

The balancing pool is synthetic with known entry frequencies (the statistics are the point); the
matching is compared with MetaCLIP's published reference logic, written here as its plain loop,
on real captions (the descriptions of the sample images that ship in scikit-image, the dataset
descriptions that ship in scikit-learn) and real metadata (open_clip's ImageNet class names).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import re
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from curate.recipe import parse_recipe
from curate.recipe_io import RecipeError
from curate.stages import STAGES, build_stage
from curate.stages.metaclip import (
    BALANCED_OUT,
    NO_LANGUAGE,
    NO_MATCH,
    MetaclipBalance,
    MetaclipBalanceConfig,
    match,
    matcher,
    read_metadata,
)
from tools.bench.metaclip_balance import reference_spacing


# ---------------------------------------------------------------------------------------------
# MetaCLIP's reference matching, as published (metaclip/substr_matching.py), as a plain loop
# ---------------------------------------------------------------------------------------------


def reference_matching(text: str, metadata: list[str]) -> set[str]:
    """MetaCLIP's first published matcher: every entry tried on the spaced text (its `spacing`
    is the benchmark's copy of the reference's, tools/bench/metaclip_balance.py)."""
    text = reference_spacing(text)
    return {entry for entry in metadata if f" {entry} " in text}


def imagenet_classnames() -> list[str]:
    """open_clip's ImageNet class names (WordNet synsets' names), read from its source file
    without importing open_clip (and torch)."""
    spec = importlib.util.find_spec("open_clip")
    source = Path(spec.submodule_search_locations[0], "zero_shot_metadata.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "IMAGENET_CLASSNAMES":
            return list(ast.literal_eval(node.value))
    raise AssertionError("IMAGENET_CLASSNAMES not found in open_clip")


def real_captions() -> list[str]:
    """Image descriptions people wrote: scikit-image's sample images' docstrings, paragraph by
    paragraph, and the sentences of scikit-learn's dataset descriptions."""
    import skimage.data
    import sklearn

    captions = []
    for name in skimage.data.__all__:
        doc = inspect.getdoc(getattr(skimage.data, name)) or ""
        captions += [p.strip() for p in doc.split("\n\n") if p.strip()]
    for rst in sorted(Path(sklearn.__file__).parent.glob("datasets/descr/*.rst")):
        captions += [s.strip() for s in re.split(r"(?<=[.!?])\s+", rst.read_text()) if s.strip()]
    return captions


def test_matching_equals_the_reference_on_real_captions(tmp_path):
    captions = real_captions()
    words = sorted({w for c in captions for w in c.split()})
    bigrams = sorted({" ".join(p) for c in captions for p in zip(c.split(), c.split()[1:])})
    tricky = ["cat", "education", "Dr.", "St. Louis", "C++", "e.g.", "space shuttle", "Eileen Collins",
              "astronaut", "Astronaut", "1992", "rock 'n' roll", "data set", "x", "The"]
    metadata = list(dict.fromkeys(imagenet_classnames() + words[::3] + bigrams[::5] + tricky))
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(metadata))
    automaton = matcher(str(path))
    assert len(captions) > 500 and len(metadata) > 3000
    matched_any = 0
    for caption in captions:
        ours = {metadata[i] for i in match(automaton, caption)}
        assert ours == reference_matching(caption, metadata), caption
        matched_any += bool(ours)
    assert matched_any > len(captions) // 2
    # the padding: a word inside a word is no match, punctuation around one is
    assert {metadata[i] for i in match(automaton, "education, cat.")} == {"cat", "education"}
    assert {metadata[i] for i in match(automaton, "educations")} == set()
    assert "cat" not in {metadata[i] for i in match(automaton, "cats and categories")}


def test_metaclip2_padding_matches_inside_text_without_spaces(tmp_path):
    path = tmp_path / "zh.txt"
    path.write_text("猫\n东京塔\nC++\n")
    ours = matcher(str(path), "metaclip2")
    entries = read_metadata(str(path))
    assert {entries[i] for i in match(ours, "我的猫在东京塔下")} == {"猫", "东京塔"}
    assert {entries[i] for i in match(ours, "learn C++ today")} == {"C++"}
    assert match(matcher(str(path)), "我的猫在东京塔下") == []  # MetaCLIP 1's padding needs spaces


# ---------------------------------------------------------------------------------------------
# Balancing a pool with known entry frequencies
# ---------------------------------------------------------------------------------------------

HEAD, T = 10_000, 100
TAILS = {f"tail{i:02d}": 10 + 2 * i for i in range(21)}  # 10, 12, ..., 50 pairs each
MIXED = 40  # head captions that also name a tail entry (kept: the tail entry selects them)
NO_MATCH_ROWS = 300


def pool() -> pd.DataFrame:
    captions = [f"a photo of a cat number {i}" for i in range(HEAD - MIXED)]
    tails = [name for name, n in TAILS.items() for _ in range(n)]
    captions += [f"the cat and {name} together" for name in tails[:MIXED]]
    captions += [f"a drawing of {name}, in colour" for name in tails[MIXED:]]
    captions += [f"nothing listed here {i}" for i in range(NO_MATCH_ROWS)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(captions))
    return pd.DataFrame({"id": [f"pool:{i:06d}" for i in order], "_partition": 0,
                         "caption": [captions[i] for i in order]})


@pytest.fixture(scope="module")
def metadata_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("metaclip") / "metadata.txt"
    path.write_text("\n".join(["cat", *TAILS, "never matched"]) + "\n")
    return str(path)


def decide(config: MetaclipBalanceConfig, frame: pd.DataFrame, partitions: int) -> tuple[pd.DataFrame, dict]:
    frame = frame.assign(_partition=np.arange(len(frame)) % partitions)
    live = dd.from_pandas(frame, npartitions=partitions, sort=False)
    stage = build_stage(config)
    drops = stage.decide(live).compute().sort_values("id").reset_index(drop=True)
    return drops, stage.summary()


def test_head_entry_keeps_about_t_and_tails_and_no_match_as_metaclip(metadata_file):
    frame = pool()
    config = MetaclipBalanceConfig(metadata=metadata_file, t=T)
    drops, summary = decide(config, frame, partitions=4)
    reasons = dict(zip(drops["id"], drops["drop_reason"]))
    captions = dict(zip(frame["id"], frame["caption"]))
    kept = [i for i in frame["id"] if i not in reasons]

    # no-match captions dropped with the code, and only they
    no_match = {i for i, c in captions.items() if c.startswith("nothing")}
    assert {i for i, r in reasons.items() if r == NO_MATCH} == no_match
    # every pair naming a tail entry (under t) kept, the mixed ones included
    assert all(i in kept for i, c in captions.items() if "tail" in c)
    # head-only pairs: each kept with p = t / count = 100 / 10,000: binomial, 5 sigma either side
    head_only = [i for i, c in captions.items() if c.startswith("a photo of a cat")]
    n, p = len(head_only), T / HEAD
    kept_head = sum(i not in reasons for i in head_only)
    assert abs(kept_head - n * p) < 5 * (n * p * (1 - p)) ** 0.5, kept_head
    assert {reasons[i] for i in head_only if i in reasons} == {BALANCED_OUT}
    detail = drops.loc[drops["drop_reason"] == BALANCED_OUT, "drop_detail"].iloc[0]
    assert "'cat' (10,000 pairs, p 0.01)" in detail

    # the summary: the distribution before and after
    other = summary["lists"]["other"]
    assert summary["rows"] == len(frame) and summary["kept"] == len(kept)
    assert summary["matched"] == len(frame) - NO_MATCH_ROWS
    assert other["entries"] == len(TAILS) + 2 and other["entries_matched"] == len(TAILS) + 1
    assert other["entries_over_t"] == 1
    assert other["head"][0] == {"entry": "cat", "before": HEAD, "after": kept_head + MIXED}
    head = {h["entry"]: h["before"] for h in other["head"][1:]}  # the 19 most matched tail entries
    assert len(head) == 19 and head.items() <= TAILS.items() and min(head.values()) == 14
    assert all(h["after"] == h["before"] for h in other["head"][1:])
    assert other["tail_before"]["0"] == 1 and other["tail_before"]["10-99"] == len(TAILS)
    assert other["curve_before"][0] == [1, HEAD]


def test_decisions_do_not_depend_on_partitioning_or_rerun(metadata_file):
    frame = pool().sample(frac=0.25, random_state=1)
    config = MetaclipBalanceConfig(metadata=metadata_file, t=20)
    first, summary = decide(config, frame, partitions=3)
    again, summary_again = decide(config, frame, partitions=3)
    other, _ = decide(config, frame.iloc[::-1], partitions=7)
    pd.testing.assert_frame_equal(first.drop(columns="_partition"), again.drop(columns="_partition"))
    pd.testing.assert_frame_equal(first.drop(columns="_partition"), other.drop(columns="_partition"))
    assert summary == summary_again
    reseeded, _ = decide(MetaclipBalanceConfig(metadata=metadata_file, t=20, seed=1), frame, partitions=3)
    assert set(reseeded["id"]) != set(first["id"])  # the seed is the draws'


def test_per_language_lists_and_their_own_t(tmp_path, metadata_file):
    de = tmp_path / "de.txt"
    de.write_text("Katze\n")
    frame = pd.DataFrame({
        "id": [f"l:{i:04d}" for i in range(60)],
        "caption": ["eine Katze"] * 20 + ["a cat"] * 20 + ["un chat"] * 20,
        "language": ["de"] * 20 + ["en"] * 20 + ["fr"] * 20,
    })
    with_default = MetaclipBalanceConfig(metadata=metadata_file, t=5, languages={"de": {"metadata": str(de), "t": 50}})
    drops, summary = decide(with_default, frame, partitions=2)
    reasons = dict(zip(drops["id"], drops["drop_reason"]))
    assert not any(i in reasons for i in frame["id"][:20])  # de: 20 pairs under its own t of 50
    assert 0 < sum(i not in reasons for i in frame["id"][20:40]) < 20  # en: the default list, t 5
    assert {reasons[i] for i in frame["id"][40:]} == {NO_MATCH}  # fr: the default list has no "chat"
    assert summary["lists"]["de"]["head"] == [{"entry": "Katze", "before": 20, "after": 20}]
    only_de = MetaclipBalanceConfig(languages={"de": {"metadata": str(de), "t": 50}})
    drops, _ = decide(only_de, frame, partitions=2)
    assert set(drops.loc[drops["drop_reason"] == NO_LANGUAGE, "id"]) == set(frame["id"][20:])


# ---------------------------------------------------------------------------------------------
# Recipe checks
# ---------------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, stage: dict) -> dict:
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,a cat\n")
    return {"name": "t", "sources": [{"kind": "url_list", "name": "u", "path": str(urls)}],
            "stages": [stage], "output": {"path": str(tmp_path / "out")}}


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("", "holds no entry"),
    ("\n  \n", "holds no entry"),
    ("{\"a\": 1}", "expected a JSON list of strings"),
])
def test_bad_metadata_fails_at_load_naming_the_key(tmp_path, content, expected):
    path = tmp_path / ("metadata.json" if content and content.startswith("{") else "metadata.txt")
    if content is not None:
        path.write_text(content)
    with pytest.raises(RecipeError) as err:
        parse_recipe(_recipe(tmp_path, {"kind": "metaclip_balance", "metadata": str(path), "t": 10}))
    assert expected in str(err.value) and "metadata" in str(err.value)


def test_recipe_checks(tmp_path, metadata_file):
    assert STAGES["metaclip_balance"] is MetaclipBalance
    with pytest.raises(RecipeError, match="give `metadata`"):
        parse_recipe(_recipe(tmp_path, {"kind": "metaclip_balance"}))
    with pytest.raises(RecipeError, match="stages.0.metaclip_balance.t"):
        parse_recipe(_recipe(tmp_path, {"kind": "metaclip_balance", "metadata": metadata_file, "t": 0}))
    # worldwide needs the language column: a language_filter earlier in the recipe
    de = tmp_path / "de.txt"
    de.write_text("Katze\n")
    worldwide = {"kind": "metaclip_balance", "languages": {"de": {"metadata": str(de), "t": 5}}}
    with pytest.raises(RecipeError, match=r"reads \['language'\]"):
        parse_recipe(_recipe(tmp_path, worldwide))
    data = _recipe(tmp_path, worldwide)
    data["stages"].insert(0, {"kind": "language_filter", "languages": ["de", "en"]})
    parse_recipe(data)
