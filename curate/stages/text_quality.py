"""Document-level text quality for `doc` and `text` records: OBELICS-style document rules of our
own (`doc_rules`) and datatrove's published quality filters run through datatrove's own code
(`gopher_quality`, `gopher_repetition`, `c4_quality`, `fineweb_quality`).

Every stage here judges `curate.documents.record_text(kind, row)`: a doc's text segments joined
by a blank line (so paragraph rules see segments as paragraphs), or a text record's body. A batch's
kind is the stage's `batch_kind` (from its schema), since one stage instance serves both kinds.

`doc_rules` checks, each off when its bound is None, each failing with its own code and a detail
naming the measured value and the bound:

    too_few_images / too_many_images   image segments of a doc (text records have none: not checked)
    too_few_words / too_many_words     `curate.documents.words` (runs of word characters)
    low_stopword_ratio                 share of those words, lower-cased, that are stop words of the
                                       row's `language` (spaCy's list for it; English when the row
                                       has none or spaCy has no list for it)
    repetitive                         word n-gram repetition: the share of the n-gram occurrences
                                       whose n-gram occurs more than once (BigScience ROOTS / OBELICS);
                                       char n-gram repetition: the share of the occurrences taken by
                                       the floor(sqrt(V)) most frequent of the V distinct n-grams,
                                       counting only those that repeat (ROOTS: common short n-grams of
                                       a language do not make a long document look repetitive)
    special_characters                 share of non-space characters that are not word characters
                                       (punctuation, symbols, emoji, underscores)

Every live row gets `word_count` and `stopword_ratio`, kept rows included, so they reach the
sidecars. A recipe example with the issue's bounds:

    - kind: doc_rules
      min_images: 1
      max_images: 30
      min_words: 10
      max_words: 2000
      min_stopword_ratio: 0.1
      max_word_repetition_ratio: 0.2
      max_char_repetition_ratio: 0.2
      max_special_char_ratio: 0.3

The datatrove stages build `datatrove.data.Document(text=record_text(...), id=row["id"])` and call
the filter's `filter(doc)`. A rejection becomes drop code = the stage's kind (`gopher_quality`,
...), so codes stay few, and detail = datatrove's own reason (`gopher_short_doc`, `dup_para_frac`,
`top_2_gram`, `lorem_ipsum`, `line_punct_ratio`, ...). An empty text is dropped with detail "empty"
without asking datatrove (its filters divide by the word count). Their configs carry the main
thresholds of the datatrove class with datatrove's defaults. These are filters: C4's filter also
deletes lines from the text it keeps; that rewrite is not applied here (the row is left as it came)
and the decision is the one datatrove makes on the full text.

Word tokenisation is datatrove's choice of tokenizer, which for English is spaCy's blank tokenizer
(rules only, no model, nothing downloaded); sentences for C4 come from spaCy's rule-based
sentencizer, so no nltk data is needed. The language is the row's `language` (from
`language_filter`, lid.176's codes) when datatrove has a tokenizer for it that loads here, else
English. Tokenising is most of these filters' cost: one tokenizer per language per worker process
is shared by the four stages, remembers its recent results (the stages run one after the other on
the same batch, so each text is tokenised once, as in a datatrove pipeline where a document flows
through all filters before the next is read) and keeps spaCy's vocabulary between texts (see
`SharedWordTokenizer`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import threading
from collections import Counter, OrderedDict
from typing import Any, ClassVar, Literal

import pyarrow as pa
from datatrove.data import Document
from pydantic import Field, model_validator

from curate.documents import image_segments, record_text, words
from curate.stages.base import Drop, Filter, StageConfig, register

TOO_FEW_IMAGES = "too_few_images"
TOO_MANY_IMAGES = "too_many_images"
TOO_FEW_WORDS = "too_few_words"
TOO_MANY_WORDS = "too_many_words"
LOW_STOPWORD_RATIO = "low_stopword_ratio"
REPETITIVE = "repetitive"
SPECIAL_CHARACTERS = "special_characters"

DEFAULT_LANGUAGE = "en"
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")
_SPECIAL = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s")


# ---------------------------------------------------------------------------------------------
# doc_rules
# ---------------------------------------------------------------------------------------------

_STOP_WORDS: dict[str, frozenset[str]] = {}


def stop_words(language: str | None) -> frozenset[str]:
    """spaCy's stop words for `language` (lid.176/ISO 639-1 code), English when spaCy has none.
    They ship inside spaCy (spacy.lang.<code>.stop_words): no model, no download."""
    code = language if language and _LANGUAGE_CODE.match(language) else DEFAULT_LANGUAGE
    if code not in _STOP_WORDS:
        try:
            module = importlib.import_module(f"spacy.lang.{code}.stop_words")
            _STOP_WORDS[code] = frozenset(w.lower() for w in module.STOP_WORDS)
        except ImportError:
            _STOP_WORDS[code] = stop_words(DEFAULT_LANGUAGE) if code != DEFAULT_LANGUAGE else frozenset()
    return _STOP_WORDS[code]


def word_repetition_ratio(tokens: list[str], n: int) -> float:
    """Share of the word n-gram occurrences whose n-gram occurs more than once (0 when the text
    has fewer than n words)."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(zip(*(tokens[i:] for i in range(n))))
    return sum(c for c in counts.values() if c > 1) / total


def char_repetition_ratio(text: str, n: int) -> float:
    """Share of the character n-gram occurrences taken by the floor(sqrt(V)) most frequent of
    the V distinct n-grams, counting only n-grams that occur more than once."""
    total = len(text) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(text[i : i + n] for i in range(total))
    top = counts.most_common(math.isqrt(len(counts)))
    return sum(c for _, c in top if c > 1) / total


def special_char_ratio(text: str) -> float:
    """Share of the non-space characters that are not word characters (0 for a blank text)."""
    visible = len(text) - len(_SPACE.findall(text))
    return len(_SPECIAL.findall(text)) / visible if visible else 0.0


class DocRulesConfig(StageConfig):
    kind: Literal["doc_rules"] = "doc_rules"
    min_images: int | None = Field(None, ge=0)
    max_images: int | None = Field(None, ge=0)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)
    min_stopword_ratio: float | None = Field(None, ge=0.0, le=1.0)
    max_word_repetition_ratio: float | None = Field(None, ge=0.0, le=1.0)
    word_ngram: int = Field(5, ge=1, le=20)
    max_char_repetition_ratio: float | None = Field(None, ge=0.0, le=1.0)
    char_ngram: int = Field(10, ge=1, le=50)
    max_special_char_ratio: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _bounds(self) -> DocRulesConfig:
        checks = ("min_images", "max_images", "min_words", "max_words", "min_stopword_ratio",
                  "max_word_repetition_ratio", "max_char_repetition_ratio", "max_special_char_ratio")
        if all(getattr(self, name) is None for name in checks):
            raise ValueError(f"doc_rules: set at least one of {', '.join(checks)}")
        for low, high in (("min_images", "max_images"), ("min_words", "max_words")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low} ({lo}) must not exceed {high} ({hi})")
        return self


@register
class DocRules(Filter):
    """OBELICS-style document rules: image and word counts, stop words, repetition, symbols."""

    name = "doc_rules"
    Config = DocRulesConfig
    config: DocRulesConfig
    kinds: ClassVar[tuple[str, ...]] = ("doc", "text")
    output_columns: ClassVar[dict[str, pa.DataType]] = {"word_count": pa.int32(), "stopword_ratio": pa.float32()}

    def setup(self) -> None:
        stop_words(DEFAULT_LANGUAGE)  # import spaCy's list once per worker, before the first row

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        text = record_text(self.batch_kind, row)
        tokens = words(text)
        stops = stop_words(row.get("language"))
        row["word_count"] = len(tokens)
        row["stopword_ratio"] = sum(t.lower() in stops for t in tokens) / len(tokens) if tokens else 0.0
        return self._judge(row, text, tokens)

    def _judge(self, row: dict[str, Any], text: str, tokens: list[str]) -> Drop | None:
        c = self.config
        if self.batch_kind == "doc" and (c.min_images is not None or c.max_images is not None):
            n = len(image_segments(row))
            if c.min_images is not None and n < c.min_images:
                return Drop(TOO_FEW_IMAGES, f"{n} images < min_images {c.min_images}")
            if c.max_images is not None and n > c.max_images:
                return Drop(TOO_MANY_IMAGES, f"{n} images > max_images {c.max_images}")
        n = row["word_count"]
        if c.min_words is not None and n < c.min_words:
            return Drop(TOO_FEW_WORDS, f"{n} words < min_words {c.min_words}")
        if c.max_words is not None and n > c.max_words:
            return Drop(TOO_MANY_WORDS, f"{n} words > max_words {c.max_words}")
        ratio = row["stopword_ratio"]
        if c.min_stopword_ratio is not None and ratio < c.min_stopword_ratio:
            language = row.get("language") or DEFAULT_LANGUAGE
            return Drop(LOW_STOPWORD_RATIO,
                        f"stop-word ratio {ratio:.3f} < min_stopword_ratio {c.min_stopword_ratio:g} ({language})")
        if c.max_word_repetition_ratio is not None:
            ratio = word_repetition_ratio([t.lower() for t in tokens], c.word_ngram)
            if ratio > c.max_word_repetition_ratio:
                return Drop(REPETITIVE, f"word {c.word_ngram}-gram repetition {ratio:.3f} > "
                                        f"max_word_repetition_ratio {c.max_word_repetition_ratio:g}")
        if c.max_char_repetition_ratio is not None:
            ratio = char_repetition_ratio(text, c.char_ngram)
            if ratio > c.max_char_repetition_ratio:
                return Drop(REPETITIVE, f"char {c.char_ngram}-gram repetition {ratio:.3f} > "
                                        f"max_char_repetition_ratio {c.max_char_repetition_ratio:g}")
        if c.max_special_char_ratio is not None:
            ratio = special_char_ratio(text)
            if ratio > c.max_special_char_ratio:
                return Drop(SPECIAL_CHARACTERS, f"special-character ratio {ratio:.3f} > "
                                                f"max_special_char_ratio {c.max_special_char_ratio:g}")
        return None


# ---------------------------------------------------------------------------------------------
# datatrove's quality filters
# ---------------------------------------------------------------------------------------------

WORD_CACHE_CHARS = 4_000_000  # text held by a tokenizer's memo (its word lists: ~12 bytes a char)
MAX_LEXEMES = 100_000  # spaCy vocabulary size (~70 MB) past which a tokenizer starts a fresh one
_TOKENIZERS: dict[str, Any] = {}


def _shared_tokenizer_class() -> type:
    # datatrove's tokenizers: +40 ms on `import curate.stages` (loguru, regex), paid when a stage tokenises
    from datatrove.utils.word_tokenizers import SpaCyTokenizer, WordTokenizer, strip_strings

    class SharedWordTokenizer(WordTokenizer):
        """datatrove's word tokenizer for one language, made cheaper in two ways that leave its
        output unchanged (the tests compare decisions with datatrove's on the same texts):

        - it remembers its recent word lists (LRU, bounded by `WORD_CACHE_CHARS` characters of
          text), so the stages run one after the other on a batch tokenise each text once;
        - for a plain `spacy.blank(lang)` tokenizer (English and most languages), it runs spaCy's
          tokenizer itself, keeping the vocabulary between texts: datatrove tokenises inside a
          spaCy memory zone, which frees every new word after each text and makes tokenising
          about 5x slower. Memory stays bounded: past `MAX_LEXEMES` words a fresh blank pipeline
          replaces the old one. Other tokenizers (Japanese chunks, jieba, Thai, ...) and
          sentence splitting go to datatrove's.

        datatrove takes a WordTokenizer wherever it takes a language (`load_word_tokenizer`).
        """

        def __init__(self, inner: WordTokenizer, budget: int):
            super().__init__(inner.language)
            self.inner, self.budget, self.held = inner, budget, 0
            self._words: OrderedDict[str, list[str]] = OrderedDict()
            plain = isinstance(inner, SpaCyTokenizer) and inner.config is None and inner.language != "ja"
            self._spacy_language = inner.language if plain else None
            self._nlp: Any = None
            self._lock = threading.Lock()

        def _spacy_words(self, text: str) -> list[str]:
            if self._nlp is None or len(self._nlp.vocab) > MAX_LEXEMES:
                import spacy  # ~3 s of import: paid by the worker that tokenises, not by `import curate.stages`

                self._nlp = spacy.blank(self._spacy_language)
            self._nlp.max_length = len(text) + 10
            try:
                tokens = self._nlp.tokenizer(text)
            except Exception:
                if "IS_ALPHA" not in text:  # the one string datatrove knows breaks spaCy
                    raise
                tokens = self._nlp.tokenizer(text.replace("IS_ALPHA", ""))
            return strip_strings([token.text for token in tokens])

        def word_tokenize(self, text: str) -> list[str]:
            with self._lock:  # one per process, shared by stages that may run on several threads
                found = self._words.get(text)
                if found is not None:
                    self._words.move_to_end(text)
                    return found
                found = self._spacy_words(text) if self._spacy_language else self.inner.word_tokenize(text)
                if len(text) <= self.budget:
                    self._words[text] = found
                    self.held += len(text)
                    while self.held > self.budget:
                        old, _ = self._words.popitem(last=False)
                        self.held -= len(old)
                return found

        def sent_tokenize(self, text: str) -> list[str]:
            return self.inner.sent_tokenize(text)

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return self.inner.span_tokenize(text)

    return SharedWordTokenizer


def word_tokenizer(language: str | None) -> Any:
    """The shared datatrove word tokenizer of this process for `language` (ISO 639-1 or -3, as
    datatrove's tokenizer table spells it), English when datatrove has none for it or it needs
    packages this machine lacks (tried once per language: a tokenizer that fails is not retried)."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer  # +40 ms of import (loguru, regex)

    code = language or DEFAULT_LANGUAGE
    if code not in _TOKENIZERS:
        try:
            inner = load_word_tokenizer(code)
            inner.word_tokenize("Loaded.")  # loads spaCy's blank pipeline (or fails) now
            shared = _shared_tokenizer_class()(inner, WORD_CACHE_CHARS)
            shared.word_tokenize("Loaded.")
            _TOKENIZERS[code] = shared
        except Exception:
            if code == DEFAULT_LANGUAGE:
                raise
            _TOKENIZERS[code] = word_tokenizer(DEFAULT_LANGUAGE)
    return _TOKENIZERS[code]


class DatatroveFilter(Filter):
    """A datatrove filter as one of our stages. Subclasses name the datatrove class; every
    config field beyond the common ones is passed to its constructor under the same name."""

    kinds: ClassVar[tuple[str, ...]] = ("doc", "text")
    filter_class: ClassVar[str]  # "module:Class" under datatrove.pipeline.filters

    def filter_kwargs(self) -> dict[str, Any]:
        common = set(StageConfig.model_fields)
        return {k: v for k, v in self.config.model_dump().items() if k not in common}

    def setup(self) -> None:
        self._filters: dict[str, Any] = {}
        self.datatrove_filter(None)  # English is always needed: build it before the first row

    def datatrove_filter(self, language: str | None) -> Any:
        """This stage's datatrove filter for `language`, built once per worker and language."""
        tokenizer = word_tokenizer(language)
        key = tokenizer.language
        if key not in self._filters:
            module, cls = self.filter_class.split(":")
            datatrove_cls = getattr(importlib.import_module(f"datatrove.pipeline.filters.{module}"), cls)
            self._filters[key] = datatrove_cls(**self.filter_kwargs(), language=tokenizer)
        return self._filters[key]

    def check(self, row: dict[str, Any]) -> Drop | None:
        # datatrove's filters: ~0.35 s of import (its io, huggingface_hub), paid where a datatrove stage runs
        from datatrove.pipeline.filters.base_filter import get_filter_result

        text = record_text(self.batch_kind, row)
        if not text.strip():
            return Drop(self.name_code, "empty")
        keep, reason = get_filter_result(
            self.datatrove_filter(row.get("language")).filter(Document(text=text, id=row["id"])))
        return None if keep else Drop(self.name_code, reason or "rejected")

    @property
    def name_code(self) -> str:
        """The drop code: the stage's kind, whatever name the recipe gives this instance."""
        return self.Config.model_fields["kind"].default


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (spaCy costs a second)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: the import is blocked
    return importlib.util.find_spec(module) is not None


class DatatroveFilterConfig(StageConfig):
    """A datatrove filter's options. Its word tokenizer is spaCy's: a recipe naming the stage
    where spaCy is missing fails at load, naming the extra that installs it."""

    @model_validator(mode="after")
    def _needs_spacy(self) -> "DatatroveFilterConfig":
        if not installed("spacy"):
            raise ValueError(f"{self.kind} splits words with spaCy, which is not installed: "
                             "pip install 'mm1-pipeline[text]'")
        return self


class GopherQualityConfig(DatatroveFilterConfig):
    kind: Literal["gopher_quality"] = "gopher_quality"
    min_doc_words: int | None = Field(50, ge=0)
    max_doc_words: int | None = Field(100_000, ge=1)
    min_avg_word_length: int | None = Field(3, ge=0)
    max_avg_word_length: int | None = Field(10, ge=1)
    max_symbol_word_ratio: float | None = Field(0.1, ge=0.0)
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0.0, le=1.0)
    max_ellipsis_lines_ratio: float | None = Field(0.3, ge=0.0, le=1.0)
    max_non_alpha_words_ratio: float | None = Field(0.8, ge=0.0, le=1.0)  # datatrove's name: a minimum
    min_stop_words: int | None = Field(2, ge=0)
    stop_words: list[str] | None = None  # None: datatrove's eight English stop words


@register
class GopherQuality(DatatroveFilter):
    """Gopher's quality rules (Rae et al. 2021), datatrove's GopherQualityFilter."""

    name = "gopher_quality"
    Config = GopherQualityConfig
    filter_class = "gopher_quality_filter:GopherQualityFilter"


class GopherRepetitionConfig(DatatroveFilterConfig):
    kind: Literal["gopher_repetition"] = "gopher_repetition"
    dup_line_frac: float | None = Field(0.3, ge=0.0, le=1.0)
    dup_para_frac: float | None = Field(0.3, ge=0.0, le=1.0)
    dup_line_char_frac: float | None = Field(0.2, ge=0.0, le=1.0)
    dup_para_char_frac: float | None = Field(0.2, ge=0.0, le=1.0)
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


@register
class GopherRepetition(DatatroveFilter):
    """Gopher's repetition rules (duplicate lines, paragraphs, n-grams), datatrove's
    GopherRepetitionFilter."""

    name = "gopher_repetition"
    Config = GopherRepetitionConfig
    filter_class = "gopher_repetition_filter:GopherRepetitionFilter"


class C4QualityConfig(DatatroveFilterConfig):
    kind: Literal["c4_quality"] = "c4_quality"
    split_paragraph: bool = True  # lines (C4); False: spaCy sentences
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = Field(5, ge=-1)  # -1: off
    min_words_per_line: int = Field(3, ge=-1)
    max_word_length: int = Field(1000, ge=-1)
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


@register
class C4Quality(DatatroveFilter):
    """C4's page rules (Raffel et al. 2020), datatrove's C4QualityFilter; decision only."""

    name = "c4_quality"
    Config = C4QualityConfig
    filter_class = "c4_filters:C4QualityFilter"


class FineWebQualityConfig(DatatroveFilterConfig):
    kind: Literal["fineweb_quality"] = "fineweb_quality"
    line_punct_thr: float = Field(0.12, ge=0.0, le=1.0)
    line_punct_exclude_zero: bool = False
    stop_chars: tuple[str, ...] | None = None  # None: datatrove's terminal punctuation
    short_line_thr: float = Field(0.67, ge=0.0, le=1.0)
    short_line_length: int = Field(30, ge=0)
    char_duplicates_ratio: float = Field(0.01, ge=0.0, le=1.0)
    new_line_ratio: float = Field(0.3, ge=0.0)


@register
class FineWebQuality(DatatroveFilter):
    """FineWeb's extra rules (Penedo et al. 2024), datatrove's FineWebQualityFilter."""

    name = "fineweb_quality"
    Config = FineWebQualityConfig
    filter_class = "fineweb_quality_filter:FineWebQualityFilter"
