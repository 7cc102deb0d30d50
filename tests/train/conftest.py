"""Shared by the training tests: the demo's output, curated once by the real runner."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def curated(tmp_path_factory) -> tuple[Path, Path]:
    """(curated output folder, its tokenizer.json): all three kinds, from `tools.demo`."""
    from curate.recipe import load_recipe
    from curate.runner import run_recipe
    from tools.demo import DEMO_RECIPE, demo_inputs, demo_overrides

    root = tmp_path_factory.mktemp("demo")
    with demo_inputs(root):
        recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
        run_recipe(recipe, progress=False)
    return Path(recipe.output.path), root / "inputs" / "tokenizer" / "tokenizer.json"
