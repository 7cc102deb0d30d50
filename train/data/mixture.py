"""The mixture: packed sequences drawn from the weighted sources, by token share.

DESIGN.md: the mixture weights are shares of tokens: of the non-padding tokens a loader slot
emits (text and image placeholders alike), a source's share follows its weight. Weights are per
kind ("doc": every output's docs) or per source ("doc:<output>": one output's docs); each source
has its own sample stream (`train/data/shards.py` `ShardStream`: this slot's shards of one pass,
a new shard permutation each epoch, a bounded shuffle buffer). A pulled sample is read,
tokenized (`train/data/samples.py`: a long document becomes several chunks), its images checked
(a bad one skips the sample before it is packed), and its chunks packed (`train/data/packing.py`).
`source_shards` checks the weights against the manifests before anything starts.

Two packing modes (`MixtureConfig.packing`, the recipe's `data.packing`), both run by `Mixer`:

- `mixed` (the default): one packer takes every source's chunks, so a sequence may hold samples
  of several kinds (document masks keep them apart) and the room 16 pairs leave in 4,096 tokens
  is filled with documents and text. The next chunk comes from the source whose share of the
  tokens put into the packer lags its weight most (least tokens / weight; ties by name): a
  deterministic deficit rule, no random draw, so the shares put in are exact to within one
  chunk, and what comes out lags by at most the packer's buffer.
- `per_kind` (the former behaviour): a packer per source, a sequence holds one source's
  samples; the next sequence comes from the source whose share of the emitted tokens lags its
  weight most. Pairs then fill about 63-75% of a sequence (the 16-image cap), so `mixed` spends
  about a tenth less compute on padding for the MM1 mixture (tools/bench/packing.py --realistic).

An exhausted source starts a new pass (`repeat: True`, the default: the trainer's step budget
ends the run, and every rank yields the same number of batches) or, with `repeat: False`, drops
out (the others keep their weights relative to each other); the stream ends, with what the
packers still hold, when every source has: one pass over everything, e.g. for evaluation.

Bad samples (a member the tar does not hold as the sidecar says, a truncated member, bad JSON or
text, an undecodable or oversized image) are skipped, counted by "<kind>/<reason>" (`skipped()`)
and logged with shard and key, rate-limited (the first 10 of a reason, then every 1000th). With
`max_skipped_fraction` (the recipe's `data.max_skipped_fraction`), a slot that has skipped more
than that share of the samples it tried, after at least 1,000, raises `SkippedTooMany`.

State (`state_dict`, a few KB): the sequence index, the token counters, each stream's positions
(`ShardStream`), each packer's buffer and the chunks of a split document not yet packed as refs
[source, shard, row, chunk], no token lists: restoring re-reads and re-tokenizes them
(deterministic: a pair's caption choice is seeded by the sample, `sample_rng`), and continues
with exactly the sequences the uninterrupted stream would have produced. `resume` takes every
slot's state of a saved layout: on another number of slots each stream continues the pass over
the new slots, and what sat in buffers is dropped and counted (`stats["dropped_on_reshard"]`).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from train.data.packing import Packer
from train.data.samples import BadSample, TextTokenizer, check_image, tokenize_sample
from train.data.shards import RateLimitedLog, ShardStream, list_shards, read_sample

log = logging.getLogger("mm1.train.data")

MM1_WEIGHTS = {"pair": 0.45, "doc": 0.45, "text": 0.10}


@dataclass(frozen=True)
class MixtureConfig:
    outs: tuple[str, ...]  # curated outputs (folders or fsspec URLs)
    tokenizer: str  # a tokenizer.json, or a folder holding one
    seq_len: int = 4096
    weights: dict[str, float] = field(default_factory=lambda: dict(MM1_WEIGHTS))
    n_image_tokens: int = 144
    max_images: int = 16
    caption_ratio: float = 1.0  # pairs: probability of the alt-text (else a synthetic caption)
    buffer_size: int = 32  # items a packer chooses from (train/data/packing.py)
    seed: int = 0
    repeat: bool = True
    open_shards: int = 2  # shards a slot reads from at once, per source
    shuffle_buffer: int = 64  # sample positions a slot shuffles among, per source
    max_pixels: int = 8192 * 8192  # a larger image is a bad sample (skipped), checked on its header
    max_skipped_fraction: float | None = None  # recipe `data.max_skipped_fraction`; None: never stop
    packing: str = "mixed"  # "mixed": a sequence may hold several kinds; "per_kind": one source a sequence


PACKING_MODES = ("mixed", "per_kind")


KINDS = ("pair", "doc", "text")


def source_of(name: str, outs: tuple[str, ...]) -> tuple[str, list[str]]:
    """A weight's key -> (kind, outputs): "doc" draws docs from every output, "doc:<output>" from
    that one only (per-source weights: two crawls of different quality, a text corpus apart)."""
    kind, _, out = name.partition(":")
    if kind not in KINDS:
        raise ValueError(f"mixture weight {name!r}: expected one of {KINDS}, or '<kind>:<output>'")
    if out and out not in outs:
        raise ValueError(f"mixture weight {name!r}: {out!r} is not one of the outputs {list(outs)}")
    return kind, [out] if out else list(outs)


def sample_rng(seed: int, ref: Any) -> random.Random:
    """The generator of one sample's random choices (its caption), fixed by the sample itself."""
    return random.Random(f"{seed}:{ref.out}:{ref.shard}:{ref.key}")


class SkippedTooMany(RuntimeError):
    """More samples skipped than the recipe's `data.max_skipped_fraction` allows."""


MIN_SAMPLES_FOR_SKIP_CHECK = 1000


def source_shards(cfg: MixtureConfig) -> dict[str, tuple[str, list[Any], dict[str, Any]]]:
    """Every weighted source -> (kind, its shards, withdrawn keys), from the manifests alone.

    Fails (ValueError, before any worker starts when the loader calls it) on an output listed
    twice, an unreadable manifest, or a weighted source without samples, naming the samples of
    each kind every output holds."""
    # the same output twice, a missing manifest: refused whatever is weighted (files: only the weighted kinds')
    list_shards(cfg.outs, "pair", check_files=False)
    sources = {}
    for name, weight in sorted(cfg.weights.items()):
        if weight <= 0:
            continue
        kind, outs = source_of(name, cfg.outs)
        shards, withdrawn = list_shards(outs, kind)
        live = sum(s.count for s in shards) - sum(len(k) for w in withdrawn.values() for k in w.values())
        if live <= 0:
            held = {out: {k: sum(s.count for s in list_shards([out], k, check_files=False)[0]) for k in KINDS}
                    for out in cfg.outs}
            raise ValueError(f"source {name!r} has weight {weight} but no {kind} samples in {outs}; "
                             f"samples by kind in each output: {held}")
        sources[name] = (kind, shards, withdrawn)
    if not sources:
        raise ValueError(f"no source with a positive weight in {cfg.weights}")
    return sources


@dataclass
class _Item:
    """A tokenized chunk with where it came from: ref = [shard index, row, chunk index] in its
    source's stream (positional: a few bytes in the state, re-read and re-tokenized on restore)."""

    tokens: list[int]
    images: list[Any]
    ref: list[Any]


class Mixer:
    """Packed sequences from weighted sources by token share, in either packing mode (module
    docstring). Knows nothing of shards: `pull(name)` returns the source's next chunk (anything
    with `tokens`, `images` and a JSON-able list `ref`) or None when its stream has ended, and
    `make_packer()` builds a `Packer`. Every emitted `Packed` has `samples` refs [name, *ref],
    `sources` (one name per sample), `source` (the name when all are one, else "mixed") and
    `kinds`; the chunk refs' source is what `load_state_dict`'s `reload` receives back.

    `added[name]` counts the tokens of the source's chunks put into a packer, `delivered[name]`
    those emitted in sequences: `mixed` chooses the next chunk's source by `added`, `per_kind` the
    next sequence's by `delivered`, each the source with the least tokens per unit of weight."""

    def __init__(self, weights: dict[str, float], packing: str, make_packer: Any, pull: Any,
                 kind_of: dict[str, str] | None = None):
        if packing not in PACKING_MODES:
            raise ValueError(f"packing {packing!r}: expected one of {PACKING_MODES}")
        self.weights = {k: float(w) for k, w in sorted(weights.items()) if w > 0}
        if not self.weights:
            raise ValueError(f"no source with a positive weight in {weights}")
        self.packing, self.pull = packing, pull
        self.kind_of = kind_of or {k: k.partition(":")[0] for k in self.weights}
        names = ["mixed"] if packing == "mixed" else list(self.weights)
        self.packers = {n: make_packer() for n in names}
        self.added: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.exhausted: set[str] = set()  # sources whose stream ended (repeat off)

    def _least(self, counts: Counter[str]) -> str | None:
        live = [n for n in self.weights if n not in self.exhausted]
        return min(live, key=lambda n: (counts[n] / self.weights[n], n)) if live else None

    def _add(self, packer: Any, name: str, item: Any) -> None:
        if packer.add(_Item(item.tokens, item.images, [name, *item.ref])):
            self.added[name] += len(item.tokens)

    def _next_mixed(self) -> Any:
        packer = self.packers["mixed"]
        while not packer.ready():
            name = self._least(self.added)
            if name is None:
                packer.flush()  # every source has ended: what is buffered goes out
                break
            item = self.pull(name)
            if item is None:
                self.exhausted.add(name)
            else:
                self._add(packer, name, item)
        return packer.pop()

    def _next_per_kind(self) -> Any:
        while True:
            name = self._least(self.delivered)
            if name is None:
                return None
            packer = self.packers[name]
            while not packer.ready():
                item = self.pull(name)
                if item is None:
                    packer.flush()  # the pass is over: what is buffered goes out
                    break
                self._add(packer, name, item)
            packed = packer.pop()
            if packed is not None:
                return packed
            self.exhausted.add(name)  # chosen no more; the others go on until they end too

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        packed = self._next_mixed() if self.packing == "mixed" else self._next_per_kind()
        if packed is None:
            raise StopIteration
        packed.sources = [ref[0] for ref in packed.samples]
        packed.kinds = [self.kind_of[n] for n in packed.sources]
        packed.source = packed.sources[0] if len(set(packed.sources)) == 1 else "mixed"
        packed.kind = packed.kinds[0] if len(set(packed.kinds)) == 1 else "mixed"
        for name, (n_tokens, _) in zip(packed.sources, packed.sizes):
            self.delivered[name] += n_tokens
        return packed

    def shares(self) -> dict[str, float]:
        """Each source's share of the non-padding tokens emitted so far."""
        total = sum(self.delivered.values())
        return {n: self.delivered[n] / total if total else 0.0 for n in self.weights}

    # state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The mode, the counters and each packer's buffer as refs [name, *ref, n_images]."""
        packers = {}
        for k, p in self.packers.items():
            state = p.state_dict()
            state["buffer"] = [[*e["ref"], e["n_images"]] for e in state["buffer"]]
            packers[k] = state
        return {"packing": self.packing, "added": dict(self.added), "delivered": dict(self.delivered),
                "exhausted": sorted(self.exhausted), "packers": packers}

    def load_state_dict(self, state: dict[str, Any], reload: Any) -> None:
        """Restore a `state_dict()`; `reload(name, ref)` gives a buffered chunk again (its tokens
        and images)."""
        if state.get("packing") != self.packing:
            raise ValueError(f"loader state packed {state.get('packing')!r}, this run packs {self.packing!r} "
                             "(data.packing): resume with the mode it was saved with")
        self.added = Counter(state["added"])
        self.delivered = Counter(state["delivered"])
        self.exhausted = set(state["exhausted"])
        for pname, p in state["packers"].items():
            items = {json.dumps(e[:-1]): reload(e[0], e[1:-1]) for e in p["buffer"]}
            full = {**p, "buffer": [{"ref": e[:-1], "n_images": e[-1], "tokens": items[json.dumps(e[:-1])].tokens}
                                    for e in p["buffer"]]}
            self.packers[pname].load_state_dict(full, lambda ref, items=items: items[json.dumps(ref)].images)

    @staticmethod
    def held(state: dict[str, Any]) -> dict[str, set[tuple[Any, ...]]]:
        """A saved state's buffered chunks by source: name -> {(shard, row)} (samples, not chunks)."""
        out: dict[str, set[tuple[Any, ...]]] = {}
        for p in state["packers"].values():
            for e in p["buffer"]:
                out.setdefault(e[0], set()).add(tuple(e[1:3]))
        return out


class Mixture:
    """One slot's stream of packed sequences from the curated outputs (module docstring)."""

    def __init__(self, cfg: MixtureConfig, slot: int, n_slots: int,
                 sources: dict[str, tuple[str, list[Any], dict[str, Any]]] | None = None):
        self.cfg, self.slot, self.n_slots = cfg, slot, n_slots
        self.tok = TextTokenizer.from_file(cfg.tokenizer)
        self.index = 0
        self.stats: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()  # "<kind>/<reason>" -> samples skipped after reading
        self.log = RateLimitedLog(log)
        self.streams: dict[str, Any] = {}
        self.pending: dict[str, list[_Item]] = {}
        self.kind_of: dict[str, str] = {}
        for name, (kind, shards, withdrawn) in (sources or source_shards(cfg)).items():
            self.kind_of[name] = kind
            self.streams[name] = ShardStream(shards, withdrawn, seed=cfg.seed, slot=slot, n_slots=n_slots,
                                             repeat=cfg.repeat, open_shards=cfg.open_shards,
                                             shuffle_buffer=cfg.shuffle_buffer, logger=self.log)
            self.pending[name] = []

        def make_packer() -> Packer:
            return Packer(cfg.seq_len, image_token_id=self.tok.image_id, pad_id=self.tok.pad_id,
                          n_image_tokens=cfg.n_image_tokens, max_images=cfg.max_images, buffer_size=cfg.buffer_size)

        weights = {k: w for k, w in cfg.weights.items() if k in self.streams}
        self.mixer = Mixer(weights, cfg.packing, make_packer, self._pull, self.kind_of)

    # tokenizing ---------------------------------------------------------------------------------

    def _chunks(self, kind: str, ref: Any, members: dict[str, bytes], where: tuple[int, int]) -> list[_Item]:
        """The sample's packable chunks; [] (counted, logged) for a bad sample: malformed text or
        JSON, a missing member, or an image that does not decode or is too large. Images are
        checked here, before packing, so a bad one never reaches a sequence (collate)."""
        try:
            chunks = tokenize_sample(kind, members, self.tok, n_image_tokens=self.cfg.n_image_tokens,
                                     max_len=self.cfg.seq_len, caption_ratio=self.cfg.caption_ratio,
                                     rng=sample_rng(self.cfg.seed, ref), max_images=self.cfg.max_images,
                                     stats=self.stats)
            for c in chunks:
                for image in c.images:
                    check_image(image, self.cfg.max_pixels)
        except BadSample as exc:
            self.bad[f"{kind}/{exc.reason}"] += 1
            self.log(exc.reason, "skipping %s sample %s key %s in %s: %s", kind, ref.shard, ref.key, ref.out, exc)
            return []
        return [_Item(c.tokens, c.images, [where[0], where[1], i]) for i, c in enumerate(chunks)]

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far by this slot, by "<kind>/<reason>" (cumulative)."""
        out = Counter(self.bad)
        for name, stream in self.streams.items():
            for key, n in stream.stats.items():
                if key.startswith("skipped/") and n:
                    out[f"{self.kind_of[name]}/{key[len('skipped/'):]}"] += n
        return dict(sorted(out.items()))

    def _check_skips(self) -> None:
        limit = self.cfg.max_skipped_fraction
        if limit is None:
            return
        skipped = sum(self.skipped().values())
        bad_after_read = sum(self.bad.values())
        tried = sum(s.stats["read"] for s in self.streams.values()) + skipped - bad_after_read
        if tried >= MIN_SAMPLES_FOR_SKIP_CHECK and skipped > limit * tried:
            raise SkippedTooMany(f"slot {self.slot}/{self.n_slots}: {skipped} of {tried} samples skipped "
                                 f"({skipped / tried:.1%}) > data.max_skipped_fraction = {limit}: "
                                 f"{self.skipped()}; see the log for shards and keys")

    def _pull(self, name: str) -> _Item | None:
        """The source's next chunk (reading and tokenizing samples as needed); None when its
        stream has ended (repeat off)."""
        pending, stream = self.pending[name], self.streams[name]
        while not pending:
            nxt = next(stream, None)
            if nxt is None:
                return None
            ref, members = nxt
            pending.extend(self._chunks(self.kind_of[name], ref, members, stream.last))
            self._check_skips()
        return pending.pop(0)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        packed = next(self.mixer)
        self.index += 1
        for name, (n_tokens, n_images) in zip(packed.sources, packed.sizes):
            self.stats[f"{name}/samples"] += 1
            self.stats[f"{name}/tokens"] += n_tokens
            self.stats[f"{name}/image_tokens"] += n_images * self.cfg.n_image_tokens
        self.stats[f"{packed.source}/sequences"] += 1
        self.stats["pad_tokens"] += packed.n_pad
        return packed

    def sample_of(self, ref: list[Any]) -> Any:
        """The SampleRef a packed sample's ref ([source, shard, row, chunk]) points at."""
        return self.streams[ref[0]].ref_at(int(ref[1]), int(ref[2]))

    # state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Positional and small: the streams' positions, the mixer's counters and packer buffers,
        and the chunks of a split document not yet packed, as refs (no token lists:
        re-tokenizing is deterministic)."""
        return {
            "index": self.index,
            "mixer": self.mixer.state_dict(),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "pending": {k: [i.ref for i in items] for k, items in self.pending.items()},
            "stats": dict(self.stats),
            "bad": dict(self.bad),
        }

    def _reload(self, name: str, ref: list[Any]) -> _Item:
        """A chunk again from its reference [shard, row, chunk]: re-read and re-tokenized."""
        j, row, chunk = (int(x) for x in ref)
        sample_ref = self.streams[name].ref_at(j, row)
        return self._chunks(self.kind_of[name], sample_ref, read_sample(sample_ref), (j, row))[chunk]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` of this same slot layout: continues exactly."""
        if "mixer" not in state:
            raise ValueError("loader state from before token-share mixing (no 'mixer'): it cannot be resumed")
        self.index = int(state["index"])
        self.stats = Counter(state.get("stats", {}))
        self.bad = Counter(state.get("bad", {}))
        for name, s in state["streams"].items():
            self.streams[name].load_state_dict(s)
        self.mixer.load_state_dict(state["mixer"], self._reload)
        for name, refs in state["pending"].items():
            self.pending[name] = [self._reload(name, r) for r in refs]

    def resume(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of every slot of a saved layout (in slot order). The same
        number of slots: this slot's own state, exactly (`load_state_dict`). Another number: each
        source's pass continues over this layout (`ShardStream.reshard`); what sat in shuffle
        buffers, packer buffers and pending chunks is dropped, counted in
        `stats["dropped_on_reshard"]` (and `stats["replayed_on_reshard"]`: draws of a slot already
        into the next pass) by slot 0 only, so the sum over slots is the run's total. The token
        counters start again from zero: each new slot keeps its own shares from here."""
        if len(states) == self.n_slots:
            self.load_state_dict(states[self.slot])
            return
        dropped = replayed = 0
        held = [Mixer.held(s["mixer"]) for s in states]
        for name, stream in self.streams.items():
            saved = [s["streams"][name] for s in states]
            moved = stream.reshard(saved)
            dropped += moved["dropped"]
            replayed += moved["replayed"]
            for s, h in zip(states, held):  # samples in a packer buffer or pending (a sample counts once)
                dropped += len(h.get(name, set()) | {tuple(r[:2]) for r in s["pending"][name]})
        self.index = max(int(s["index"]) for s in states)
        if self.slot == 0:
            for s in states:
                self.stats.update(s.get("stats", {}))
                self.bad.update(s.get("bad", {}))
            self.stats["dropped_on_reshard"] += dropped
            self.stats["replayed_on_reshard"] += replayed
            log.warning("loader resharded from %d slots to %d: %d buffered samples dropped, %d draws of a "
                        "later pass read again", len(states), self.n_slots, dropped, replayed)
