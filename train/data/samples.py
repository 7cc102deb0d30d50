"""One curated sample (its tar members) -> token sequences with image placeholders.

The packer works on `Tokenized` pieces: token ids in which every image is a run of
`n_image_tokens` consecutive `image` ids (MM1: 144, what the C-Abstractor yields per image), and the
image bytes in the order of their runs, so the model can splice the i-th image's features into the
i-th run. Layouts, per kind (members as `curate.contract.encode_sample` writes them):

- pair: [image run] caption [eos]. The caption is the alt-text with probability `caption_ratio`,
  else the synthetic caption. Alt-text: `caption_alt` of `KEY.json` where the recaptioning stage
  wrote it (KEY.txt may then hold another caption), else `KEY.txt`. Synthetic: the first
  non-empty of `KEY.json`'s `caption_vecap` (VeCap's fusion), `caption_synthetic` (the
  captioner's), `synthetic_caption`, or the first of a list `synthetic_captions`; one draw from `rng` per pair whether or not a synthetic caption
  exists, so the stream of draws does not depend on the metadata. An empty chosen caption falls
  back to the other one; a pair with no caption at all is a `BadSample` (image -> eos teaches
  nothing).
- doc: the segments of `KEY.json` in order. Consecutive text segments are joined by a blank line
  ("\\n\\n") and tokenized as one string, as curate's sidecar `token_count` counts them; an image
  segment becomes an image run, which separates the texts around it without any added text.
  [eos] at the end.
- text: `KEY.txt` [eos].

Text is untrusted: a web page may contain the literal string "<|image|>" or "<|endoftext|>". The
tokenizer encodes such strings as ordinary text (`encode_special_tokens`), so an image id in the
output always stands for an image and an eos always ends a sample.

Splitting (`max_len`): a sample longer than `max_len` is cut into chunks of at most `max_len`
tokens, greedily, at text token boundaries only. A chunk ends before an image run that would not fit
in it (or that would exceed `max_images`), so a run is never cut and each chunk carries exactly the
images of its runs. Chunks after the first continue the document (no new eos; the eos stays at the
very end). A chunk is kept only if it has a loss target under next-token prediction, i.e. a text
token that is not the chunk's first token; a chunk of image runs alone (or a lone trailing token) is
dropped with its images and counted in `stats["chunks_no_loss"]`. Only a long unbroken run of images (more
than fit one chunk, by tokens or by `max_images`) or an eos left alone by a cut gets there.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tokenizers import Tokenizer

from curate.contract import IMAGE_EXTENSIONS, KINDS

TOKENIZER_FILE = "tokenizer.json"
# The special tokens the data path needs, by role -> their default strings (the demo tokenizer's).
DEFAULT_SPECIAL: dict[str, str] = {"eos": "<|endoftext|>", "image": "<|image|>", "pad": "<|pad|>"}


class BadSample(ValueError):
    """A sample that cannot be turned into tokens; the caller counts it by `reason` and skips it.

    `reason` is a short stable code (`bad_json`, `bad_text`, `missing_member`, `bad_segment`,
    `no_text`, `bad_image`, `image_too_large`), the message carries the specifics, like curate's drop reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # what shards hold; Pillow's other plugins are never reached


def check_image(data: bytes, max_pixels: int) -> None:
    """Raise `BadSample` unless `data` decodes as a JPEG, PNG or WebP of at most `max_pixels`.

    The size is checked on the header before any pixel is decoded (a decompression bomb costs
    nothing); then the whole image is decoded, a JPEG at 1/8 scale (Pillow's draft mode: every
    entropy-coded byte is still read, so a truncated or damaged stream fails, for about a tenth of
    the cost of a full decode). Run in the loader's workers when a sample is read, so a bad image
    is skipped before it is packed instead of failing a batch in `collate`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            with img:
                w, h = img.size
                if w < 1 or h < 1:
                    raise BadSample("bad_image", f"empty image {w}x{h}")
                if w * h > max_pixels:
                    raise BadSample("image_too_large", f"{w}x{h} > max_pixels {max_pixels}")
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                img.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("image_too_large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes
        raise BadSample("bad_image", f"cannot decode: {exc}") from None


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special ids the data path needs, by role.

    `special` maps a role (`eos`, `image`, `pad`, any others a caller wants) to the token string
    in this tokenizer's vocabulary; each must exist, else ValueError naming it."""

    def __init__(self, tokenizer: Any, special: Mapping[str, str] | None = None):
        self._tok = tokenizer
        # Literal special strings in untrusted text stay text (see the module docstring).
        self._tok.encode_special_tokens = True
        self.special_ids: dict[str, int] = {}
        for role, token in {**DEFAULT_SPECIAL, **(special or {})}.items():
            idx = tokenizer.token_to_id(token)
            if idx is None:
                raise ValueError(f"tokenizer has no {role} token {token!r}; add it to its vocabulary "
                                 f"or name the one it has (special={{'{role}': ...}})")
            self.special_ids[role] = idx
        self._specials = frozenset(self.special_ids.values())

    @classmethod
    def from_file(cls, path: str | Path, special: Mapping[str, str] | None = None) -> TextTokenizer:
        """From a local `tokenizer.json`, or a folder holding one (a Hugging Face model folder).
        Nothing is fetched: training reads only local files."""
        p = Path(path).expanduser()
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} there (a tokenizers file, or a folder holding one)")
        return cls(Tokenizer.from_file(str(file)), special)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a pickled `tokenizers.Tokenizer` (DataLoader workers under spawn) forgets the flag
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def image_id(self) -> int:
        return self.special_ids["image"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (no BOS/EOS from a post-processor)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self._specials.intersection(ids):  # only a tokenizers without encode_special_tokens
            raise BadSample("bad_text", "text encodes to a special token id")
        return ids


@dataclass
class Tokenized:
    """A piece of one sample, ready to pack: `tokens` hold one run of `n_image_tokens` image ids
    per entry of `images` (encoded bytes, in run order); `ref` is the caller's (e.g. shard, key)."""

    tokens: list[int]
    images: list[bytes]
    kind: str
    ref: Any = None


def _json(members: Mapping[str, bytes], required: bool) -> dict[str, Any]:
    data = members.get("json")
    if data is None:
        if required:
            raise BadSample("missing_member", "no json member")
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadSample("bad_json", f"json member: {exc}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"json member is a {type(meta).__name__}, not an object")
    return meta


def _text(members: Mapping[str, bytes], name: str) -> str:
    data = members.get(name)
    if data is None:
        raise BadSample("missing_member", f"no {name} member")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSample("bad_text", f"{name} member is not UTF-8: {exc}") from None


def _image_member(members: Mapping[str, bytes], stem: str) -> bytes:
    """`STEM.jpg|png|webp` (stem "" for a pair's single image)."""
    for ext in IMAGE_EXTENSIONS:
        name = f"{stem}.{ext}" if stem else ext
        if name in members:
            return bytes(members[name])
    raise BadSample("missing_member", f"no image member {stem + '.' if stem else ''}{{{','.join(IMAGE_EXTENSIONS)}}}")


def _synthetic_caption(meta: dict[str, Any]) -> str:
    for name in ("caption_vecap", "caption_synthetic", "synthetic_caption"):
        caption = meta.get(name)
        if isinstance(caption, str) and caption.strip():
            return caption
    captions = meta.get("synthetic_captions")
    if isinstance(captions, list):
        for c in captions:
            if isinstance(c, str) and c.strip():
                return c
    return ""


# A sample before splitting: text (token ids) and images (bytes) in order.
Part = list[int] | bytes


def _pair_parts(members: Mapping[str, bytes], tok: TextTokenizer, caption_ratio: float,
                rng: random.Random) -> list[Part]:
    image = _image_member(members, "")
    meta = _json(members, required=False)
    alt = meta.get("caption_alt") if isinstance(meta.get("caption_alt"), str) else None
    if alt is None:
        alt = _text(members, "txt") if "txt" in members else ""
    synthetic = _synthetic_caption(meta)
    use_alt = rng.random() < caption_ratio
    first, second = (alt, synthetic) if use_alt else (synthetic, alt)
    caption = first if first.strip() else second
    if not caption.strip():
        raise BadSample("no_text", "pair without alt-text or synthetic caption")
    return [image, tok.encode(caption) + [tok.eos_id]]


def _doc_parts(members: Mapping[str, bytes], tok: TextTokenizer) -> list[Part]:
    segments = _json(members, required=True).get("segments")
    if not isinstance(segments, list):
        raise BadSample("bad_segment", "json member has no segments list")
    parts: list[Part] = []
    texts: list[str] = []  # consecutive text segments, joined by a blank line

    def flush() -> None:
        if texts:
            parts.append(tok.encode("\n\n".join(texts)))
            texts.clear()

    for i, seg in enumerate(segments):
        kind = seg.get("type") if isinstance(seg, dict) else None
        if kind == "text":
            text = seg.get("text")
            if not isinstance(text, str):
                raise BadSample("bad_segment", f"segment {i}: text is not a string")
            if text.strip():
                texts.append(text)
        elif kind == "image":
            index = seg.get("image")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise BadSample("bad_segment", f"segment {i}: image index {index!r}")
            flush()
            parts.append(_image_member(members, str(index)))
        else:
            raise BadSample("bad_segment", f"segment {i}: type {kind!r}")
    flush()
    if not any(isinstance(p, list) and p for p in parts):
        raise BadSample("no_text", "doc without text")
    parts.append([tok.eos_id])
    return parts


def _text_parts(members: Mapping[str, bytes], tok: TextTokenizer) -> list[Part]:
    text = _text(members, "txt")
    if not text.strip():
        raise BadSample("no_text", "empty text")
    return [tok.encode(text) + [tok.eos_id]]


def split_parts(parts: list[Part], *, image_id: int, n_image_tokens: int, max_len: int,
                max_images: int | None = None) -> list[tuple[list[int], list[bytes]]]:
    """Greedy chunks of at most `max_len` tokens (and `max_images` images), cut between text
    tokens or before an image run, never inside one. Returns every chunk, kept or not."""
    chunks: list[tuple[list[int], list[bytes]]] = []
    tokens: list[int] = []
    images: list[bytes] = []
    for part in parts:
        if isinstance(part, bytes):
            full = max_images is not None and len(images) >= max_images
            if tokens and (len(tokens) + n_image_tokens > max_len or full):
                chunks.append((tokens, images))
                tokens, images = [], []
            tokens.extend([image_id] * n_image_tokens)
            images.append(part)
            continue
        i = 0
        while i < len(part):
            room = max_len - len(tokens)
            if room == 0:
                chunks.append((tokens, images))
                tokens, images = [], []
                room = max_len
            tokens.extend(part[i:i + room])
            i += room
    if tokens:
        chunks.append((tokens, images))
    return chunks


def has_loss_target(tokens: list[int], image_id: int) -> bool:
    """Whether next-token prediction inside `tokens` has a text target: a text token that is
    not the first one (the first has nothing before it to predict it from)."""
    return any(t != image_id for t in tokens[1:])


def tokenize_sample(kind: str, members: Mapping[str, bytes], tok: TextTokenizer, *, n_image_tokens: int,
                    max_len: int, caption_ratio: float = 1.0, rng: random.Random,
                    max_images: int | None = None, ref: Any = None,
                    stats: Counter[str] | None = None) -> list[Tokenized]:
    """The packable pieces of one sample (members by extension: "jpg", "txt", "json", "0.jpg"...).

    One piece unless the sample is longer than `max_len` tokens or holds more than `max_images`
    images (see the module docstring for layouts and the split rule). Pieces without a loss target
    are dropped and counted in `stats["chunks_no_loss"]`; `stats["chunks"]` counts the pieces
    returned. Malformed input raises `BadSample` (the caller counts it and skips the sample)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if not 1 <= n_image_tokens <= max_len:
        raise ValueError(f"n_image_tokens {n_image_tokens} must be in 1..max_len ({max_len})")
    if not 0.0 <= caption_ratio <= 1.0:
        raise ValueError(f"caption_ratio {caption_ratio} outside [0, 1]")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images {max_images} < 1")
    if kind == "pair":
        parts = _pair_parts(members, tok, caption_ratio, rng)
    elif kind == "doc":
        parts = _doc_parts(members, tok)
    else:
        parts = _text_parts(members, tok)
    out = []
    for tokens, images in split_parts(parts, image_id=tok.image_id, n_image_tokens=n_image_tokens,
                                      max_len=max_len, max_images=max_images):
        if has_loss_target(tokens, tok.image_id):
            out.append(Tokenized(tokens, images, kind, ref))
        elif stats is not None:
            stats["chunks_no_loss"] += 1
    if stats is not None:
        stats["chunks"] += len(out)
    return out
