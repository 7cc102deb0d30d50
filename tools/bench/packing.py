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
                                  [--max-images 16] [--buffers 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

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
    from curate.contract import read_sidecars

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
    from curate.recipe import load_recipe
    from curate.runner import run_recipe
    from tools.demo import DEMO_RECIPE, demo_inputs, demo_overrides

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
    parser.add_argument("--buffers", type=int, nargs="+", default=[64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out if args.out is not None else build_demo(Path(tmp))
        print_table(run(out, args.samples, args.seq_len, args.max_images, args.image_tokens,
                        tuple(args.buffers), args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
