"""The mixture: packed sequences drawn from the three kinds by weight, one kind per sequence.

DESIGN.md: the mixture's unit is the packed sequence. Sequence `i` of a loader slot (slot =
rank x workers + worker) is built from the kind drawn for (seed, slot, i) alone, so the draw
needs no state and a resumed stream draws the same kinds. Each kind has its own sample stream
(`train/data/shards.py`: this slot's share of one pass, re-permuted each epoch) and its own
packer (`train/data/packing.py`); a drawn kind pulls samples, tokenizes them
(`train/data/samples.py`: a long document becomes several chunks) and packs until its packer
can emit a sequence. Weights are per kind ("doc": every output's docs) or per source ("doc:<output>":
one output's docs), each with its own stream and packer; a sequence still holds one kind.

An exhausted kind starts a new pass (`repeat: True`, the default: the trainer's step budget
ends the run, and every rank yields the same number of batches) or, with `repeat: False`, emits
what its packer still holds and drops out of the draw (the others keep their weights relative to
each other); the stream ends when every kind has: one pass over everything, e.g. for evaluation.

State (`state_dict`): the sequence index, each stream's epoch and cursor, each packer's buffer
(its items' tokens and references: `train/data/packing.py`), and the chunks of a split document
not yet packed (by reference), all JSON-able: restoring it continues with exactly the sequences
the uninterrupted stream would have produced. Images and pending chunks are re-read by reference
on restore; tokenization is deterministic (a pair's caption choice is seeded by the sample, not
by a running generator).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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


@dataclass
class _Item:
    """A tokenized chunk with where it came from: (sample reference, chunk index)."""

    tokens: list[int]
    images: list[bytes]
    ref: dict[str, Any]


class Mixture:
    """One slot's stream of packed sequences (see the module docstring)."""

    def __init__(self, cfg: MixtureConfig, slot: int, n_slots: int):
        from train.data.packing import Packer
        from train.data.samples import TextTokenizer
        from train.data.shards import SampleStream, list_samples

        self.cfg, self.slot, self.n_slots = cfg, slot, n_slots
        self.tok = TextTokenizer.from_file(cfg.tokenizer)
        self.index = 0
        self.exhausted: set[str] = set()  # sources whose pass ended (repeat off)
        self.stats: Counter[str] = Counter()
        self.streams: dict[str, Any] = {}
        self.packers: dict[str, Any] = {}
        self.pending: dict[str, list[_Item]] = {}
        self.kind_of: dict[str, str] = {}
        for name, weight in sorted(cfg.weights.items()):
            if weight <= 0:
                continue
            kind, outs = source_of(name, cfg.outs)
            refs = list_samples(outs, kind)
            if not refs:
                raise ValueError(f"source {name!r} has weight {weight} but no {kind} samples in {outs}")
            self.kind_of[name] = kind
            self.streams[name] = SampleStream(refs, seed=cfg.seed, slot=slot, n_slots=n_slots, repeat=cfg.repeat)
            self.packers[name] = Packer(cfg.seq_len, image_token_id=self.tok.image_id, pad_id=self.tok.pad_id,
                                        n_image_tokens=cfg.n_image_tokens, max_images=cfg.max_images,
                                        buffer_size=cfg.buffer_size)
            self.pending[name] = []

    # tokenizing ---------------------------------------------------------------------------------

    def _chunks(self, kind: str, ref: Any, members: dict[str, bytes]) -> list[_Item]:
        from train.data.samples import BadSample, tokenize_sample

        try:
            chunks = tokenize_sample(kind, members, self.tok, n_image_tokens=self.cfg.n_image_tokens,
                                     max_len=self.cfg.seq_len, caption_ratio=self.cfg.caption_ratio,
                                     rng=sample_rng(self.cfg.seed, ref), max_images=self.cfg.max_images,
                                     stats=self.stats)
        except BadSample as exc:
            self.stats[f"{kind}/bad_sample"] += 1
            log.warning("skipping %s %s/%s: %s", kind, ref.shard, ref.key, exc)
            return []
        return [_Item(c.tokens, c.images, {"sample": asdict(ref), "chunk": i}) for i, c in enumerate(chunks)]

    def _fill(self, name: str) -> bool:
        """Feed the source's packer until it can emit; False when its stream ended (repeat off)."""
        packer, stream, pending = self.packers[name], self.streams[name], self.pending[name]
        while not packer.ready():
            if not pending:
                nxt = next(stream, None)
                if nxt is None:
                    return False
                ref, members = nxt
                pending.extend(self._chunks(self.kind_of[name], ref, members))
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

    # state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "exhausted": sorted(self.exhausted),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "packers": {k: p.state_dict() for k, p in self.packers.items()},
            "pending": {k: [i.ref for i in items] for k, items in self.pending.items()},
            "stats": dict(self.stats),
        }

    def _reload(self, name: str, ref: dict[str, Any]) -> _Item:
        """An item again from its reference: re-read and re-tokenized (deterministic)."""
        from train.data.shards import SampleRef, read_sample

        sample_ref = SampleRef.from_dict(ref["sample"])
        return self._chunks(self.kind_of[name], sample_ref, read_sample(sample_ref))[ref["chunk"]]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
        self.exhausted = set(state.get("exhausted", []))
        self.stats = Counter(state.get("stats", {}))
        for name, s in state["streams"].items():
            self.streams[name].load_state_dict(s)
        for name, p in state["packers"].items():  # the packer keeps tokens; images are re-read
            self.packers[name].load_state_dict(p, lambda ref, name=name: self._reload(name, ref).images)
        for name, refs in state["pending"].items():
            self.pending[name] = [self._reload(name, r) for r in refs]
