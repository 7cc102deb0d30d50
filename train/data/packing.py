"""Pack tokenized samples into fixed-length training sequences.

The input is a stream of items, each with `tokens: list[int]` (images as runs of
`n_image_tokens` placeholder ids `image_token_id`), `images` (one per run, in order) and an opaque,
JSON-able `ref` that names where the item came from. The output is `Packed`: one sequence of
exactly `seq_len` tokens holding whole items, never more than `max_images` images, padded at the
end.

Rule (streaming best fit over a bounded buffer, deterministic): the oldest buffered item always
opens the next sequence, so an item goes out at the latest right after every older one (bounded
delay, and the stream's order is roughly kept); then the subset of the other buffered items that
fills the most of the remaining space within the remaining image budget joins it; among equal
fills, the one with the most images (then the one that keeps older items: a newer item is left out
whenever the same fill is reachable without it); the rest is padding. The subset is found exactly
(a subset-sum over the buffer), not by adding the longest item that fits until none does: that
greedy rule leaves on average half the shortest item's length empty, 4% of a 4096-token sequence
for 600-token documents, while the exact fill reaches the bound the tokens and the image cap set
(tools/bench/packing.py).

Why the most images: when kinds share sequences (`train/data/mixture.py`, `mixed`), a full
sequence can usually be made many ways, and the one with the fewest images takes the text-heavy
items (documents, text) and leaves the pairs (an image for ~200 tokens) behind. The buffer then
fills with pairs, and the sequences that follow hit the 16-image cap with room to spare: 4.5%
padding on the MM1 mixture, against 0.01% when each full sequence takes as many images as it can
(tools/bench/packing.py --realistic). On one kind alone the rule changes little.

The buffer must hold more items than one sequence takes (MM1 pairs: 16 per sequence), or
`ready()` cuts sequences short; 32 is the default (a larger buffer fills no better, and lets the
mixture's sources drift further from their weights before it comes back: tools/bench/packing.py).

Attention and loss never cross samples: `doc_ids` numbers the packed samples 0, 1, 2... and the
padding run takes the next id (its own document, so no sample attends to it and the model's
`document_segments` sees it as one more run); `positions` restart at 0 for each run. `labels`
are aligned with `tokens` as `train.model.mm1.text_labels` makes them: labels[t] = tokens[t+1]
when t+1 is in the same sample and is a text token, else IGNORE. So the last placeholder of an
image predicts the text that follows it (MM1 learns text after images), nothing predicts a
placeholder, the last token of a sample predicts nothing, and padding predicts nothing.

A sequence with no target token would cost a step for no loss; since targets never cross samples,
a sequence has none exactly when none of its items has one, so such items (an empty sample, a
lone token) are skipped when added and counted in `stats["skipped_items"]`: no sequence without
a target is ever emitted.

Resuming: `state_dict()` is plain JSON. It holds the buffered items' token lists and refs (at
most `buffer_size` x `seq_len` ints: 32 x 4096 = 131,072 ints, under 1 MB as JSON, in every
checkpoint), never their images: images are bytes or tensors, and are re-read by ref through the
`images` callable given to `load_state_dict`. Tokens are stored rather than re-derived because
tokenization may draw random choices (alt-text or synthetic caption) that a re-read would redo
differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

IGNORE = -100  # the label of a position that predicts nothing (torch's cross_entropy default)
STATE_VERSION = 1


class PackItem(Protocol):
    """What the packer takes: anything with these three attributes."""

    tokens: list[int]
    images: list[Any]
    ref: Any


@dataclass
class Item:
    """A plain `PackItem` (the samples module may pass its own type)."""

    tokens: list[int]
    images: list[Any] = field(default_factory=list)
    ref: Any = None


@dataclass
class Packed:
    """One fixed-length sequence; every per-token list has `seq_len` entries."""

    tokens: list[int]
    doc_ids: list[int]  # 0, 1, 2... per packed sample; the padding run has the next id
    positions: list[int]  # restart at 0 for each sample and for the padding run
    labels: list[int]  # next-token targets, IGNORE where there is none (see the module docstring)
    images: list[Any]  # in placeholder order
    n_text_tokens: int  # non-padding tokens that are not image placeholders
    n_image_tokens: int
    n_pad: int
    samples: list[Any]  # the refs of the packed items, in packed order
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (tokens, images) of each packed item


@dataclass
class _Entry:
    tokens: list[int]
    images: list[Any]
    ref: Any


class Packer:
    """Streaming best-fit packer; see the module docstring for the rule and its guarantees.

    Use: `add` items; whenever `ready()`, `pop()` a sequence; at the end of the stream `flush()`
    and `pop()` until it returns None."""

    def __init__(self, seq_len: int, *, image_token_id: int, pad_id: int, n_image_tokens: int,
                 max_images: int = 16, buffer_size: int = 32) -> None:
        if seq_len < 1 or n_image_tokens < 1 or max_images < 0 or buffer_size < 1:
            raise ValueError(f"bad packer sizes: seq_len={seq_len}, n_image_tokens={n_image_tokens}, "
                             f"max_images={max_images}, buffer_size={buffer_size}")
        if n_image_tokens * min(max_images, 1) > seq_len:
            raise ValueError(f"an image ({n_image_tokens} tokens) does not fit a sequence of {seq_len}")
        if pad_id == image_token_id:
            raise ValueError(f"pad_id and image_token_id are both {pad_id}")
        self.seq_len = seq_len
        self.image_token_id = image_token_id
        self.pad_id = pad_id
        self.n_image_tokens = n_image_tokens
        self.max_images = max_images
        self.buffer_size = buffer_size
        self._buffer: list[_Entry] = []
        self._flushing = False
        self.stats = {"items": 0, "skipped_items": 0, "sequences": 0, "tokens": 0, "pad_tokens": 0}

    # -- input ------------------------------------------------------------------------------

    def _check(self, tokens: list[int], images: list[Any], ref: Any) -> None:
        """Refuse an item no sequence could hold or whose placeholders do not match its images."""
        if len(tokens) > self.seq_len:
            raise ValueError(f"item {ref!r}: {len(tokens)} tokens > seq_len {self.seq_len}; "
                             "long samples must be split before packing")
        if len(images) > self.max_images:
            raise ValueError(f"item {ref!r}: {len(images)} images > max_images {self.max_images}")
        run = runs = 0
        for tok in tokens + [None]:
            if tok == self.image_token_id:
                run += 1
                continue
            if run % self.n_image_tokens:
                raise ValueError(f"item {ref!r}: a run of {run} image tokens is not a multiple of "
                                 f"{self.n_image_tokens}")
            runs += run // self.n_image_tokens
            run = 0
        if runs != len(images):
            raise ValueError(f"item {ref!r}: {runs} images' worth of placeholders, {len(images)} images")

    def _has_target(self, tokens: list[int]) -> bool:
        return any(t != self.image_token_id for t in tokens[1:])

    def add(self, item: PackItem) -> bool:
        """Buffer one item (validated: `ValueError` if no sequence could hold it); an item
        without a single target token is skipped and counted instead. True if it was buffered."""
        tokens, images = list(item.tokens), list(item.images)
        self._check(tokens, images, item.ref)
        self.stats["items"] += 1
        if not self._has_target(tokens):
            self.stats["skipped_items"] += 1
            return False
        self._buffer.append(_Entry(tokens, images, item.ref))
        return True

    def flush(self) -> None:
        """The stream has ended (or is paused for good): `ready()` stays true until the buffer is
        drained. Adding more afterwards is allowed; the flag stays until `load_state_dict`."""
        self._flushing = True

    def ready(self) -> bool:
        """True when a sequence should be popped: the buffer is full, or a flush was asked."""
        return len(self._buffer) >= self.buffer_size or (self._flushing and bool(self._buffer))

    def __len__(self) -> int:
        return len(self._buffer)

    # -- packing ----------------------------------------------------------------------------

    def _choose(self) -> list[int]:
        """Buffer indices of the next sequence's items, in buffer order: the oldest, then the
        subset of the others that fills the most of the remaining space within the image budget.

        A subset-sum over the buffer, with the reachable token sums of each image count held as
        the bits of one int (sum s reachable with j images <=> bit s of reach[j]): a few thousand
        big-int shifts per sequence. Backtracking from the newest item leaves an item out whenever
        the same fill is reachable without it, so among equal fills the older items go first."""
        first = self._buffer[0]
        space = self.seq_len - len(first.tokens)
        budget = self.max_images - len(first.images)
        mask = (1 << (space + 1)) - 1
        reach = [1] + [0] * budget
        history: list[list[int]] = []  # reach before each candidate (buffer index 1, 2, ...)
        for entry in self._buffer[1:]:
            history.append(reach)
            n, k = len(entry.tokens), len(entry.images)
            if n > space or k > budget:
                continue
            grown = list(reach)
            for j in range(budget - k + 1):
                if reach[j]:
                    grown[j + k] |= (reach[j] << n) & mask
            reach = grown
        # the fullest fill; of equal fills, the one with the most images (module docstring)
        fill, images = max(((r.bit_length() - 1, j) for j, r in enumerate(reach) if r))
        chosen = []
        for i in range(len(history) - 1, -1, -1):
            if (history[i][images] >> fill) & 1:
                continue  # the same fill without this item
            entry = self._buffer[i + 1]
            chosen.append(i + 1)
            fill -= len(entry.tokens)
            images -= len(entry.images)
        assert fill == 0 and images == 0
        return [0] + chosen[::-1]

    def _build(self, entries: list[_Entry]) -> Packed:
        tokens: list[int] = []
        doc_ids: list[int] = []
        positions: list[int] = []
        labels: list[int] = []
        images: list[Any] = []
        img = self.image_token_id
        for doc, entry in enumerate(entries):
            toks = entry.tokens
            tokens.extend(toks)
            doc_ids.extend([doc] * len(toks))
            positions.extend(range(len(toks)))
            labels.extend(t if t != img else IGNORE for t in toks[1:])
            labels.append(IGNORE)
            images.extend(entry.images)
        n_pad = self.seq_len - len(tokens)
        n_image = sum(1 for t in tokens if t == img)
        n_text = len(tokens) - n_image
        tokens.extend([self.pad_id] * n_pad)
        doc_ids.extend([len(entries)] * n_pad)
        positions.extend(range(n_pad))
        labels.extend([IGNORE] * n_pad)
        return Packed(tokens=tokens, doc_ids=doc_ids, positions=positions, labels=labels, images=images,
                      n_text_tokens=n_text, n_image_tokens=n_image, n_pad=n_pad,
                      samples=[e.ref for e in entries],
                      sizes=[(len(e.tokens), len(e.images)) for e in entries])

    def pop(self) -> Packed | None:
        """The next sequence by the packing rule, or None when the buffer is empty. Does not wait
        for `ready()`: popping early just packs from a smaller window."""
        if not self._buffer:
            return None
        chosen = self._choose()
        picked = set(chosen)
        entries = [self._buffer[i] for i in chosen]
        self._buffer = [e for i, e in enumerate(self._buffer) if i not in picked]
        packed = self._build(entries)
        if all(label == IGNORE for label in packed.labels):  # unreachable: items without one are skipped
            raise AssertionError(f"a sequence without a target from {packed.samples!r}")
        self.stats["sequences"] += 1
        self.stats["tokens"] += self.seq_len
        self.stats["pad_tokens"] += packed.n_pad
        return packed

    @property
    def efficiency(self) -> float:
        """Non-padding tokens / all tokens of the sequences popped so far (1.0 before any)."""
        total = self.stats["tokens"]
        return 1.0 if total == 0 else (total - self.stats["pad_tokens"]) / total

    # -- resuming ---------------------------------------------------------------------------

    def _config(self) -> dict[str, int]:
        return {"seq_len": self.seq_len, "image_token_id": self.image_token_id, "pad_id": self.pad_id,
                "n_image_tokens": self.n_image_tokens, "max_images": self.max_images,
                "buffer_size": self.buffer_size}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the configuration (checked on load), the buffered items' tokens and
        refs in buffer order, the flush flag and the counters. Images are not stored."""
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "buffer": [{"ref": e.ref, "tokens": list(e.tokens), "n_images": len(e.images)} for e in self._buffer],
            "flushing": self._flushing,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any],
                        images: Callable[[Any], list[Any]] | None = None) -> None:
        """Restore a `state_dict()`. `images(ref)` returns a buffered item's images again (needed
        only when some buffered item has images); a count that differs from the saved one is an
        error, as is a state saved by a packer of another configuration."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["config"] != self._config():
            raise ValueError(f"packer state saved with {state['config']}, this packer is {self._config()}")
        buffer = []
        for saved in state["buffer"]:
            n = int(saved["n_images"])
            if n and images is None:
                raise ValueError(f"item {saved['ref']!r} has {n} images: pass images= to re-read them by ref")
            restored = list(images(saved["ref"])) if n else []
            if len(restored) != n:
                raise ValueError(f"item {saved['ref']!r}: {len(restored)} images re-read, {n} saved")
            tokens = [int(t) for t in saved["tokens"]]
            self._check(tokens, restored, saved["ref"])
            buffer.append(_Entry(tokens, restored, saved["ref"]))
        self._buffer = buffer
        self._flushing = bool(state["flushing"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}
