"""Reading a YAML recipe, for curation (`curate/recipe.py`) and training (`train/recipe.py`) alike.

The contract:

- `read_recipe_yaml(path, overrides)` reads the file with `yaml.safe_load` (never a Python tag) and
  sets each dotted override (`output.path`, `sources.0.path`: a list item by its index, a missing
  or null mapping created on the way) before anything is validated.
- `parse_override("key.path=value")` reads a command-line override; the value is YAML (`3e-3` a
  float, `[a, b]` a list, `mm1` a string).
- `validate_recipe(Model, data, origin)` validates with the pydantic model and formats every error
  as one line `  key.path: message (got value)` under `ORIGIN: invalid <what>`; the model's
  messages say what was expected.

Every failure is a `RecipeError` (a ValueError) whose message starts with the file (or, for an
override, the override's text). This module imports nothing else from the project, so training
reads its recipes without importing curation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

# YAML 1.1 (PyYAML) reads an exponent without a dot (1e-4) as a string
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


def read_recipe_yaml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Any:
    """The YAML document at `path` (safe_load) with `overrides` set; a document that is not a
    mapping comes back as it is (validation names it)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except OSError as exc:  # a folder, no permission
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            set_dotted(data, dotted, value, str(path))
    return data


def set_dotted(data: dict, dotted: str, value: Any, origin: str = "<recipe>") -> None:
    """Set `a.b.0.c` in nested mappings and lists (a list item by its index; a missing or null
    mapping on the way is created); RecipeError naming `origin` and the override otherwise."""
    node: Any = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, (dict, list)):
            inside = ".".join(parts[:depth])
            raise RecipeError(f"{origin}: override {dotted!r}: {inside!r} is a {type(node).__name__}, "
                              "not a mapping or a list")
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"{origin}: override {dotted!r}: no list item {part!r}")
            key: Any = int(part)
        else:
            key = part
            if not last and node.get(part) is None:
                node[part] = {}
        if last:
            node[key] = value
        else:
            node = node[key]


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` (the value read as YAML: `3e-3` is a float, `[a, b]` a list) -> (key, value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: the value is not valid YAML: {exc}") from None
    if isinstance(value, str) and _FLOAT.match(value):
        value = float(value)
    return key.strip(), value


def format_errors(exc: ValidationError) -> str:
    """One line per error: `  key.path: message (got value)`; `(top level)` for a check across
    keys; the value is left out when it is a whole mapping or list."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        got_txt = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {loc}: {err['msg']}{got_txt}")
    return "\n".join(lines)


def validate_recipe(model: type[M], data: Any, origin: str = "<recipe>", what: str = "recipe") -> M:
    """`data` validated as `model`; RecipeError `ORIGIN: invalid <what>` with the formatted errors."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{origin}: invalid {what}\n{format_errors(exc)}") from None
