"""The mixture: packed sequences drawn from the three kinds by weight, one kind per sequence.

DESIGN.md: the mixture's unit is the packed sequence. Sequence `i` of a loader slot (slot =
rank x workers + worker) is built from the kind drawn for (seed, slot, i) alone, so the draw
needs no state and a resumed stream draws the same kinds. Each kind has its own sample stream
(`train/data/shards.py` `ShardStream`: this slot's shards of one pass, a new shard permutation
each epoch, a bounded shuffle buffer) and its own packer (`train/data/packing.py`); a drawn kind
pulls samples, tokenizes them (`train/data/samples.py`: a long document becomes several chunks),
checks their images (a bad one skips the sample before it is packed) and packs until its packer
can emit a sequence. Weights are per kind ("doc": every output's docs) or per source
("doc:<output>": one output's docs), each with its own stream and packer; a sequence still holds
one kind. `source_shards` checks the weights against the manifests before anything starts.

An exhausted kind starts a new pass (`repeat: True`, the default: the trainer's step budget
ends the run, and every rank yields the same number of batches) or, with `repeat: False`, emits
what its packer still holds and drops out of the draw (the others keep their weights relative to
each other); the stream ends when every kind has: one pass over everything, e.g. for evaluation.

Bad samples (a member the tar does not hold as the sidecar says, a truncated member, bad JSON or
text, an undecodable or oversized image) are skipped, counted by "<kind>/<reason>" (`skipped()`)
and logged with shard and key, rate-limited (the first 10 of a reason, then every 1000th). With
`max_skipped_fraction` (the recipe's `data.max_skipped_fraction`), a slot that has skipped more
than that share of the samples it tried, after at least 1,000, raises `SkippedTooMany`.

State (`state_dict`, a few KB): the sequence index, each stream's positions (`ShardStream`), each
packer's buffer and the chunks of a split document not yet packed as refs [shard, row, chunk], no
token lists: restoring re-reads and re-tokenizes them (deterministic: a pair's caption choice is
seeded by the sample, `sample_rng`), and continues with exactly the sequences the uninterrupted
stream would have produced. `resume` takes every slot's state of a saved layout: on another
number of slots each stream continues the pass over the new slots, and what sat in buffers is
dropped and counted (`stats["dropped_on_reshard"]`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
    buffer_size: int = 64  # items a packer chooses from
    seed: int = 0
    repeat: bool = True
    open_shards: int = 2  # shards a slot reads from at once, per source
    shuffle_buffer: int = 64  # sample positions a slot shuffles among, per source
    max_pixels: int = 8192 * 8192  # a larger image is a bad sample (skipped), checked on its header
    max_skipped_fraction: float | None = None  # recipe `data.max_skipped_fraction`; None: never stop


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


def draw_kind(weights: dict[str, float], seed: int, slot: int, index: int) -> str:
    """The source (a kind, or a kind of one output) of sequence `index` of `slot`: a pure
    function, so resuming needs no RNG state."""
    kinds = sorted(k for k, w in weights.items() if w > 0)
    total = sum(weights[k] for k in kinds)
    digest = hashlib.blake2b(f"{seed}:{slot}:{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64 * total
    for k in kinds:
        u -= weights[k]
        if u < 0:
            return k
    return kinds[-1]


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
    from train.data.shards import list_shards

    list_shards(cfg.outs, "pair")  # the same output twice, a missing manifest: refused whatever is weighted
    sources = {}
    for name, weight in sorted(cfg.weights.items()):
        if weight <= 0:
            continue
        kind, outs = source_of(name, cfg.outs)
        shards, withdrawn = list_shards(outs, kind)
        live = sum(s.count for s in shards) - sum(len(k) for w in withdrawn.values() for k in w.values())
        if live <= 0:
            held = {out: {k: sum(s.count for s in list_shards([out], k)[0]) for k in KINDS} for out in cfg.outs}
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
    images: list[bytes]
    ref: list[int]


class Mixture:
    """One slot's stream of packed sequences (see the module docstring)."""

    def __init__(self, cfg: MixtureConfig, slot: int, n_slots: int,
                 sources: dict[str, tuple[str, list[Any], dict[str, Any]]] | None = None):
        from train.data.packing import Packer
        from train.data.samples import TextTokenizer
        from train.data.shards import RateLimitedLog, ShardStream

        self.cfg, self.slot, self.n_slots = cfg, slot, n_slots
        self.tok = TextTokenizer.from_file(cfg.tokenizer)
        self.index = 0
        self.exhausted: set[str] = set()  # sources whose pass ended (repeat off)
        self.stats: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()  # "<kind>/<reason>" -> samples skipped after reading
        self.log = RateLimitedLog(log)
        self.streams: dict[str, Any] = {}
        self.packers: dict[str, Any] = {}
        self.pending: dict[str, list[_Item]] = {}
        self.kind_of: dict[str, str] = {}
        for name, (kind, shards, withdrawn) in (sources or source_shards(cfg)).items():
            self.kind_of[name] = kind
            self.streams[name] = ShardStream(shards, withdrawn, seed=cfg.seed, slot=slot, n_slots=n_slots,
                                             repeat=cfg.repeat, open_shards=cfg.open_shards,
                                             shuffle_buffer=cfg.shuffle_buffer, logger=self.log)
            self.packers[name] = Packer(cfg.seq_len, image_token_id=self.tok.image_id, pad_id=self.tok.pad_id,
                                        n_image_tokens=cfg.n_image_tokens, max_images=cfg.max_images,
                                        buffer_size=cfg.buffer_size)
            self.pending[name] = []

    # tokenizing ---------------------------------------------------------------------------------

    def _chunks(self, kind: str, ref: Any, members: dict[str, bytes], where: tuple[int, int]) -> list[_Item]:
        """The sample's packable chunks; [] (counted, logged) for a bad sample: malformed text or
        JSON, a missing member, or an image that does not decode or is too large. Images are
        checked here, before packing, so a bad one never reaches a sequence (collate)."""
        from train.data.samples import BadSample, check_image, tokenize_sample

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

    def _fill(self, name: str) -> bool:
        """Feed the source's packer until it can emit; False when its stream ended (repeat off)."""
        packer, stream, pending = self.packers[name], self.streams[name], self.pending[name]
        while not packer.ready():
            if not pending:
                nxt = next(stream, None)
                if nxt is None:
                    return False
                ref, members = nxt
                pending.extend(self._chunks(self.kind_of[name], ref, members, stream.last))
                self._check_skips()
                continue
            packer.add(pending.pop(0))
        return True

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            live = {k: w for k, w in self.cfg.weights.items() if k in self.packers and k not in self.exhausted}
            if not live:
                raise StopIteration
            name = draw_kind(live, self.cfg.seed, self.slot, self.index)
            if not self._fill(name):
                self.packers[name].flush()  # the pass is over: what is buffered goes out
            packed = self.packers[name].pop()
            if packed is not None:
                break
            self.exhausted.add(name)  # drawn no more; the others go on until they end too
        self.index += 1
        self.stats[f"{name}/sequences"] += 1
        self.stats[f"{name}/text_tokens"] += packed.n_text_tokens
        self.stats[f"{name}/image_tokens"] += packed.n_image_tokens
        self.stats[f"{name}/pad_tokens"] += packed.n_pad
        packed.kind, packed.source = self.kind_of[name], name
        return packed

    def sample_of(self, name: str, item_ref: list[int]) -> Any:
        """The SampleRef an item ref ([shard, row, chunk]) of source `name` points at."""
        return self.streams[name].ref_at(item_ref[0], item_ref[1])

    # state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Positional and small: the streams' positions, the packers' buffers and the pending
        chunks as refs [shard, row, chunk] (no token lists: re-tokenizing is deterministic)."""
        packers = {}
        for k, p in self.packers.items():
            state = p.state_dict()  # buffer entries -> [shard, row, chunk, n_images]: ~12 bytes an item
            state["buffer"] = [[*e["ref"], e["n_images"]] for e in state["buffer"]]
            packers[k] = state
        return {
            "index": self.index,
            "exhausted": sorted(self.exhausted),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "packers": packers,
            "pending": {k: [i.ref for i in items] for k, items in self.pending.items()},
            "stats": dict(self.stats),
            "bad": dict(self.bad),
        }

    def _reload(self, name: str, ref: list[int]) -> _Item:
        """An item again from its reference: re-read and re-tokenized (deterministic)."""
        from train.data.shards import read_sample

        j, row, chunk = (int(x) for x in ref)
        sample_ref = self.streams[name].ref_at(j, row)
        return self._chunks(self.kind_of[name], sample_ref, read_sample(sample_ref), (j, row))[chunk]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` of this same slot layout: continues exactly."""
        self.index = int(state["index"])
        self.exhausted = set(state.get("exhausted", []))
        self.stats = Counter(state.get("stats", {}))
        self.bad = Counter(state.get("bad", {}))
        for name, s in state["streams"].items():
            self.streams[name].load_state_dict(s)
        for name, p in state["packers"].items():  # tokens and images are re-read and re-tokenized
            items = {json.dumps(e[:3]): self._reload(name, e[:3]) for e in p["buffer"]}
            full = {**p, "buffer": [{"ref": e[:3], "n_images": e[3], "tokens": items[json.dumps(e[:3])].tokens}
                                    for e in p["buffer"]]}
            self.packers[name].load_state_dict(full, lambda ref, items=items: items[json.dumps(ref)].images)
        for name, refs in state["pending"].items():
            self.pending[name] = [self._reload(name, r) for r in refs]

    def resume(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of every slot of a saved layout (in slot order). The same
        number of slots: this slot's own state, exactly (`load_state_dict`). Another number: each
        source's pass continues over this layout (`ShardStream.reshard`); what sat in shuffle
        buffers, packer buffers and pending chunks is dropped, counted in
        `stats["dropped_on_reshard"]` (and `stats["replayed_on_reshard"]`: draws of a slot already
        into the next pass) by slot 0 only, so the sum over slots is the run's total."""
        if len(states) == self.n_slots:
            self.load_state_dict(states[self.slot])
            return
        dropped = replayed = 0
        for name, stream in self.streams.items():
            saved = [s["streams"][name] for s in states]
            moved = stream.reshard(saved)
            dropped += moved["dropped"]
            replayed += moved["replayed"]
            for s in states:  # samples in the packer buffer or pending (a sample counts once)
                held = {tuple(e[:2]) for e in s["packers"][name]["buffer"]}
                held |= {tuple(r[:2]) for r in s["pending"][name]}
                dropped += len(held)
        self.index = max(int(s["index"]) for s in states)
        if self.slot == 0:
            for s in states:
                self.stats.update(s.get("stats", {}))
                self.bad.update(s.get("bad", {}))
            self.stats["dropped_on_reshard"] += dropped
            self.stats["replayed_on_reshard"] += replayed
            log.warning("loader resharded from %d slots to %d: %d buffered samples dropped, %d draws of a "
                        "later pass read again", len(states), self.n_slots, dropped, replayed)
