"""The reference of every source and stage kind, generated from the registries and their config models.

`entries(registry)` lists each kind as a `KindDoc` (its one-line description, the record kinds it
makes or applies to, and its options: name, type, default, constraints and the comment written
beside the field in its config class). `format_text` prints them for `mm1 sources` / `mm1 stages`
(`format_text(.., full=True)` for one kind with its whole docstring); `render_markdown()` is
docs/recipes.md, byte for byte, so a test can regenerate it in memory and compare.
Regenerate the file with `python -m tools.reference --write docs/recipes.md`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

import curate.recipe  # noqa: F401  (registers every source and stage, as a recipe sees them)
from curate.sources.base import SOURCES, SourceConfig
from curate.stages.base import STAGES, StageConfig

# options every kind of a registry has, described once rather than under each kind
COMMON = {"sources": SourceConfig, "stages": StageConfig}
_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:")


@dataclass(frozen=True)
class Option:
    name: str  # dotted for a nested config's fields (captioner.model)
    type: str
    default: str  # "required" when the recipe must set it
    note: str  # constraints and the comment beside the field


@dataclass(frozen=True)
class KindDoc:
    kind: str
    summary: str  # one line
    doc: str  # the whole class docstring
    applies_to: tuple[str, ...]  # record kinds a stage applies to, or the one a source makes
    options: tuple[Option, ...]


def _type_name(annotation: object) -> str:
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # a type with validators: the type is what a recipe writes
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


def _default(field: typing.Any) -> str:
    if field.default_factory is not None:
        return repr(field.default_factory())
    return "required" if field.default is PydanticUndefined else repr(field.default)


def _constraints(field: typing.Any) -> list[str]:
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "pattern": "matches", "min_length": "min length",
               "max_length": "max length"}
    out = []
    for meta in field.metadata:
        for attr, symbol in symbols.items():
            if getattr(meta, attr, None) is not None:
                out.append(f"{symbol} {getattr(meta, attr)}")
    return out


@functools.cache  # the sources do not change within a process; each listing reads them again
def _comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment written beside each field (at the end of its line, or the lines just above it)
    in the model's source and its bases'; the nearest class wins."""
    found: dict[str, str] = {}
    for cls in reversed([c for c in model.__mro__ if issubclass(c, BaseModel) and c is not BaseModel]):
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):  # a class defined at run time (an example, a test) has no file
            continue
        above: list[str] = []
        for line in lines[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            match = _FIELD_LINE.match(line)
            if match and match.group(1) in cls.__annotations__:
                trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
                text = " ".join(above + [trailing]).strip()
                if text:
                    found[match.group(1)] = text
            above = []
    return found


def options(model: type[BaseModel], skip: typing.Iterable[str] = (), prefix: str = "") -> list[Option]:
    """The fields of `model` as options; a field holding a nested config lists that config's fields too."""
    comments = _comments(model)
    out = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        note = "; ".join(_constraints(field) + ([comments[name]] if name in comments else []))
        out.append(Option(prefix + name, _type_name(field.annotation), _default(field), note))
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in nested[:1]:
            out.extend(options(sub, prefix=f"{prefix}{name}."))
    return out


def _summary(cls: type) -> tuple[str, str]:
    """(first sentence, whole docstring) of the class, else of its config, else of its module; the
    whole one includes the module's docstring where the class's refers to it."""
    module_doc = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "")
    for holder in (cls, cls.Config):
        doc = inspect.cleandoc(holder.__dict__.get("__doc__") or "")
        if doc:
            break
    full = doc + f"\n\nFrom its module:\n\n{module_doc}" if doc and "module docstring" in doc else doc or module_doc
    paragraph = " ".join((doc or module_doc).split("\n\n")[0].split())
    paragraph = re.sub(r"\s*\((?:see )?(?:the )?module docstring[^)]*\)", "", paragraph)  # the full text holds it
    return re.split(r"(?<!\bal\.)(?<!e\.g\.)(?<=\.)\s+(?=[A-Z])", paragraph, maxsplit=1)[0].rstrip(":"), full


def entries(which: str) -> list[KindDoc]:
    """Every kind of `which` ("sources" or "stages"), sorted by kind."""
    registry = {"sources": SOURCES, "stages": STAGES}[which]
    common = set(COMMON[which].model_fields)
    out = []
    for kind, cls in sorted(registry.items()):
        summary, doc = _summary(cls)
        applies = (cls.record_kind,) if which == "sources" else tuple(cls.kinds)
        out.append(KindDoc(kind, summary, doc, applies, tuple(options(cls.Config, skip=common))))
    return out


def find(which: str, kind: str) -> KindDoc:
    """One kind; KeyError with a message listing the kinds there are."""
    for entry in entries(which):
        if entry.kind == kind:
            return entry
    raise KeyError(f"no {which[:-1]} kind {kind!r}; the kinds: {', '.join(e.kind for e in entries(which))}")


def _option_line(opt: Option) -> str:
    note = f"  -- {opt.note}" if opt.note else ""
    return f"    {opt.name}: {opt.type} = {opt.default}{note}"


def format_text(which: str, kind: str | None = None) -> str:
    """`mm1 sources` / `mm1 stages`: every kind with its options; with `kind`, that kind in full."""
    verb = "makes" if which == "sources" else "applies to"
    common = options(COMMON[which], skip=("kind",))
    if kind is not None:
        e = find(which, kind)
        lines = [f"{e.kind} ({verb} {', '.join(e.applies_to)})", "", e.doc or e.summary, "", "options:"]
        lines += [_option_line(o) for o in e.options] or ["    (none of its own)"]
        lines += ["", f"options every {which[:-1]} has:"] + [_option_line(o) for o in common]
        return "\n".join(lines)
    lines = [f"options every {which[:-1]} has:"] + [_option_line(o) for o in common]
    for e in entries(which):
        lines += ["", f"{e.kind} ({verb} {', '.join(e.applies_to)}): {e.summary}"]
        lines += [_option_line(o) for o in e.options]
    lines += ["", f"`mm1 {which} KIND` shows one kind in full; docs/recipes.md has the same reference."]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(opts: typing.Iterable[Option]) -> list[str]:
    rows = [f"| `{o.name}` | `{_md_cell(o.type)}` | `{_md_cell(o.default)}` | {_md_cell(o.note)} |" for o in opts]
    if not rows:
        return ["No options of its own."]
    return ["| option | type | default | notes |", "|---|---|---|---|", *rows]


EXAMPLE_STAGE = '''\
from typing import Any, Literal

from pydantic import Field

from curate.stages.base import Drop, Filter, StageConfig, register


class CaptionWordsConfig(StageConfig):
    kind: Literal["caption_words_filter"] = "caption_words_filter"
    min_words: int = Field(3, ge=1)  # fewer words than this: dropped


@register
class CaptionWordsFilter(Filter):
    """Drops pairs whose caption has fewer than `min_words` words."""

    name = "caption_words_filter"
    kinds = ("pair",)
    Config = CaptionWordsConfig

    def check(self, row: dict[str, Any]) -> Drop | None:
        words = len((row.get("caption") or "").split())
        if words < self.config.min_words:
            return Drop("caption_too_few_words", f"{words} < {self.config.min_words}")
        return None
'''

HEADER = """\
# Recipe reference: sources and stages

<!-- Generated from the sources' and stages' config models by tools/reference.py; do not edit by hand.
     Regenerate: .venv/bin/python -m tools.reference --write docs/recipes.md
     (tests/tools/test_reference.py fails when this file is stale.) -->

A curation recipe (YAML) names its `sources` (where inputs come from) and its `stages` (what is
done to them, in order), then `output` and, optionally, `cluster` and `execution`. Each source and
stage is a mapping whose `kind` picks one of the kinds below; any other key is one of that kind's
options. An unknown key, a wrong type or a value out of range fails when the recipe loads, naming
the key. The same reference is printed by `mm1 sources`, `mm1 stages` and `mm1 stages KIND`.

Paths in a recipe are relative to the working directory you run `mm1` from, not to the recipe file.
Any key can be set from the command line: `mm1 curate RECIPE --override stages.0.image_size=384`
(a list item by its index; the value is read as YAML).
"""

FOOTER = f"""\
## Writing a stage of your own

A stage is one config class (pydantic, a subclass of `StageConfig` whose `kind` is a `Literal` with
that same default) and one class registered with `@register` (curate/stages/base.py):

- `Filter` decides keep or drop: `check(row)` returns `None` to keep, or `Drop(reason, detail)`
  (a short stable code, counted in the ledger and `mm1 stats`, and the specifics). It never changes
  the row.
- `RowStage` adds columns: `process_row(row)` sets them in the row dict and returns `None` (or a
  `Drop`); declare them in `output_columns = {{"name": pyarrow type}}` so the schema is known before
  any data flows, and set `per_image = True` for a stage that also applies to each image of a doc.
- `GlobalStage` decides over every row that reaches it (dedup, thresholds) with `decide(live)`
  on a Dask dataframe of the columns it names in `columns`.

`kinds` says which record kinds (`pair`, `doc`, `text`) it applies to. Load a model in `setup()`
(called once per worker process), never in `__init__`; rows dropped by an earlier stage never
reach `check` / `process_row`; an exception in one row becomes a `stage_error` drop unless the
recipe sets `on_error: raise`.

```python
{EXAMPLE_STAGE}```

Put the module in `curate/stages/` and add one import line for it to `curate/stages/__init__.py`:
the recipe schema is built from the `STAGES` registry when `curate.recipe` is first imported, so a
stage registered later is not accepted in a recipe. Then it is a stage like the others:

```yaml
stages:
  - kind: caption_words_filter
    min_words: 3
```

Add a test that runs it on a few rows (tests/tools/test_reference.py runs this very example).
"""


def render_markdown() -> str:
    """docs/recipes.md."""
    parts = [HEADER]
    for which, title, verb in (("sources", "Sources", "makes"), ("stages", "Stages", "applies to")):
        parts.append(f"## {title}\n")
        parts.append(f"Options every {which[:-1]} has:\n")
        parts.append("\n".join(_md_table(options(COMMON[which], skip=("kind",)))) + "\n")
        for e in entries(which):
            parts.append(f"### `{e.kind}`\n")
            parts.append(f"{e.summary} ({verb} {', '.join(f'`{k}`' for k in e.applies_to)})\n")
            parts.append("\n".join(_md_table(e.options)) + "\n")
    parts.append(FOOTER)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print or write the recipe reference (docs/recipes.md)")
    parser.add_argument("--write", metavar="PATH", help="write the Markdown reference to PATH")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
