"""The sequence packer over seeded random item streams: every item once and whole, the image cap,
per-sample positions and attention ids, labels that match the model's `text_labels`, the
oldest-first rule, determinism, and an exact resume from a JSON state."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from train.data.packing import IGNORE, Item, Packed, Packer
from train.model.mm1 import text_labels

IMG, PAD, N_IMG = 7, 0, 4  # small image runs so random streams hold many images per sequence
SEQ = 64


def make_item(rng: random.Random, i: int, max_len: int = SEQ) -> Item:
    """A random sample: text tokens (ids >= 10) with 0-3 image runs anywhere, <= max_len tokens."""
    n_images = rng.choice([0, 0, 1, 1, 2, 3])
    n_text = rng.randint(0, max(0, max_len - n_images * N_IMG))
    chunks: list[list[int]] = [[rng.randint(10, 99)] for _ in range(n_text)]
    for _ in range(n_images):
        chunks.insert(rng.randint(0, len(chunks)), [IMG] * N_IMG)
    tokens = [t for chunk in chunks for t in chunk]
    return Item(tokens=tokens, images=[f"img{i}.{k}" for k in range(n_images)], ref={"i": i})


def stream(seed: int, n: int = 400) -> list[Item]:
    rng = random.Random(seed)
    return [make_item(rng, i, max_len=rng.choice([8, 20, SEQ])) for i in range(n)]


def packer(**kw: Any) -> Packer:
    args = {"image_token_id": IMG, "pad_id": PAD, "n_image_tokens": N_IMG, "max_images": 5, "buffer_size": 16}
    return Packer(SEQ, **{**args, **kw})


def pack_all(p: Packer, items: list[Item]) -> list[Packed]:
    out = []
    for item in items:
        p.add(item)
        while p.ready():
            out.append(p.pop())
    p.flush()
    while (seq := p.pop()) is not None:
        out.append(seq)
    return out


def has_target(item: Item) -> bool:
    return any(t != IMG for t in item.tokens[1:])


def per_sample(seq: Packed) -> list[tuple[Any, list[int], list[int]]]:
    """(ref, tokens, positions) of each packed sample, recovered from doc_ids alone."""
    out = []
    for doc, ref in enumerate(seq.samples):
        idx = [t for t, d in enumerate(seq.doc_ids) if d == doc]
        assert idx == list(range(idx[0], idx[-1] + 1)), "a sample is one contiguous run"
        out.append((ref, [seq.tokens[t] for t in idx], [seq.positions[t] for t in idx]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_item_packed_once_and_whole(seed: int) -> None:
    items = stream(seed)
    p = packer()
    seqs = pack_all(p, items)
    by_ref = {json.dumps(it.ref): it for it in items}
    seen = []
    for seq in seqs:
        assert len(seq.tokens) == len(seq.doc_ids) == len(seq.positions) == len(seq.labels) == SEQ
        images = []
        for ref, tokens, positions in per_sample(seq):
            item = by_ref[json.dumps(ref)]
            assert tokens == item.tokens and positions == list(range(len(tokens)))
            images += item.images
            seen.append(json.dumps(ref))
        assert seq.images == images  # placeholder order
        n_used = SEQ - seq.n_pad
        assert seq.tokens[n_used:] == [PAD] * seq.n_pad
        assert seq.doc_ids[n_used:] == [len(seq.samples)] * seq.n_pad  # padding: its own, next id
        assert seq.positions[n_used:] == list(range(seq.n_pad))
        assert seq.n_image_tokens == seq.tokens[:n_used].count(IMG) == N_IMG * len(seq.images)
        assert seq.n_text_tokens + seq.n_image_tokens + seq.n_pad == SEQ
    expected = [json.dumps(it.ref) for it in items if has_target(it)]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    assert p.stats["skipped_items"] == len(items) - len(expected) > 0
    assert p.stats["sequences"] == len(seqs)
    assert p.efficiency == pytest.approx(1 - sum(s.n_pad for s in seqs) / (SEQ * len(seqs)))


@pytest.mark.parametrize("seed", [3, 4])
def test_image_cap_and_labels_match_the_model(seed: int) -> None:
    seqs = pack_all(packer(), stream(seed))
    assert max(len(s.images) for s in seqs) == 5  # the cap binds, and holds
    tokens = torch.tensor([s.tokens for s in seqs])
    doc_ids = torch.tensor([s.doc_ids for s in seqs])
    labels = torch.tensor([s.labels for s in seqs])
    assert torch.equal(labels, text_labels(tokens, IMG, doc_ids, pad_id=PAD))
    for s in seqs:
        assert any(label != IGNORE for label in s.labels)  # never a sequence without a target
        for t, label in enumerate(s.labels):
            if label == IGNORE:
                continue
            assert label not in (IMG, PAD) and label == s.tokens[t + 1]
            assert s.doc_ids[t] == s.doc_ids[t + 1] < len(s.samples)
        # an image's last placeholder predicts the text right after it
        after_image = [t for t in range(SEQ - 1) if s.tokens[t] == IMG and s.tokens[t + 1] not in (IMG, PAD)
                       and s.doc_ids[t] == s.doc_ids[t + 1]]
        assert all(s.labels[t] == s.tokens[t + 1] for t in after_image)


def test_oldest_first_then_the_fullest_fill() -> None:
    p = packer(buffer_size=4)
    for i, n in enumerate([10, 30, 50, 24, 24, 20]):
        p.add(Item(tokens=list(range(10, 10 + n)), ref=i))
    # the oldest (10) opens; 54 left: 30 + 24 fill it (the longest first, 50, would leave 4 empty);
    # of the two 24s, the older
    assert p.pop().samples == [0, 1, 3]
    assert p.pop().samples == [2]  # 50 opens; 14 left: nothing fits
    assert p.pop().samples == [4, 5] and p.pop() is None


def _best_fill(entries: list[Item], max_images: int) -> int:
    """Brute force: the most tokens any subset holding the first entry fits in one sequence."""
    first, rest = entries[0], entries[1:]
    best = 0
    for mask in range(1 << len(rest)):
        picked = [first] + [e for b, e in enumerate(rest) if mask >> b & 1]
        n, k = sum(len(e.tokens) for e in picked), sum(len(e.images) for e in picked)
        if n <= SEQ and k <= max_images:
            best = max(best, n)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_each_sequence_is_the_fullest_the_buffer_allows(seed: int) -> None:
    items = [it for it in stream(seed, n=120) if has_target(it)]
    p = packer(buffer_size=9, max_images=3)
    by_ref = {json.dumps(it.ref): it for it in items}
    for item in items:
        p.add(item)
        if p.ready():
            window = [by_ref[json.dumps(e["ref"])] for e in p.state_dict()["buffer"]]
            seq = p.pop()
            assert SEQ - seq.n_pad == _best_fill(window, 3)


def test_oldest_item_never_waits_more_than_buffer_pops() -> None:
    items = stream(5, n=300)
    p = packer(buffer_size=8)
    order = {json.dumps(it.ref): i for i, it in enumerate(items)}
    first_of_each = [order[json.dumps(s.samples[0])] for s in pack_all(p, items)]
    assert first_of_each == sorted(first_of_each)  # each sequence opens with the oldest item


def test_deterministic() -> None:
    a = pack_all(packer(), stream(6))
    b = pack_all(packer(), stream(6))
    assert a == b and a != pack_all(packer(), stream(7))


@pytest.mark.parametrize("cut", [0, 37, 150, 399])
def test_resume_from_json_state_gives_the_same_sequences(cut: int) -> None:
    items = stream(8)
    images_by_ref = {json.dumps(it.ref): it.images for it in items}
    uninterrupted = packer()
    whole = pack_all(uninterrupted, items)

    p = packer()
    got = []
    for item in items[:cut]:
        p.add(item)
        while p.ready():
            got.append(p.pop())
    state = json.loads(json.dumps(p.state_dict()))  # what a checkpoint holds: JSON, no pickles
    assert len(state["buffer"]) <= 16 and all("images" not in e for e in state["buffer"])

    q = packer()
    q.load_state_dict(state, images=lambda ref: images_by_ref[json.dumps(ref)])
    got += pack_all(q, items[cut:])
    assert got == whole
    assert q.stats == uninterrupted.stats


def test_resume_needs_images_and_the_same_config() -> None:
    p = packer()
    p.add(Item(tokens=[11] + [IMG] * N_IMG + [12], images=["x"], ref="a"))
    state = p.state_dict()
    with pytest.raises(ValueError, match="images="):
        packer().load_state_dict(state)
    with pytest.raises(ValueError, match="2 images re-read"):
        packer().load_state_dict(state, images=lambda ref: ["x", "y"])
    with pytest.raises(ValueError, match="saved with"):
        packer(max_images=4).load_state_dict(state, images=lambda ref: ["x"])


def test_bad_items_raise() -> None:
    p = packer()
    with pytest.raises(ValueError, match="seq_len"):
        p.add(Item(tokens=[11] * (SEQ + 1), ref="long"))
    with pytest.raises(ValueError, match="max_images"):
        p.add(Item(tokens=[IMG] * N_IMG * 6, images=list(range(6)), ref="many"))
    with pytest.raises(ValueError, match="2 images"):
        p.add(Item(tokens=[IMG] * N_IMG * 2 + [11], images=["one"], ref="mismatch"))
    with pytest.raises(ValueError, match="multiple of"):
        p.add(Item(tokens=[IMG] * (N_IMG + 1) + [11], images=["one"], ref="ragged"))
    p.add(Item(tokens=[SEQ] * SEQ, ref="exact"))  # exactly seq_len fits
    assert p.pop().n_pad == 0 and len(p) == 0 and p.stats["items"] == 1


def test_items_without_a_target_are_skipped() -> None:
    p = packer()
    for ref, tokens, images in [("empty", [], []), ("one", [11], []), ("image", [IMG] * N_IMG, ["i"])]:
        p.add(Item(tokens=tokens, images=images, ref=ref))
    p.flush()
    assert p.pop() is None and p.stats["skipped_items"] == 3
    p.add(Item(tokens=[IMG] * N_IMG + [11], images=["i"], ref="caption"))  # image then text: a target
    assert p.pop().labels[N_IMG - 1] == 11
