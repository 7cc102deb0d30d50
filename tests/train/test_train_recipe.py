"""Training recipes: every recipe in recipes/train/ loads; a bad recipe fails at load naming the
key; overrides from the command line are read as YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curate.recipe import RecipeError as CurateRecipeError
from tools.cli import main
from train.recipe import RecipeError, load_train_recipe, parse_override

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_training_recipe_loads(path):
    recipe = load_train_recipe(path)
    assert recipe.steps >= 1 and recipe.data.outs


def test_demo_recipe_is_the_tiny_run():
    recipe = load_train_recipe(ROOT / "recipes" / "train" / "demo.yaml")
    assert recipe.model.name == "tiny" and recipe.n_image_tokens == 4  # from the tiny connector
    assert recipe.data.seq_len == 256 and recipe.data.weights == {"pair": 0.45, "doc": 0.45, "text": 0.10}
    assert recipe.optim.lr == 3e-3 and recipe.optim.warmup == 5 and recipe.steps == 40
    assert recipe.optim.weight_decay == 0.1 and recipe.optim.betas == (0.9, 0.95)


def _write(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "train" / "demo.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("change", "key", "expected"), [
    ({"optim__lrate": 1.0}, "optim.lrate", "Extra inputs are not permitted"),
    ({"optim__lr": "fast"}, "optim.lr", "'mm1'"),
    ({"optim__lr": -1.0}, "optim.lr", "positive"),
    ({"model__name": "mm1-2b"}, "model.name", "unknown model size"),
    ({"data__weights": {"pairs": 1.0}}, "data.weights", "expected one of"),
    ({"data__batch_size": 0}, "data.batch_size", "greater than or equal to 1"),
    ({"precision": "fp16"}, "precision", "'bf16' or 'fp32'"),
    ({"parallel__tensor": 2}, "parallel.tensor", "Extra inputs"),
    ({"parallel__fsdp": True}, "parallel", "fsdp: true is dp_shard: -1"),
    ({"parallel__dp_shard": 0}, "parallel.dp_shard", "positive size or -1"),
    ({"parallel__ep": 2}, "(top level)", "model 'tiny' is dense"),
    ({"model__name": "tiny-moe", "parallel__ep": 3}, "(top level)", "does not divide model 'tiny-moe'"),
    ({"parallel__activation_checkpointing": "some"}, "parallel.activation_checkpointing", "'selective'"),
    ({"log__jsonl": "/abs/metrics.jsonl"}, "log.jsonl", "inside the run directory"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
])
def test_a_bad_recipe_names_the_key(tmp_path, change, key, expected):
    path = _write(tmp_path, **change)
    with pytest.raises(RecipeError) as err:
        load_train_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and f"  {key}" in msg and expected in msg, msg


def test_image_tokens_must_match_the_connector(tmp_path):
    with pytest.raises(RecipeError, match="n_image_tokens is 144, but model 'tiny'"):
        load_train_recipe(_write(tmp_path, data__n_image_tokens=144))


def test_overrides_are_yaml_values(tmp_path):
    assert parse_override("optim.lr=1e-4") == ("optim.lr", 1e-4)
    assert parse_override("data.outs=[a, b]") == ("data.outs", ["a", "b"])
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_override("optim.lr")
    recipe = load_train_recipe(_write(tmp_path), dict([parse_override("optim.lr=mm1"),
                                                       parse_override("parallel.dp_shard=4")]))
    assert recipe.optim.lr == "mm1" and recipe.parallel.dp_shard == 4


def test_cli_reports_a_bad_recipe(tmp_path, capsys):
    assert main(["train", str(_write(tmp_path, seed="x"))]) == 2
    assert "seed:" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_one_recipe_error_for_curation_and_training(tmp_path):
    """Both recipe kinds read YAML, overrides and errors through curate/recipe_io.py."""
    assert RecipeError is CurateRecipeError
    with pytest.raises(RecipeError, match=r"override 'name\.x': 'name' is a str, not a mapping"):
        load_train_recipe(_write(tmp_path), {"name.x": 1})
    recipe = load_train_recipe(_write(tmp_path, validation=None), {"validation.batches": 3})
    assert recipe.validation.batches == 3  # a null section is filled by an override
    assert parse_override("optim.eps=1e-6") == ("optim.eps", 1e-6)  # YAML 1.1 reads 1e-6 as a string
