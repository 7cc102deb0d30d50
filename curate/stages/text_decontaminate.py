"""Eval-set decontamination of text: drop documents that contain a word n-gram of an evaluation
text, so a benchmark's questions and passages never reach pretraining (GPT-3's 13-gram rule).

`text_decontaminate` (a Filter for docs and texts; pairs' captions too) lower-cases the record's
words (`curate.documents.words`: runs of word characters, punctuation ignored) and looks up
every window of `ngram` words in the n-grams of the eval set. A hit drops the record with code
`eval_overlap` and detail `"<set name>: item <i> (<first words>...)"` (the first item matched).
An eval item shorter than `ngram` words but with at least `min_item_words` is indexed whole, as
one shorter n-gram (a short question still counts); shorter items are not indexed (they would
match common phrases) and their number is logged at setup.

The eval set (`eval_texts`) is a `.txt` file (one item a line; blank lines skipped), a `.jsonl`
file (`text_field` of each object) or a folder of `.txt` files (one item a file). It is read
when the recipe loads (a missing path or an empty set fails there, naming the path) and indexed
once per worker process as 64-bit digests of the n-grams. Like `eval_decontaminate`, its content
is not part of the recipe hash: give a changed set a new path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from curate.documents import record_text, words
from curate.stages.base import Drop, Filter, StageConfig, register
from curate.stages.eval_decontaminate import EVAL_OVERLAP

log = logging.getLogger("mm1.curate")


def read_eval_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The items of an eval set, in order. Raises ValueError naming the path when there are none."""
    p = Path(path)
    if p.is_dir():
        items = [f.read_text(errors="replace") for f in sorted(p.rglob("*.txt"))]
    elif p.is_file() and p.suffix == ".jsonl":
        items = []
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{p}: line {n} has no {text_field!r} text ({type(exc).__name__})") from None
            items.append(str(value))
    elif p.is_file():
        items = [line for line in p.read_text(errors="replace").splitlines() if line.strip()]
    else:
        raise ValueError(f"eval texts {p}: no such file or folder")
    items = [i for i in items if i.strip()]
    if not items:
        raise ValueError(f"eval texts {p}: no items")
    return items


def ngram_digest(tokens: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(tokens).encode(), digest_size=8).digest(), "little")


def _words(text: str) -> list[str]:
    return [w.lower() for w in words(text)]


class TextDecontaminateConfig(StageConfig):
    kind: Literal["text_decontaminate"] = "text_decontaminate"
    eval_texts: str  # a .txt (an item a line), a .jsonl, or a folder of .txt files
    text_field: str = "text"  # in a .jsonl
    set_name: str | None = Field(None, min_length=1)  # in drop details; default: the file's stem
    ngram: int = Field(13, ge=1, le=64)
    min_item_words: int = Field(8, ge=1)

    @field_validator("eval_texts")
    @classmethod
    def _readable(cls, value: str) -> str:
        read_eval_texts(value)  # fails at recipe load with the path (jsonl field checked at setup)
        return value

    @property
    def label(self) -> str:
        return self.set_name or Path(self.eval_texts).stem or str(self.eval_texts)


@register
class TextDecontaminate(Filter):
    """Drops records sharing a word n-gram with an eval item (module docstring)."""

    name = "text_decontaminate"
    Config = TextDecontaminateConfig
    config: TextDecontaminateConfig
    kinds = ("pair", "doc", "text")

    def setup(self) -> None:
        cfg = self.config
        self.index: dict[int, dict[int, int]] = {}  # n-gram length -> digest -> item index
        self.items = read_eval_texts(cfg.eval_texts, cfg.text_field)
        skipped = 0
        for i, item in enumerate(self.items):
            tokens = _words(item)
            if len(tokens) < min(cfg.ngram, cfg.min_item_words):
                skipped += 1
                continue
            n = min(cfg.ngram, len(tokens))
            table = self.index.setdefault(n, {})
            for start in range(len(tokens) - n + 1):
                table.setdefault(ngram_digest(tokens[start:start + n]), i)
        if skipped:
            log.info("text_decontaminate %s: %d items under %d words not indexed", cfg.label, skipped,
                     cfg.min_item_words)

    def check(self, row: dict[str, Any]) -> Drop | None:
        tokens = _words(record_text(self.batch_kind, row))
        for n, table in sorted(self.index.items(), reverse=True):
            for start in range(len(tokens) - n + 1):
                item = table.get(ngram_digest(tokens[start:start + n]))
                if item is not None:
                    first = " ".join(self.items[item].split()[:6])
                    return Drop(EVAL_OVERLAP, f"{self.config.label}: item {item} ({first}...)")
        return None
