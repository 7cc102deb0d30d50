"""Packing efficiency (non-padding tokens / all tokens) per kind, on the demo mixture's lengths.

Sample lengths come from a curated output's sidecars (`token_count`, `n_images`; characters / 4
where an output has no token counts), as the loader will tokenize them: a pair is its image's
placeholders, its caption and an end token (n_image_tokens + token_count + 1), a document its
text, its images' placeholders and an end token (token_count + n_image_tokens * n_images + 1), a
text its tokens and an end token. A sample
longer than a sequence, or with more images than a sequence may hold, is cut into windows as the
tokenizer cuts it (images kept whole, spread evenly through the text). The demo is tiny, so
`--samples` lengths per kind are drawn from it with replacement (seeded).

Each kind is packed alone (a sequence holds one kind), at `--seq-len` and `--max-images`:

- ours: `train.data.packing.Packer` (streaming best fit, oldest first, `--buffers` items);
- one per sequence: every sample padded to the sequence length;
- bound: no packing can use fewer than max(ceil(T / seq_len), ceil(I / max_images)) sequences for
  T tokens and I images, so efficiency <= T / (seq_len * that). For pairs (one image each) it is
  the 16-image cap: at most 16 pairs per sequence.

The mixture line weighs the kinds' efficiencies by their share of sequences (45/45/10 in MM1).

    python -m tools.bench.packing [--out CURATED] [--samples 4000] [--seq-len 4096]
                                  [--max-images 16] [--buffers 32] [--seed 0]

`--realistic` packs the MM1 mixture across kinds instead, from fixed, stated length
distributions rather than the demo's few samples, through the loader's own `Mixer` (weights
45/45/10 as shares of tokens) in both packing modes, `mixed` and `per_kind`:

- pairs: an image (`--image-tokens`), a caption and an end token; the caption is the alt-text
  (lognormal, median 15 tokens, sigma 0.8) with probability `caption_ratio` 0.5, else a VeCap
  synthetic caption (lognormal, median 70, sigma 0.35);
- interleaved documents: images as OBELICS reports them (a mean of about 2.5 a document, at
  least 1 and at most 30: geometric with p 0.4, redrawn above 30), text lognormal with median
  640 and sigma 0.7 (mean about 820 tokens), cut into windows like the tokenizer cuts them;
- text documents: lognormal, median 1,000 tokens, sigma 1.0 (mean about 1,650; a long tail cut
  into 4,096-token windows).

Reported per mode: padding (pad tokens / all tokens), the delivered mixture (shares of non-pad
tokens), the largest deviation of a source's share from its weight over any window of 1,000
consecutive sequences, and the bound: the fewest sequences any packing of the same tokens and
images needs (max(tokens / seq_len, images / max_images) rounded up; per kind for `per_kind`).

    python -m tools.bench.packing --realistic [--sequences 5000] [--buffers 32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from curate.contract import read_sidecars
from curate.engine.driver import run_recipe
from curate.recipe import load_recipe
from tools.demo.run import DEMO_RECIPE, demo_inputs, demo_overrides
from train.data.mixture import MM1_WEIGHTS as MIXER_WEIGHTS, Mixer
from train.data.packing import Item, Packer

KINDS = ("pair", "doc", "text")
MM1_WEIGHTS = {"pair": 0.45, "doc": 0.45, "text": 0.10}
IMAGE_TOKEN, TEXT_TOKEN, PAD = 1, 2, 0  # synthetic ids: only lengths and image counts matter here


def windows(text: int, images: int, seq_len: int, max_images: int, n_image_tokens: int) -> list[tuple[int, int]]:
    """(tokens, images) of the pieces a sample with `text` text tokens and `images` images is cut
    into: a token stream text, image, text, ..., image, text (images evenly spread) cut greedily
    at `seq_len` tokens or `max_images` images, never inside an image."""
    gaps = [text // (images + 1) + (1 if g < text % (images + 1) else 0) for g in range(images + 1)]
    pieces: list[tuple[int, int]] = []
    length = n_img = 0
    for g, gap in enumerate(gaps):
        while gap:
            take = min(gap, seq_len - length)
            length, gap = length + take, gap - take
            if length == seq_len:
                pieces.append((length, n_img))
                length = n_img = 0
        if g < images:
            if length + n_image_tokens > seq_len or n_img == max_images:
                pieces.append((length, n_img))
                length = n_img = 0
            length, n_img = length + n_image_tokens, n_img + 1
    if length:
        pieces.append((length, n_img))
    return pieces


CHARS_COLUMN = {"pair": "caption_chars", "doc": "text_chars", "text": "text_chars"}
CHARS_PER_TOKEN = 4  # for outputs curated without a tokenizer (no token counts): a rough English rate


def sample_units(out: str | Path, seq_len: int, max_images: int,
                 n_image_tokens: int) -> dict[str, list[tuple[int, int]]]:
    """Per kind, the (tokens, images) of every packable unit of the output's samples, in order.
    A sample without a token count (no tokenizer in the recipe) is estimated from its characters."""
    units: dict[str, list[tuple[int, int]]] = {}
    for kind in KINDS:
        table = read_sidecars(out, kind, columns=["token_count", "n_images", CHARS_COLUMN[kind]])
        rows = zip(*(table.column(c).to_pylist() for c in ("token_count", "n_images", CHARS_COLUMN[kind])))
        units[kind] = []
        for count, images, chars in rows:
            text = count if count is not None else -(-int(chars or 0) // CHARS_PER_TOKEN)
            units[kind] += windows(int(text) + 1, int(images or 0), seq_len, max_images, n_image_tokens)
    return units


def items(units: list[tuple[int, int]], n_image_tokens: int) -> list[Item]:
    """Synthetic items of the given lengths: image runs first, then text (placement does not
    change how they pack)."""
    return [Item(tokens=[IMAGE_TOKEN] * (k * n_image_tokens) + [TEXT_TOKEN] * (n - k * n_image_tokens),
                 images=[None] * k, ref=i) for i, (n, k) in enumerate(units)]


def pack(stream: list[Item], seq_len: int, max_images: int, n_image_tokens: int, buffer: int) -> dict[str, Any]:
    packer = Packer(seq_len, image_token_id=IMAGE_TOKEN, pad_id=PAD, n_image_tokens=n_image_tokens,
                    max_images=max_images, buffer_size=buffer)
    n_samples = n_images = 0
    start = time.perf_counter()
    for item in stream:
        packer.add(item)
        while packer.ready():
            seq = packer.pop()
            n_samples, n_images = n_samples + len(seq.samples), n_images + len(seq.images)
    packer.flush()
    while (seq := packer.pop()) is not None:
        n_samples, n_images = n_samples + len(seq.samples), n_images + len(seq.images)
    seconds = time.perf_counter() - start
    n = max(packer.stats["sequences"], 1)
    return {"efficiency": packer.efficiency, "sequences": n, "samples_per_seq": n_samples / n,
            "images_per_seq": n_images / n, "skipped": packer.stats["skipped_items"], "seconds": seconds}


def one_per_sequence(units: list[tuple[int, int]], seq_len: int) -> float:
    return sum(n for n, _ in units) / (seq_len * len(units))


def bound(units: list[tuple[int, int]], seq_len: int, max_images: int) -> float:
    """The most any packing can reach: fewer sequences cannot hold the tokens or the images."""
    tokens, images = sum(n for n, _ in units), sum(k for _, k in units)
    least = max(math.ceil(tokens / seq_len), math.ceil(images / max_images) if max_images else 0, 1)
    return tokens / (seq_len * least)


def build_demo(root: Path) -> Path:
    """Curate the demo inputs under `root`; the output folder."""
    with demo_inputs(root):
        recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
        run_recipe(recipe, progress=False)
    return Path(recipe.output.path)


def run(out: str | Path, samples: int = 4000, seq_len: int = 4096, max_images: int = 16,
        n_image_tokens: int = 144, buffers: tuple[int, ...] = (64,), seed: int = 0) -> dict[str, Any]:
    """Per kind: `samples` units drawn with replacement from the output's, packed by each side."""
    pools = sample_units(out, seq_len, max_images, n_image_tokens)
    rng = random.Random(seed)
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        if not pools[kind]:
            continue
        units = [rng.choice(pools[kind]) for _ in range(samples)]
        stream = items(units, n_image_tokens)
        kinds[kind] = {
            "distinct": len(pools[kind]),
            "mean_length": sum(n for n, _ in units) / len(units),
            "mean_images": sum(k for _, k in units) / len(units),
            "ours": {b: pack(stream, seq_len, max_images, n_image_tokens, b) for b in buffers},
            "one_per_sequence": one_per_sequence(units, seq_len),
            "bound": bound(units, seq_len, max_images),
        }
    shares = {k: MM1_WEIGHTS[k] for k in kinds}
    total = sum(shares.values())
    mixture = {b: sum(shares[k] / total * kinds[k]["ours"][b]["efficiency"] for k in kinds) for b in buffers}
    return {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.python_implementation()} "
                   f"{platform.python_version()}",
        "samples": samples, "seq_len": seq_len, "max_images": max_images, "n_image_tokens": n_image_tokens,
        "buffers": list(buffers), "seed": seed, "kinds": kinds, "mixture": mixture,
        "mixture_one_per_sequence": sum(shares[k] / total * kinds[k]["one_per_sequence"] for k in kinds),
        "mixture_bound": sum(shares[k] / total * kinds[k]["bound"] for k in kinds),
    }


# --realistic: the MM1 mixture across kinds -------------------------------------------------------

REALISTIC = {
    "pair": "image + caption + end; caption: alt-text lognormal(median 15, sigma 0.8) with probability "
            "caption_ratio, else VeCap lognormal(median 70, sigma 0.35)",
    "doc": "images geometric(p 0.4) on 1..30 (mean ~2.5, OBELICS), text lognormal(median 640, sigma 0.7; "
           "mean ~820), + end",
    "text": "lognormal(median 1000, sigma 1.0; mean ~1650) + end",
}
WINDOW = 1000  # sequences: the delivered mixture is checked over every window of this many


def _lognormal(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(median), sigma)))


def realistic_sample(kind: str, rng: random.Random, caption_ratio: float = 0.5) -> tuple[int, int]:
    """(text tokens with the end token, images) of one sample drawn from the stated distributions."""
    if kind == "pair":
        alt = rng.random() < caption_ratio
        return (_lognormal(rng, 15, 0.8) if alt else _lognormal(rng, 70, 0.35)) + 1, 1
    if kind == "doc":
        images = 31
        while images > 30:
            images = 1
            while rng.random() >= 0.4:
                images += 1
        return _lognormal(rng, 640, 0.7) + 1, images
    return _lognormal(rng, 1000, 1.0) + 1, 0


class _Synthetic:
    """A source's endless stream of chunks (`Item`s with a positional ref), for the Mixer."""

    def __init__(self, kind: str, seed: int, seq_len: int, max_images: int, n_image_tokens: int,
                 caption_ratio: float):
        self.kind, self.rng = kind, random.Random(f"{seed}:{kind}")
        self.args = (seq_len, max_images, n_image_tokens)
        self.caption_ratio, self.pending, self.n = caption_ratio, [], 0

    def __call__(self) -> Item:
        if not self.pending:
            text, images = realistic_sample(self.kind, self.rng, self.caption_ratio)
            self.pending = windows(text, images, *self.args)
        n, k = self.pending.pop(0)
        self.n += 1
        return Item(tokens=[IMAGE_TOKEN] * (k * self.args[2]) + [TEXT_TOKEN] * (n - k * self.args[2]),
                    images=[None] * k, ref=[self.n])


def mix(packing: str, sequences: int, *, seq_len: int = 4096, max_images: int = 16, n_image_tokens: int = 144,
        buffer: int = 64, caption_ratio: float = 0.5, weights: dict[str, float] | None = None,
        seed: int = 0) -> dict[str, Any]:
    """`sequences` sequences of the realistic MM1 mixture through `train.data.mixture.Mixer`."""
    weights = dict(weights or MIXER_WEIGHTS)
    streams = {k: _Synthetic(k, seed, seq_len, max_images, n_image_tokens, caption_ratio) for k in weights}

    def make_packer() -> Packer:
        return Packer(seq_len, image_token_id=IMAGE_TOKEN, pad_id=PAD, n_image_tokens=n_image_tokens,
                      max_images=max_images, buffer_size=buffer)

    mixer = Mixer(weights, packing, make_packer, lambda name: streams[name]())
    names = list(mixer.weights)
    rows: list[list[int]] = []  # per sequence: tokens of each source
    pad = images = 0
    per_source = {n: [0, 0] for n in names}  # tokens, images
    start = time.perf_counter()
    for _ in range(sequences):
        seq = next(mixer)
        row = dict.fromkeys(names, 0)
        for name, (n, k) in zip(seq.sources, seq.sizes):
            row[name] += n
            per_source[name][0] += n
            per_source[name][1] += k
        rows.append([row[n] for n in names])
        pad += seq.n_pad
        images += len(seq.images)
    seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in per_source.values())
    if packing == "mixed":
        least = max(math.ceil(tokens / seq_len), math.ceil(images / max_images))
    else:  # each kind packed apart: the fewest sequences of each, added
        least = sum(max(math.ceil(t / seq_len), math.ceil(k / max_images)) for t, k in per_source.values())
    total = dict(zip(names, (sum(col) for col in zip(*rows))))
    share_sum = sum(total.values())
    return {
        "sequences": sequences, "seconds": seconds, "sequences_per_s": sequences / seconds,
        "padding": pad / (sequences * seq_len),
        "bound_padding": 1 - tokens / (least * seq_len),
        "mixture": {n: total[n] / share_sum for n in names},
        "max_window_deviation": window_deviation(rows, [mixer.weights[n] / sum(mixer.weights.values()) for n in names]),
        "images_per_seq": images / sequences,
        "samples_per_seq": sum(s.n for s in streams.values()) / sequences,
    }


def window_deviation(rows: list[list[int]], weights: list[float], window: int = WINDOW) -> float:
    """The largest |share - weight| of any source over any `window` consecutive rows (rows: tokens
    of each source per sequence); over all rows when there are fewer."""
    window = min(window, len(rows))
    worst = 0.0
    sums = [sum(r[i] for r in rows[:window]) for i in range(len(weights))]
    for end in range(window, len(rows) + 1):
        if end > window:
            for i in range(len(weights)):
                sums[i] += rows[end - 1][i] - rows[end - 1 - window][i]
        total = sum(sums)
        worst = max(worst, max(abs(s / total - w) for s, w in zip(sums, weights)))
    return worst


def realistic(sequences: int = 5000, seq_len: int = 4096, max_images: int = 16, n_image_tokens: int = 144,
              buffer: int = 64, caption_ratio: float = 0.5, seed: int = 0) -> dict[str, Any]:
    modes = {m: mix(m, sequences, seq_len=seq_len, max_images=max_images, n_image_tokens=n_image_tokens,
                    buffer=buffer, caption_ratio=caption_ratio, seed=seed) for m in ("mixed", "per_kind")}
    return {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.python_implementation()} "
                   f"{platform.python_version()}",
        "seq_len": seq_len, "max_images": max_images, "n_image_tokens": n_image_tokens, "buffer": buffer,
        "caption_ratio": caption_ratio, "seed": seed, "weights": {"pair": 0.45, "doc": 0.45, "text": 0.10},
        "distributions": REALISTIC, **modes, "bound_padding": modes["mixed"]["bound_padding"],
    }


def print_realistic(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']}")
    print(f"seq_len {r['seq_len']}, {r['n_image_tokens']} tokens an image, at most {r['max_images']} images, "
          f"buffer {r['buffer']}, caption_ratio {r['caption_ratio']}, weights {r['weights']} (shares of tokens)")
    for kind, what in r["distributions"].items():
        print(f"  {kind}: {what}")
    print("mode | padding | bound | pair | doc | text | worst 1000-seq window | images/seq | sequences/s")
    for mode in ("mixed", "per_kind"):
        x = r[mode]
        print(f"{mode} | {x['padding']:.2%} | {x['bound_padding']:.2%} | "
              + " | ".join(f"{x['mixture'][k]:.2%}" for k in ("pair", "doc", "text"))
              + f" | {x['max_window_deviation'] * 100:.2f} pt | {x['images_per_seq']:.2f} | {x['sequences_per_s']:.0f}")


def print_table(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']}")
    print(f"{r['samples']} samples per kind, seq_len {r['seq_len']}, at most {r['max_images']} images per "
          f"sequence, {r['n_image_tokens']} tokens per image, seed {r['seed']}")
    ours = [f"ours (buffer {b})" for b in r["buffers"]]
    header = ["kind", "distinct", "mean tokens", "mean images", *ours, "one per sequence", "bound"]
    print(" | ".join(header))
    for kind, x in r["kinds"].items():
        cells = [kind, str(x["distinct"]), f"{x['mean_length']:.1f}", f"{x['mean_images']:.2f}"]
        cells += [f"{x['ours'][b]['efficiency']:.2%}" for b in r["buffers"]]
        cells += [f"{x['one_per_sequence']:.2%}", f"{x['bound']:.2%}"]
        print(" | ".join(cells))
    cells = ["mixture 45/45/10", "", "", ""] + [f"{r['mixture'][b]:.2%}" for b in r["buffers"]]
    print(" | ".join(cells + [f"{r['mixture_one_per_sequence']:.2%}", f"{r['mixture_bound']:.2%}"]))
    for kind, x in r["kinds"].items():
        for b, o in x["ours"].items():
            print(f"  {kind} buffer {b}: {o['sequences']} sequences, {o['samples_per_seq']:.2f} samples and "
                  f"{o['images_per_seq']:.2f} images per sequence, {o['skipped']} skipped, "
                  f"{o['sequences'] / o['seconds']:.0f} sequences/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="a curated output (default: curate the demo in a temp folder)")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--max-images", type=int, default=16)
    parser.add_argument("--image-tokens", type=int, default=144)
    parser.add_argument("--buffers", type=int, nargs="+", default=[32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--realistic", action="store_true",
                        help="pack the MM1 mixture across kinds from the stated distributions, both modes")
    parser.add_argument("--sequences", type=int, default=5000, help="--realistic: sequences per mode")
    parser.add_argument("--caption-ratio", type=float, default=0.5, help="--realistic: alt-text probability")
    parser.add_argument("--json", type=Path, help="--realistic: also write the results here")
    args = parser.parse_args(argv)
    if args.realistic:
        r = realistic(args.sequences, args.seq_len, args.max_images, args.image_tokens, args.buffers[0],
                      args.caption_ratio, args.seed)
        print_realistic(r)
        if args.json:
            args.json.write_text(json.dumps(r, indent=1))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out if args.out is not None else build_demo(Path(tmp))
        print_table(run(out, args.samples, args.seq_len, args.max_images, args.image_tokens,
                        tuple(args.buffers), args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
