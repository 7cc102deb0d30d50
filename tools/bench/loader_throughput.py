"""Loader throughput per worker: packed tokens/s of the training data path against plain
webdataset iteration of the same shards, in one process each (one process = one loader worker).

- ours: `train.data.mixture.Mixture` (reads samples by sidecar offsets, tokenizes, packs into
  `--seq-len` sequences, 45/45/10) plus the worker's image preprocessing (`ImagePreprocessor` to
  `--image-size`, as `train.data.loader.collate` does); tokens/s counts the packed non-padding
  tokens (text and image placeholders).
- webdataset, raw: `webdataset.WebDataset(shards)` over the same tars of all three kinds, bytes
  only; its tokens/s counts the tokens those samples become (the sidecars' `token_count` plus
  `--image-tokens` per image and an end token), for the same number of tokens.
- webdataset + the same work: the same iteration, each image decoded and preprocessed with the
  same preprocessor and each text tokenized with the same tokenizer; no mixing, no packing.

The demo output is tiny (44 samples), so both sides cycle over it (ours: passes with new
permutations; webdataset: the shard list repeated) until `--tokens` tokens.

    python -m tools.bench.loader_throughput [--out CURATED --tokenizer TOKENIZER.json]
        [--tokens 2000000] [--seq-len 4096] [--image-tokens 144] [--image-size 378]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from curate.contract import KIND_DIRS, read_sidecars, shard_urls
from curate.engine.driver import run_recipe
from curate.recipe import load_recipe

# torch (the train extra) comes with train.data, webdataset and tools.demo (through webdataset): they
# are imported where used, out of the demo build's dask workers, which re-import this module
# (spawn: as `__mp_main__`) and run curate, which never loads torch.

KINDS = ("pair", "doc", "text")


def build_demo(root: Path) -> tuple[Path, Path]:
    from tools.demo.run import DEMO_RECIPE, demo_inputs, demo_overrides  # torch: the note at the top

    with demo_inputs(root):
        recipe = load_recipe(DEMO_RECIPE, demo_overrides(root))
        run_recipe(recipe, progress=False)
    return Path(recipe.output.path), root / "inputs" / "tokenizer" / "tokenizer.json"


def ours(out: Path, tokenizer: Path, tokens: int, seq_len: int, image_tokens: int, image_size: int) -> dict[str, Any]:
    # torch (the train extra): the note at the top
    from train.data.images import ImagePreprocessor
    from train.data.mixture import Mixture, MixtureConfig

    cfg = MixtureConfig(outs=(str(out),), tokenizer=str(tokenizer), seq_len=seq_len, n_image_tokens=image_tokens)
    mixture = Mixture(cfg, slot=0, n_slots=1)
    pre = ImagePreprocessor.from_open_clip("ViT-H-14-378-quickgelu", "dfn5b") if image_size == 378 else \
        ImagePreprocessor(image_size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    start = time.perf_counter()
    done = pad = sequences = 0
    while done < tokens:
        packed = next(mixture)
        for data in packed.images:
            pre(data)
        done += packed.n_text_tokens + packed.n_image_tokens
        pad += packed.n_pad
        sequences += 1
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": done, "tokens_per_s": done / seconds, "sequences": sequences,
            "efficiency": done / (done + pad)}


def _token_index(out: Path, image_tokens: int) -> dict[str, int]:
    """(tar basename, key) -> the tokens the sample becomes, from the sidecars."""
    index: dict[str, int] = {}
    for kind in KINDS:
        table = read_sidecars(out, kind, columns=["key", "token_count", "n_images"])
        for key, count, images in zip(*(table.column(c).to_pylist() for c in ("key", "token_count", "n_images"))):
            index[f"{kind}:{key}"] = int(count or 0) + image_tokens * int(images or 0) + 1
    return index


def webdataset_side(out: Path, tokenizer: Path, tokens: int, image_tokens: int, image_size: int,
                    work: bool) -> dict[str, Any]:
    # torch (the train extra), which webdataset also loads: the note at the top
    import webdataset as wds

    from train.data.images import ImagePreprocessor  # torch, as above
    from train.data.samples import TextTokenizer

    index = _token_index(out, image_tokens)
    kind_of = {KIND_DIRS[k]: k for k in KINDS}
    urls = [u for k in KINDS for u in shard_urls(out, k)]
    tok = TextTokenizer.from_file(str(tokenizer)) if work else None
    pre = ImagePreprocessor.from_open_clip("ViT-H-14-378-quickgelu", "dfn5b") if work and image_size == 378 else \
        (ImagePreprocessor(image_size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
         if work else None)
    start = time.perf_counter()
    done = samples = 0
    while done < tokens:
        for sample in wds.WebDataset(urls, shardshuffle=False):
            kind = kind_of[Path(sample["__url__"]).parent.name]
            done += index.get(f"{kind}:{sample['__key__']}", 0)
            samples += 1
            if work:
                for name, data in sample.items():
                    if name.endswith(("jpg", "png", "webp")):
                        pre(data)
                if "txt" in sample:
                    tok.encode(sample["txt"].decode("utf-8", "replace"))
                elif kind == "doc":
                    for seg in json.loads(sample["json"])["segments"]:
                        if seg["type"] == "text":
                            tok.encode(seg["text"])
            if done >= tokens:
                break
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": done, "tokens_per_s": done / seconds, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--image-tokens", type=int, default=144)
    ap.add_argument("--image-size", type=int, default=378)
    args = ap.parse_args(argv)
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="mm1-bench-loader-")
        args.out, args.tokenizer = build_demo(Path(tmp.name))
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}")
    print(f"{args.tokens:,} tokens per side, seq_len {args.seq_len}, {args.image_tokens} tokens an image, "
          f"images preprocessed to {args.image_size} px; one process each")
    rows = {
        "ours (read by offsets, tokenize, pack, preprocess)": ours(args.out, args.tokenizer, args.tokens, args.seq_len,
                                                                   args.image_tokens, args.image_size),
        "webdataset, raw iteration": webdataset_side(args.out, args.tokenizer, args.tokens, args.image_tokens,
                                                     args.image_size, work=False),
        "webdataset + tokenize + preprocess": webdataset_side(args.out, args.tokenizer, args.tokens,
                                                              args.image_tokens, args.image_size, work=True),
    }
    print("| | seconds | tokens/s | ours / it |")
    print("|---|---:|---:|---:|")
    base = rows["ours (read by offsets, tokenize, pack, preprocess)"]["tokens_per_s"]
    for name, r in rows.items():
        ratio = "" if name.startswith("ours") else f"{base / r['tokens_per_s']:.2f}"
        print(f"| {name} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {ratio} |")
    print(f"packing efficiency of ours: {rows['ours (read by offsets, tokenize, pack, preprocess)']['efficiency']:.4f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
