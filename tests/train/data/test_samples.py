"""Samples -> token pieces (train/data/samples.py) and image preprocessing (train/data/images.py).

The tokenizer is the demo's byte-level BPE trained here on a few help topics (small and real; its
merges are not a language model's, which the layouts and splitting do not care about). Images are
scikit-image's sample photos encoded as JPEG/PNG; members come from curate's own `encode_sample`.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from curate.contract import encode_sample
from tools.demo.docs import SPECIAL_TOKENS, prose, train_tokenizer
from train.data.images import BadImage, ImagePreprocessor
from train.data.samples import (
    BadSample, TextTokenizer, Tokenized, has_loss_target, split_parts, tokenize_sample,
)

N_IMG = 8
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = prose("assignment") + prose("types") + prose("calls")
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=512)


@pytest.fixture(scope="module")
def tok(tok_path: Path) -> TextTokenizer:
    return TextTokenizer.from_file(tok_path)


def _encode(array, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    img = Image.fromarray(array).convert("RGB")
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    return _encode(skdata.astronaut())


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return _encode(skdata.coffee(), "PNG", (60, 40))


def members_of(kind: str, row: dict) -> dict[str, bytes]:
    """The members curate writes for `row`, by extension ("jpg", "0.png"...), as train reads them."""
    key = "0000000000"
    return {name[len(key) + 1:]: data for name, data in encode_sample(kind, row, key)}


def pair_members(image: bytes, caption: str, fmt: str = "jpg", **extra) -> dict[str, bytes]:
    return members_of("pair", {"id": "p:0", "source": "p", "caption": caption, "image": image,
                               "image_format": fmt, **extra})


def doc_members(segments: list[dict], images: list[bytes], formats: list[str] | None = None) -> dict[str, bytes]:
    return members_of("doc", {"id": "d:0", "source": "d", "segments": json.dumps(segments), "images": images,
                              "image_formats": formats or ["jpg"] * len(images)})


def text_members(text: str) -> dict[str, bytes]:
    return members_of("text", {"id": "t:0", "source": "t", "text": text})


def run(tok: TextTokenizer) -> list[int]:
    return [tok.image_id] * N_IMG


def _tokenize(kind, members, tok, max_len=4096, **kw):
    kw.setdefault("rng", random.Random(0))
    return tokenize_sample(kind, members, tok, n_image_tokens=N_IMG, max_len=max_len, **kw)


# --- the tokenizer ---------------------------------------------------------------------------


def test_tokenizer_special_ids_from_file_or_folder(tok_path: Path, tok: TextTokenizer):
    assert [tok.eos_id, tok.image_id, tok.pad_id] == [0, 1, 2]  # SPECIAL_TOKENS' order in the vocab
    assert TextTokenizer.from_file(tok_path.parent).special_ids == tok.special_ids
    ids = tok.encode("An assignment statement evaluates the expression list.")
    assert ids and not set(ids) & {0, 1, 2}
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        TextTokenizer.from_file(tok_path.parent / "missing")


def test_missing_special_token_is_named(tok_path: Path):
    with pytest.raises(ValueError, match=r"no image token '<\|img\|>'"):
        TextTokenizer.from_file(tok_path, special={"image": "<|img|>"})
    custom = TextTokenizer.from_file(tok_path, special={"eos": SPECIAL_TOKENS[2]})
    assert custom.eos_id == 2


def test_literal_special_strings_in_text_stay_text(tok: TextTokenizer):
    """Web text quoting "<|image|>" must not fabricate an image run nor end the sample early."""
    ids = tok.encode("see <|image|> and <|endoftext|> here")
    assert tok.image_id not in ids and tok.eos_id not in ids
    # also in a copy sent to a DataLoader worker (a pickled Tokenizer drops the setting)
    assert pickle.loads(pickle.dumps(tok)).encode("see <|image|> and <|endoftext|> here") == ids


# --- layouts ----------------------------------------------------------------------------------


def test_pair_layout(tok: TextTokenizer, astronaut: bytes, coffee: bytes):
    (piece,) = _tokenize("pair", pair_members(astronaut, "An astronaut in a suit"), tok, ref=("pairs/0.tar", "k"))
    assert piece == Tokenized(run(tok) + tok.encode("An astronaut in a suit") + [tok.eos_id], [astronaut], "pair",
                              ("pairs/0.tar", "k"))
    (piece,) = _tokenize("pair", pair_members(coffee, "coffee", fmt="png"), tok)
    assert piece.images == [coffee] and piece.tokens[:N_IMG] == run(tok)


def test_doc_layout_joins_adjacent_texts_by_a_blank_line(tok: TextTokenizer, astronaut: bytes, coffee: bytes):
    segments = [{"type": "text", "text": "The first paragraph."}, {"type": "image", "image": 0, "url": "u"},
                {"type": "text", "text": "Second one."}, {"type": "text", "text": "Third one."},
                {"type": "image", "image": 1}, {"type": "text", "text": "   "}, {"type": "image", "image": 0}]
    (piece,) = _tokenize("doc", doc_members(segments, [astronaut, coffee], ["jpg", "png"]), tok)
    expected = (tok.encode("The first paragraph.") + run(tok) + tok.encode("Second one.\n\nThird one.")
                + run(tok) + run(tok) + [tok.eos_id])
    assert piece.tokens == expected
    assert piece.images == [astronaut, coffee, astronaut] and piece.kind == "doc"


def test_text_layout(tok: TextTokenizer):
    body = prose("types")[0]
    (piece,) = _tokenize("text", text_members(body), tok)
    assert piece == Tokenized(tok.encode(body) + [tok.eos_id], [], "text")


# --- caption choice ---------------------------------------------------------------------------


def _caption_counts(tok, members, ratio: float, n: int, seed: int = 1) -> Counter:
    rng = random.Random(seed)
    alt = tok.encode("alt text")
    counts: Counter = Counter()
    for _ in range(n):
        (piece,) = _tokenize("pair", members, tok, caption_ratio=ratio, rng=rng)
        counts["alt" if piece.tokens[N_IMG:-1] == alt else "synthetic"] += 1
    return counts


def test_caption_ratio(tok: TextTokenizer, astronaut: bytes):
    members = pair_members(astronaut, "alt text", synthetic_caption="a synthetic caption")
    assert _caption_counts(tok, members, 1.0, 50) == {"alt": 50}
    assert _caption_counts(tok, members, 0.0, 50) == {"synthetic": 50}
    half = _caption_counts(tok, members, 0.5, 2000)
    assert 850 <= half["alt"] <= 1150  # binomial(2000, 0.5): +-6.7 sigma
    assert _caption_counts(tok, members, 0.5, 200, seed=7) == _caption_counts(tok, members, 0.5, 200, seed=7)
    (piece,) = _tokenize("pair", members, tok, caption_ratio=0.0)
    assert piece.tokens[N_IMG:-1] == tok.encode("a synthetic caption")


def test_recaptioned_pairs_sample_alt_text_and_vecap_whatever_key_txt_holds(tok: TextTokenizer, astronaut: bytes):
    """Written by the recaption stage with KEY.txt = the VeCap caption: the alt-text comes from
    caption_alt (not KEY.txt), the synthetic side prefers caption_vecap over caption_synthetic."""
    members = pair_members(astronaut, "alt text", caption_alt="alt text", caption_synthetic="plain synthetic",
                           caption_vecap="fused vecap", txt_source="vecap")
    assert members["txt"] == b"fused vecap"
    assert _caption_counts(tok, members, 1.0, 20) == {"alt": 20}
    (piece,) = _tokenize("pair", members, tok, caption_ratio=0.0)
    assert piece.tokens[N_IMG:-1] == tok.encode("fused vecap")
    no_fusion = pair_members(astronaut, "alt text", caption_alt="alt text", caption_synthetic="plain synthetic",
                             caption_vecap=None, txt_source="synthetic")
    (piece,) = _tokenize("pair", no_fusion, tok, caption_ratio=0.0)
    assert piece.tokens[N_IMG:-1] == tok.encode("plain synthetic")


def test_synthetic_caption_list_and_fallbacks(tok: TextTokenizer, astronaut: bytes):
    listed = pair_members(astronaut, "alt text", extra=json.dumps({"synthetic_captions": ["", "second", "third"]}))
    (piece,) = _tokenize("pair", listed, tok, caption_ratio=0.0)
    assert piece.tokens[N_IMG:-1] == tok.encode("second")  # the first non-empty one
    no_synthetic = pair_members(astronaut, "alt text")
    assert _caption_counts(tok, no_synthetic, 0.0, 20) == {"alt": 20}
    no_alt = pair_members(astronaut, "", synthetic_caption="only synthetic")
    (piece,) = _tokenize("pair", no_alt, tok, caption_ratio=1.0)
    assert piece.tokens[N_IMG:-1] == tok.encode("only synthetic")


# --- splitting --------------------------------------------------------------------------------


def test_split_rule_on_parts():
    a, b = b"a", b"b"
    chunks = split_parts([[1, 2, 3], a, b, [4, 5]], image_id=9, n_image_tokens=4, max_len=6)
    assert chunks == [([1, 2, 3], []), ([9] * 4, [a]), ([9] * 4 + [4, 5], [b])]
    assert [has_loss_target(t, 9) for t, _ in chunks] == [True, False, True]
    assert split_parts([list(range(10, 20))], image_id=9, n_image_tokens=4, max_len=4) == [
        ([10, 11, 12, 13], []), ([14, 15, 16, 17], []), ([18, 19], [])]
    # max_images closes a chunk before the image over the cap even when tokens would fit
    assert split_parts([[1], a, b, [2]], image_id=9, n_image_tokens=2, max_len=100, max_images=1) == [
        ([1, 9, 9], [a]), ([9, 9, 2], [b])]
    assert not has_loss_target([5], 9) and has_loss_target([9, 9, 5], 9)


def _runs(tokens: list[int], image_id: int) -> list[int]:
    """Lengths of the maximal runs of image ids."""
    runs, n = [], 0
    for t in tokens + [None]:
        if t == image_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_long_doc_split_keeps_runs_whole(tok: TextTokenizer, astronaut: bytes, coffee: bytes):
    paragraphs = (prose("calls") + prose("types"))[:6]
    assert len(paragraphs) == 6
    segments, images = [], []
    for i, p in enumerate(paragraphs):
        segments.append({"type": "text", "text": p})
        segments.append({"type": "image", "image": i % 2})
    images = [astronaut, coffee]
    members = doc_members(segments, images, ["jpg", "png"])
    (whole,) = _tokenize("doc", members, tok, max_len=100_000)
    max_len = 50
    stats: Counter = Counter()
    pieces = _tokenize("doc", members, tok, max_len=max_len, stats=stats)
    assert len(pieces) > 5 and stats == {"chunks": len(pieces)}
    for i, piece in enumerate(pieces):
        assert len(piece.tokens) <= max_len
        assert all(r % N_IMG == 0 for r in _runs(piece.tokens, tok.image_id))
        assert piece.tokens.count(tok.image_id) == N_IMG * len(piece.images)
        assert (tok.eos_id in piece.tokens) == (i == len(pieces) - 1)  # no new eos in continuations
        if i + 1 < len(pieces):  # a chunk ends full, or before an image run that would not fit
            nxt = pieces[i + 1].tokens
            assert len(piece.tokens) == max_len or (nxt[0] == tok.image_id and len(piece.tokens) + N_IMG > max_len)
    # nothing was dropped here: the chunks concatenate back to the whole sample, images in order
    assert sum((p.tokens for p in pieces), []) == whole.tokens
    assert sum((p.images for p in pieces), []) == whole.images == [astronaut, coffee] * 3


def test_image_only_chunk_is_dropped(tok: TextTokenizer, astronaut: bytes, coffee: bytes):
    head = tok.encode("The")
    assert len(head) + N_IMG <= 12
    segments = [{"type": "text", "text": "The"}, {"type": "image", "image": 0}, {"type": "image", "image": 1},
                {"type": "image", "image": 0}, {"type": "text", "text": "End of the story."}]
    stats: Counter = Counter()
    pieces = _tokenize("doc", doc_members(segments, [astronaut, coffee]), tok, max_len=12, stats=stats)
    # chunks: The+run(a) | run(b) alone: dropped | run(a)+text... ; its image goes with it
    assert stats["chunks_no_loss"] == 1
    assert [p.images for p in pieces][:2] == [[astronaut], [astronaut]]
    assert pieces[0].tokens == head + run(tok)
    assert all(has_loss_target(p.tokens, tok.image_id) for p in pieces)
    # the same cut by the image cap: at most one image per piece
    stats = Counter()
    pieces = _tokenize("doc", doc_members(segments, [astronaut, coffee]), tok, max_images=1, stats=stats)
    assert [len(p.images) for p in pieces] == [1, 1] and stats["chunks_no_loss"] == 1


# --- malformed samples ------------------------------------------------------------------------


def test_bad_samples(tok: TextTokenizer, astronaut: bytes):
    text = {"type": "text", "text": "Some words."}
    cases = [
        ("doc", {"json": b"{not json", "0.jpg": astronaut}, "bad_json"),
        ("doc", {"json": b"[1, 2]"}, "bad_json"),
        ("doc", {"0.jpg": astronaut}, "missing_member"),
        ("doc", doc_members([text, {"type": "image", "image": 1}], [astronaut]), "missing_member"),
        ("doc", doc_members([text, {"type": "video"}], []), "bad_segment"),
        ("doc", doc_members([text, {"type": "image", "image": "0"}], [astronaut]), "bad_segment"),
        ("doc", {"json": b'{"segments": "x"}'}, "bad_segment"),
        ("doc", doc_members([{"type": "image", "image": 0}], [astronaut]), "no_text"),
        ("pair", {"txt": b"a caption", "json": b"{}"}, "missing_member"),
        ("pair", {"jpg": astronaut, "txt": b"\xff\xfe caption"}, "bad_text"),
        ("pair", {"jpg": astronaut, "txt": b"ok", "json": b"\x00"}, "bad_json"),
        ("pair", pair_members(astronaut, "  "), "no_text"),
        ("text", {"json": b"{}"}, "missing_member"),
        ("text", text_members(""), "no_text"),
        ("text", {"txt": b"caf\xe9"}, "bad_text"),
    ]
    for kind, members, reason in cases:
        with pytest.raises(BadSample) as info:
            _tokenize(kind, members, tok)
        assert info.value.reason == reason, (kind, members.keys(), info.value)
        assert isinstance(info.value, ValueError)


def test_bad_arguments(tok: TextTokenizer):
    members = text_members("words")
    with pytest.raises(ValueError, match="n_image_tokens"):
        _tokenize("text", members, tok, max_len=N_IMG - 1)
    with pytest.raises(ValueError, match="caption_ratio"):
        _tokenize("text", members, tok, caption_ratio=1.5)
    with pytest.raises(ValueError, match="unknown kind"):
        _tokenize("video", members, tok)


# --- images -----------------------------------------------------------------------------------


def test_preprocess_shape_and_normalisation():
    solid = _encode(np.full((30, 50, 3), (255, 0, 128), dtype=np.uint8), "PNG")
    pre = ImagePreprocessor(16, CLIP_MEAN, CLIP_STD, resize_mode="shortest_crop")
    x = pre(solid)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (torch.tensor([255, 0, 128]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 16, 16))


@pytest.mark.parametrize("mode,open_clip_mode", [("squash", "squash"), ("shortest_crop", "shortest")])
def test_preprocess_equals_open_clip(mode: str, open_clip_mode: str, coffee: bytes):
    import open_clip

    data = _encode(skdata.coffee(), "JPEG", (120, 80))
    for blob in (data, coffee):
        ours = ImagePreprocessor(56, CLIP_MEAN, CLIP_STD, resize_mode=mode)(blob)
        theirs = open_clip.image_transform(56, is_train=False, mean=CLIP_MEAN, std=CLIP_STD,
                                           resize_mode=open_clip_mode, interpolation="bicubic")(
            Image.open(io.BytesIO(blob)))
        torch.testing.assert_close(ours, theirs)


def test_from_open_clip_configs():
    dfn = ImagePreprocessor.from_open_clip("ViT-H-14-378-quickgelu", "dfn5b")
    assert (dfn.image_size, dfn.resize_mode, dfn.interpolation) == (378, "squash", "bicubic")
    torch.testing.assert_close(dfn.mean.flatten(), torch.tensor(CLIP_MEAN))
    torch.testing.assert_close(dfn.std.flatten(), torch.tensor(CLIP_STD))
    plain = ImagePreprocessor.from_open_clip("ViT-H-14-378-quickgelu")
    assert (plain.image_size, plain.resize_mode) == (378, "shortest_crop")
    with pytest.raises(ValueError, match="bundled"):
        ImagePreprocessor.from_open_clip("no-such-model")
    with pytest.raises(ValueError, match="no pretrained tag"):
        ImagePreprocessor.from_open_clip("ViT-H-14-378-quickgelu", "no-such-tag")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is a few bytes: a bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_cap_and_undecodable_bytes(astronaut: bytes):
    pre = ImagePreprocessor(32, CLIP_MEAN, CLIP_STD)
    with pytest.raises(BadImage, match="too many pixels: 9000x8000"):
        pre(_png_header(9_000, 8_000))  # rejected on the header: nothing decoded
    with pytest.raises(BadImage, match="too many pixels"):
        pre(_png_header(20_000, 20_000))  # Pillow's own bomb check fires first
    with pytest.raises(BadImage, match="max_pixels 1000"):
        ImagePreprocessor(32, CLIP_MEAN, CLIP_STD, max_pixels=1000)(astronaut)
    assert pre(astronaut).shape == (3, 32, 32)
    with pytest.raises(BadImage, match="cannot decode"):
        pre(b"not an image at all")
    with pytest.raises(BadImage, match="cannot decode"):
        pre(astronaut[: len(astronaut) // 3])  # truncated
    with pytest.raises(BadImage, match="cannot decode"):
        pre(_encode(skdata.astronaut(), "GIF"))  # not a shard format


def test_exif_orientation_is_applied():
    img = Image.fromarray(skdata.astronaut()).resize((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert ImagePreprocessor(8, CLIP_MEAN, CLIP_STD).decode(buf.getvalue()).size == (20, 40)


def test_bad_preprocessor_arguments():
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocessor(8, CLIP_MEAN, CLIP_STD, resize_mode="longest")
    with pytest.raises(ValueError, match="std"):
        ImagePreprocessor(8, CLIP_MEAN, (1.0, 0.0, 1.0))
