"""Recipes: every recipe under recipes/ loads; a bad recipe fails at load naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from curate.recipe import RecipeError, load_recipe, parse_recipe
from curate.recipe_io import parse_override, read_recipe_yaml
from curate.stages.base import build_stage
from curate.units import parse_bytes
from tools.demo.run import demo_overrides
from tools.demo.docs import build_doc_inputs
from tools.convert_heads import write_demo_heads
from tools.demo.web import write_blocklists

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "curate").glob("*.yaml"))


def _minimal(**changes):
    recipe = {
        "name": "t",
        "sources": [{"kind": "image_folder", "name": "a", "path": "x", "captions": "sidecar"}],
        "stages": [{"kind": "image"}, {"kind": "exact_dedup"}],
        "output": {"path": "out"},
    }
    recipe.update(changes)
    return recipe


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The files the demo recipe names that must exist when it loads (its eval texts and its
    tokenizer), built as `mm1 demo` builds them."""
    root = tmp_path_factory.mktemp("demo")
    build_doc_inputs(root / "inputs", "http://127.0.0.1:1")
    write_blocklists(root / "inputs")
    write_demo_heads(root / "inputs" / "models" / "heads")
    return root


def _load(path, demo_root, overrides=None):
    if path.name == "demo.yaml":
        overrides = {**demo_overrides(demo_root), **(overrides or {})}
    return load_recipe(path, overrides, check_inputs=False)  # the shipped recipes name data not on this machine


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(path, demo_root):
    recipe = _load(path, demo_root)
    assert recipe.sources and recipe.output.path
    assert len(recipe.hash()) == 16


def test_there_are_recipes():
    assert RECIPES, "recipes/curate/ holds no recipe"


def test_unknown_key_names_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: t\n"
        "sources: [{kind: image_folder, name: a, path: x, captions: sidecar}]\n"
        "stages: [{kind: image, resize_mod: keep_ratio}]\n"
        "output: {path: out}\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert "stages.0.image.resize_mod" in msg
    assert "Extra inputs are not permitted" in msg


def test_wrong_value_names_key_and_expectation():
    with pytest.raises(RecipeError) as err:
        parse_recipe(_minimal(output={"path": "o", "shard_max_samples": "many"}), "r.yaml")
    assert "output.shard_max_samples" in str(err.value)
    assert "valid integer" in str(err.value)


def test_unknown_stage_kind_is_named():
    with pytest.raises(RecipeError) as err:
        parse_recipe(_minimal(stages=[{"kind": "no_such_stage"}]), "r.yaml")
    assert "stages.0" in str(err.value) and "no_such_stage" in str(err.value)


def test_missing_required_key():
    data = _minimal()
    del data["output"]
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    assert "output: Field required" in str(err.value)


def test_duplicate_source_names_rejected():
    src = {"kind": "image_folder", "name": "a", "path": "x", "captions": "sidecar"}
    with pytest.raises(RecipeError, match="source names must be unique"):
        parse_recipe(_minimal(sources=[src, src]), "r.yaml")


def test_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(bad)


def test_yaml_is_read_safely(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_hash_ignores_execution_but_not_output_determining_settings():
    base = parse_recipe(_minimal())
    moved = parse_recipe(_minimal(
        cluster={"address": "tcp://127.0.0.1:8786", "n_workers": 7},
        execution={"batch_size": 3},
        output={"path": "elsewhere"},
    ))
    assert base.hash() == moved.hash()
    changed = parse_recipe(_minimal(stages=[{"kind": "image", "image_size": 128}]))
    assert changed.hash() != base.hash()
    layout = parse_recipe(_minimal(output={"path": "out", "shard_max_samples": 5}))
    assert layout.hash() != base.hash()


def test_overrides_reach_list_items(tmp_path, demo_root):
    path = ROOT / "recipes" / "curate" / "demo.yaml"
    recipe = _load(path, demo_root, {"sources.0.path": "/data/x", "output.path": str(tmp_path)})
    assert recipe.sources[0].path == "/data/x"
    assert recipe.output.path == str(tmp_path)
    with pytest.raises(RecipeError, match="no list item"):
        _load(path, demo_root, {"sources.9.path": "x"})


def test_raw_page_sources_need_the_extraction_stage(tmp_path):
    recipe = {"name": "t", "sources": [{"kind": "warc", "name": "w", "path": "x.warc.gz"}],
              "stages": [{"kind": "minhash"}], "output": {"path": str(tmp_path)}}
    with pytest.raises(RecipeError, match=r"sources.0 \(warc 'w'\) needs the stage\(s\) \['html_extract'\]"):
        parse_recipe(recipe)
    recipe["stages"].insert(0, {"kind": "html_extract"})
    assert parse_recipe(recipe).stages[0].kind == "html_extract"


def test_parse_bytes():
    assert parse_bytes("4MB") == 4_000_000
    assert parse_bytes("1GiB") == 2**30
    assert parse_bytes(512) == 512
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_a_kind_runs_twice_only_under_distinct_names():
    two = [{"kind": "language_filter", "languages": ["en"]},
           {"kind": "score_filter", "column": "language_score", "min_score": 0.1},
           {"kind": "score_filter", "column": "language_score", "min_score": 0.2}]
    with pytest.raises(RecipeError, match="give a repeated kind a `name`"):
        parse_recipe(_minimal(stages=two))
    two[2] = {**two[2], "name": "b_filter"}
    recipe = parse_recipe(_minimal(stages=two))
    assert [build_stage(c).name for c in recipe.stages] == ["language_filter", "score_filter", "b_filter"]
    # an unnamed stage hashes as it did before stages could be named
    assert "name" not in recipe.determining()["stages"][0]
    with pytest.raises(RecipeError, match=r"stages\.2\.score_filter\.name"):
        parse_recipe(_minimal(stages=[*two[:2], {**two[2], "name": "Bad Name"}]))


def test_a_stage_reading_a_column_nothing_adds_fails_at_load():
    with pytest.raises(RecipeError, match=r"stages\.1 \(near_dedup\) reads \['image_phash'\]"):
        parse_recipe(_minimal(stages=[{"kind": "image"}, {"kind": "near_dedup"}]))
    with pytest.raises(RecipeError, match=r"reads \['clip_score'\]"):
        parse_recipe(_minimal(stages=[{"kind": "score_filter", "min_score": 0.28}]))
    parse_recipe(_minimal(stages=[{"kind": "image"}, {"kind": "phash"}, {"kind": "near_dedup"}]))


def test_overrides_through_a_value_fail_naming_the_override(tmp_path):
    """An override that walks through a scalar is a RecipeError naming it (was an AttributeError
    for curation recipes); a key present but null becomes a mapping."""
    path = tmp_path / "r.yaml"
    path.write_text("name: t\noutput: {path: out}\ntokenizer:\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: override 'name\.x\.y': 'name' is a str, not a mapping"):
        load_recipe(path, {"name.x.y": 1})
    with pytest.raises(RecipeError, match=r"override 'output\.path\.x': 'output\.path' is a str"):
        load_recipe(path, {"output.path.x": 1})
    data = read_recipe_yaml(path, {"tokenizer.path": "tok.json", "output.shard_max_samples": 5})
    assert data["tokenizer"] == {"path": "tok.json"} and data["output"] == {"path": "out", "shard_max_samples": 5}


def test_unreadable_recipe_names_the_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match=re.escape(f"{tmp_path}: cannot read the recipe")):
        load_recipe(tmp_path)  # a folder


def test_command_line_overrides_are_yaml_values():
    assert parse_override("output.shard_max_bytes=1GiB") == ("output.shard_max_bytes", "1GiB")
    assert parse_override("cluster.n_workers=4") == ("cluster.n_workers", 4)
    assert parse_override(" execution.keep_intermediate = true") == ("execution.keep_intermediate", True)
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_override("sources.0.path=[a")
