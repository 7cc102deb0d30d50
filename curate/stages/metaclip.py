"""MetaCLIP balancing (Xu et al., "Demystifying CLIP Data"; MetaCLIP 2 for the worldwide setting):
a pool of pairs balanced over a metadata distribution (WordNet synsets, Wikipedia titles, n-grams)
instead of filtered by a model's scores.

`metaclip_balance`, a global stage over pairs:

- **Matching**, as MetaCLIP's reference matcher (`substr_matching`) does it: the alt-text
  (`text_column`, `caption` by default: never a synthetic caption) gets a space at each end and
  around each of `, . ; : ? ! `` ` and its tabs and line breaks become spaces; an entry matches
  when " entry " occurs in that text. Case-sensitive as the reference ("Cat" is not "cat": list
  both where both are wanted); "cat" matches neither "education" nor "cats". One Aho-Corasick
  automaton (pyahocorasick) per metadata list finds every entry, overlapping ones included, in
  one scan of the text. `padding: metaclip2` pads entries as MetaCLIP 2 does: no space on an end
  that is punctuation or a character of a script written without spaces (CJK, Thai, Lao,
  Burmese, Khmer, Tibetan).
- **Counting**: per entry, the pairs matching it over the whole pool that reaches the stage, a
  tree reduction of per-partition counts on the cluster.
- **Sampling**: entry e selects a pair with MetaCLIP's probability t / max(count_e, t); a pair is
  kept when any of its entries selects it, so an entry matched by fewer than `t` pairs keeps all of
  them and a head entry keeps about `t`. The draws are a 64-bit hash of (`seed`, sample id,
  entry), not a process RNG: a rerun, a resume or another partitioning decides the same. Drops:
  `no_metadata_match` (no entry matched), `balanced_out` (no matched entry selected it; the
  detail names its most frequent entries and their counts), `no_metadata_language` (worldwide:
  the pair's language has no metadata list and there is no default list).
- **Worldwide** (MetaCLIP 2): `languages` maps a language code (the `language` column of
  `language_filter`) to its own metadata list and `t`; a pair's entries are looked up in its
  language's list, else in the top-level `metadata` (the `other` list).
- **Summary** (the manifest's `global.<stage>.summary`, plotted by the report): per list, its
  entries, those matched, t, pairs matched and kept, the head (the most matched entries with
  their counts before and after), the tail (entries per count decade before and after), and the
  sorted count curves at log-spaced ranks.

Metadata files are a JSON list of strings (MetaCLIP's `metadata.json`) or text, one entry a line;
a repeated entry counts once (its first position). They are read when the recipe loads (a missing
or empty file fails there, naming it) and indexed once per worker process. Like the eval sets of
the decontamination stages, their content is not part of the recipe hash: give a changed list a
new path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import string
from dataclasses import dataclass
from typing import Any, Literal

import ahocorasick
import numpy as np
import pandas as pd
from dask import compute, delayed, persist
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.stages.base import GlobalStage, StageConfig, register

NO_MATCH = "no_metadata_match"
BALANCED_OUT = "balanced_out"
NO_LANGUAGE = "no_metadata_language"
OTHER = "other"  # the top-level list's name in the summary and the details
HEAD_ENTRIES = 20  # entries listed in the summary's head
DETAIL_ENTRIES = 3  # entries named in a balanced_out detail
COUNT_GROUP = 16  # partitions counted by one task (decide)
PARTITION = "_partition"  # the runner's partition column (curate.engine.driver)

# MetaCLIP's spacing of a text: these get a space each side, these become a space
_WRAPPED = ",.;:?!`"
_SPACED = "\t\n\r"
_NO_SPACE_SCRIPTS = (  # code point ranges of scripts written without spaces between words
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF), (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF),
    (0x0F00, 0x0FFF),
)
_WIDE_PUNCTUATION = set("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")


def spaced(text: str) -> str:
    """A text as MetaCLIP matches in it: padded, punctuation spaced, tabs and breaks to spaces.
    (str.replace per character present: faster than one str.translate on caption-sized text.)"""
    text = f" {text} "
    for char in _WRAPPED:
        if char in text:
            text = text.replace(char, f" {char} ")
    for char in _SPACED:
        if char in text:
            text = text.replace(char, " ")
    return text


def _unpadded_end(char: str) -> bool:
    code = ord(char)
    return (char in string.punctuation or char in _WIDE_PUNCTUATION
            or any(lo <= code <= hi for lo, hi in _NO_SPACE_SCRIPTS))


def padded(entry: str, padding: str = "metaclip1") -> str:
    """An entry as the automaton looks for it: " entry " (MetaCLIP), or, with `metaclip2`, without
    the space on an end that is punctuation or a no-space script's character (MetaCLIP 2)."""
    if padding == "metaclip1":
        return f" {entry} "
    return ("" if _unpadded_end(entry[0]) else " ") + entry + ("" if _unpadded_end(entry[-1]) else " ")


def read_metadata(path: str) -> list[str]:
    """The entries of a metadata file in order, a repeated one at its first position only.
    ValueError naming the path when it is missing, unreadable or holds no entry."""
    if not os.path.isfile(path):
        raise ValueError(f"metadata file {os.path.abspath(path)!r} does not exist")
    with open(path, encoding="utf-8", errors="strict") as fh:
        raw = fh.read()
    if path.endswith(".json"):
        try:
            entries = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"metadata file {path!r}: not JSON ({exc})") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"metadata file {path!r}: expected a JSON list of strings")
    else:
        entries = raw.splitlines()
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        raise ValueError(f"metadata file {path!r} holds no entry")
    return list(dict.fromkeys(entries))


@dataclass(frozen=True)
class MetadataList:
    """One metadata list as the stage uses it: its entries, `t`, and its first entry's index in
    the stage's one count vector (lists are laid end to end)."""

    name: str
    path: str
    t: int
    offset: int
    entries: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def _automaton(path: str, mtime: float, padding: str) -> Any:
    """The Aho-Corasick automaton of a metadata file (value: the entry's index), built once per
    process (keyed by the file's modification time too)."""
    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(_entries(path, mtime)):
        automaton.add_word(padded(entry, padding), index)
    automaton.make_automaton()
    return automaton


def matcher(path: str, padding: str = "metaclip1") -> Any:
    return _automaton(path, os.path.getmtime(path), padding)


def match(automaton: Any, text: str) -> list[int]:
    """The indices of the entries matched in `text` (MetaCLIP's substring matching), each once,
    in no particular order."""
    return list({index for _, index in automaton.iter(spaced(text))})


# ---------------------------------------------------------------------------------------------
# Draws: a uniform number per (seed, sample id, entry) from hashes, vectorised
# ---------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def id_hashes(ids: Any, seed: int) -> np.ndarray:
    """A 64-bit hash of each sample id under `seed` (blake2b): stable across processes and runs."""
    key = seed.to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "little")
                     for i in ids], dtype=np.uint64)


def draws(row_hashes: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers, one per (row hash, entry) pair: splitmix64 of the two mixed."""
    with np.errstate(over="ignore"):
        z = row_hashes ^ (entries.astype(np.uint64) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class LanguageMetadata(BaseModel):
    """One language's metadata list and its `t` (worldwide balancing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    metadata: str
    t: int = Field(ge=1)

    @field_validator("metadata")
    @classmethod
    def _readable(cls, value: str) -> str:
        read_metadata(value)
        return value


class MetaclipBalanceConfig(StageConfig):
    kind: Literal["metaclip_balance"] = "metaclip_balance"
    # the list for pairs of every language (or, with `languages`, of the others); a JSON list of
    # strings or one entry a line. Optional only when `languages` lists every language kept.
    metadata: str | None = None
    t: int = Field(20_000, ge=1)  # MetaCLIP: 20k for its 400M set, 170k for 2.5B
    languages: dict[str, LanguageMetadata] = Field(default_factory=dict)
    text_column: str = Field("caption", pattern=r"^[a-z][a-z0-9_]*$")
    padding: Literal["metaclip1", "metaclip2"] = "metaclip1"
    seed: int = 0

    @field_validator("metadata")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None:
            read_metadata(value)  # fails at recipe load, naming the path
        return value

    @model_validator(mode="after")
    def _some_list(self) -> MetaclipBalanceConfig:
        if not self.languages and self.metadata is None:
            raise ValueError("give `metadata` (a metadata file), `languages` (one per language), or both")
        return self


@register
class MetaclipBalance(GlobalStage):
    """Balances pairs over metadata entries, as MetaCLIP curates (module docstring)."""

    name = "metaclip_balance"
    Config = MetaclipBalanceConfig
    config: MetaclipBalanceConfig
    kinds = ("pair",)

    def __init__(self, config: MetaclipBalanceConfig):
        super().__init__(config)
        self.last_summary: dict[str, Any] = {}

    @property
    def columns(self) -> list[str]:  # type: ignore[override]
        cfg = self.config
        return [cfg.text_column, *(["language"] if cfg.languages else [])]

    def lists(self) -> list[MetadataList]:
        """The metadata lists, laid end to end: each language's, then the top-level one (`other`)."""
        cfg = self.config
        named = [(lang, m.metadata, m.t) for lang, m in sorted(cfg.languages.items())]
        if cfg.metadata is not None:
            named.append((OTHER, cfg.metadata, cfg.t))
        out, offset = [], 0
        for name, path, t in named:
            entries = tuple(read_metadata(path))
            out.append(MetadataList(name, path, t, offset, entries))
            offset += len(entries)
        return out

    def decide(self, live: Any) -> Any:
        cfg = self.config
        lists = self.lists()
        width = sum(len(m.entries) for m in lists)
        where = {m.name: (m.path, m.offset) for m in lists}
        # Each partition's matches are found once and held on the workers for the three passes
        # over them, as flat arrays (`Matches`: ~17 B a row + 4 an entry matched), not a frame
        # with the ids and an array object a row (~250 B a row: a worker's memory grew 2.7x
        # from 1M to 4M rows; tools/bench/global_passes.py). The drops re-read the ids.
        matched = [delayed(_match_partition)(part, where, cfg.text_column, cfg.padding, cfg.seed)
                   for part in live[[c for c in live.columns if c != PARTITION]].to_delayed()]
        matched = list(persist(*matched))
        # Counted by tasks of COUNT_GROUP partitions' matches each: a count vector is the lists'
        # width (4 MB for 500,000 entries) where a partition's matches are ~200 KB, so one vector
        # a partition made memory and the bytes between workers grow with the partitions.
        groups = [matched[i:i + COUNT_GROUP] for i in range(0, len(matched), COUNT_GROUP)] or [[]]
        counts = compute(_tree_sum([delayed(_count_group)(g, width) for g in groups]))[0][:width]
        probability = np.concatenate([
            np.minimum(1.0, m.t / np.maximum(counts[m.offset:m.offset + len(m.entries)], 1)) for m in lists])
        # one graph key each, not a copy of a 500,000-entry vector in every task
        p, c = (delayed(x, pure=True) for x in (probability, counts))
        kept = compute(_tree_sum([delayed(_count_group)(g, width, p) for g in groups]))[0]
        self.last_summary = balance_summary(lists, counts, kept[:width], *map(int, kept[width:]))
        empty = live._meta[["id", PARTITION]].assign(drop_reason="", drop_detail="")
        # the entries' names for the details: read on the workers (their matchers read the same files)
        named = [(m.name if cfg.languages else "", m.path, m.offset, len(m.entries)) for m in lists]
        drops = [delayed(_drops)(part, m, p, c, named)
                 for part, m in zip(live[["id", PARTITION]].to_delayed(), matched)]
        import dask.dataframe as dd  # (where a global pass runs: workers importing the stages don't need it)

        return dd.from_delayed(drops, meta=empty, verify_meta=False)

    def summary(self) -> dict[str, Any]:
        return dict(self.last_summary)


@dataclass(frozen=True)
class Matches:
    """One partition's matches, flat: row i matched `entries[offsets[i]:offsets[i + 1]]` (indices
    in the stage's count vector); `listed[i]` is false when its language has no list (worldwide
    without a default list); `hashes` are its id's hashes (the draws')."""

    hashes: np.ndarray  # uint64, one a row
    offsets: np.ndarray  # int64, rows + 1
    entries: np.ndarray  # int32
    listed: np.ndarray  # bool, one a row

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(row position, entry) of every match."""
        rows = np.repeat(np.arange(len(self.hashes)), np.diff(self.offsets))
        return rows, self.entries.astype(np.int64)

    def selected(self, probability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, entries, kept per row): which rows some matched entry selects."""
        rows, entries = self.flat()
        chosen = draws(self.hashes[rows], entries) < probability[entries]
        kept = np.bincount(rows[chosen], minlength=len(self.hashes)) > 0
        return rows, entries, kept


def _match_partition(part: pd.DataFrame, where: dict[str, tuple[str, int]], text_column: str,
                     padding: str, seed: int) -> Matches:
    """Each row's matched entries (the `Matches` of a partition)."""
    languages = part["language"].tolist() if "language" in part.columns else None
    found: list[np.ndarray] = []
    listed = np.ones(len(part), dtype=bool)
    for i, text in enumerate(part[text_column].tolist()):
        lang = OTHER
        if languages is not None and languages[i] in where:
            lang = languages[i]
        if lang not in where:
            listed[i] = False
            continue
        path, offset = where[lang]
        hits = match(matcher(path, padding), text if isinstance(text, str) else "")
        found.append(np.asarray(hits, dtype=np.int32) + np.int32(offset))
    lengths = np.zeros(len(part), dtype=np.int64)
    lengths[listed] = [len(f) for f in found]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    entries = np.concatenate(found) if found else np.zeros(0, np.int32)
    return Matches(id_hashes(part["id"].tolist(), seed), offsets, entries.astype(np.int32), listed)


def _count_group(group: list[Matches], width: int, probability: np.ndarray | None = None) -> np.ndarray:
    """Matches per entry in some partitions (with `probability`, only those of the rows kept),
    then three totals: rows, rows matching some entry, rows kept (0 without `probability`)."""
    out = np.zeros(width + 3, dtype=np.int64)
    for m in group:
        if probability is None:
            out[:width] += np.bincount(m.entries, minlength=width)
            kept = np.zeros(0, dtype=bool)
        else:
            rows, entries, kept = m.selected(probability)
            out[:width] += np.bincount(entries[kept[rows]], minlength=width)
        out[width:] += (len(m.hashes), int((np.diff(m.offsets) > 0).sum()), int(kept.sum()))
    return out


def _tree_sum(parts: list[Any]) -> Any:
    """The sum of vectors, added pairwise on the cluster (a delayed)."""
    while len(parts) > 1:
        parts = [delayed(np.add)(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def _label(named: list[tuple[str, str, int, int]], entry: int) -> str:
    """An entry's name in a detail (`lang:entry` with per-language lists), from its list's file."""
    for prefix, path, offset, size in named:
        if offset <= entry < offset + size:
            name = _entries(path, os.path.getmtime(path))[entry - offset]
            return f"{prefix}:{name}" if prefix else name
    raise IndexError(entry)


@functools.lru_cache(maxsize=8)
def _entries(path: str, mtime: float) -> tuple[str, ...]:
    return tuple(read_metadata(path))


def _drops(part: pd.DataFrame, m: Matches, probability: np.ndarray, counts: np.ndarray,
           named: list[tuple[str, str, int, int]]) -> pd.DataFrame:
    """The drops of one partition (`part`: its ids and partitions, in the order matched)."""
    if len(part) != len(m.hashes):  # the two reads of one partition must agree
        raise RuntimeError(f"metaclip_balance: a partition read {len(part)} rows, matched {len(m.hashes)}")
    _, _, kept = m.selected(probability)
    dropped = np.flatnonzero(~kept)
    reasons, details = [], []
    offsets, entries = m.offsets, m.entries
    for r in dropped.tolist():
        found = entries[offsets[r]:offsets[r + 1]].tolist()
        if not m.listed[r]:
            reason, detail = NO_LANGUAGE, "no metadata list for the pair's language and no default list"
        elif not found:
            reason, detail = NO_MATCH, "the alt-text matches no metadata entry"
        else:
            top = sorted(found, key=lambda e: (-counts[e], e))[:DETAIL_ENTRIES]
            names = ", ".join(f"{_label(named, e)!r} ({int(counts[e]):,} pairs, p {probability[e]:.3g})" for e in top)
            more = len(found) - len(top)
            reason, detail = BALANCED_OUT, f"no entry selected it: {names}" + (f" and {more} more" if more else "")
        reasons.append(reason)
        details.append(detail)
    out = part[["id", PARTITION]].iloc[dropped].reset_index(drop=True)
    return out.assign(drop_reason=pd.Series(reasons, dtype=object), drop_detail=pd.Series(details, dtype=object))


# ---------------------------------------------------------------------------------------------
# Summary: the entry-count distribution before and after
# ---------------------------------------------------------------------------------------------


def _decades(counts: np.ndarray) -> dict[str, int]:
    """Entries per count decade: "0", "1-9", "10-99", ..."""
    out = {"0": int((counts == 0).sum())}
    lo = 1
    while lo <= max(1, int(counts.max(initial=0))):
        out[f"{lo}-{10 * lo - 1}"] = int(((counts >= lo) & (counts < 10 * lo)).sum())
        lo *= 10
    return out


def _curve(counts: np.ndarray) -> list[list[int]]:
    """[rank, count] of the counts sorted descending, at ranks 1, 2, 5, 10, 20, 50, ... and the last
    nonzero one: the log-log curve the report draws."""
    ordered = np.sort(counts[counts > 0])[::-1]
    ranks, r = [], 1
    while r <= len(ordered):
        ranks.extend(x for x in (r, 2 * r, 5 * r) if x <= len(ordered))
        r *= 10
    if len(ordered) and (not ranks or ranks[-1] != len(ordered)):
        ranks.append(len(ordered))
    return [[k, int(ordered[k - 1])] for k in ranks]


def balance_summary(lists: list[MetadataList], counts: np.ndarray, kept: np.ndarray, rows: int,
                    matched: int, kept_rows: int) -> dict[str, Any]:
    """What the manifest records of a balancing pass (module docstring)."""
    out: dict[str, Any] = {"rows": rows, "matched": matched, "kept": kept_rows, "lists": {}}
    for m in lists:
        before = counts[m.offset:m.offset + len(m.entries)]
        after = kept[m.offset:m.offset + len(m.entries)]
        head = np.argsort(-before, kind="stable")[:HEAD_ENTRIES]
        out["lists"][m.name] = {
            "path": os.path.basename(m.path), "t": m.t, "entries": len(m.entries),
            "entries_matched": int((before > 0).sum()),
            "entries_over_t": int((before > m.t).sum()),
            "head": [{"entry": m.entries[i], "before": int(before[i]), "after": int(after[i])}
                     for i in head if before[i] > 0],
            "tail_before": _decades(before), "tail_after": _decades(after),
            "curve_before": _curve(before), "curve_after": _curve(after),
        }
    return out


__all__ = ["BALANCED_OUT", "NO_LANGUAGE", "NO_MATCH", "MetaclipBalance", "MetaclipBalanceConfig", "draws",
           "id_hashes", "match", "matcher", "padded", "read_metadata", "spaced"]
