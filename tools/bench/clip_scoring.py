"""The CLIP scoring stage end to end next to the bare model forward, on the same images and batch
size, in one run.

- bare forward: the images already decoded and preprocessed into tensors, the captions already
  tokenised; timed: `encode_image` + `encode_text` + normalise + the cosine, batch after batch;
- whole stage: a parquet file of pair records (JPEG bytes + captions) read row group by row
  group, `ClipScoreStage.process` (decode, RGB, preprocess on its threads, tokenise, forward,
  the score and embedding columns), and the result written to parquet.

The model is built from open_clip's config for `--model` with random weights (no download; speed
does not depend on the weights). On a CUDA machine `--device cuda --precision bf16` measures the
GPU path (the issue's goal there: the whole stage at >= 0.9 of the bare forward).

    python -m tools.bench.clip_scoring [--model ViT-B-32] [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.contract import record_schema
from curate.stages.clip_score import ClipScoreStage


def _images(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs of varied size: crops of the photographs scikit-image ships, resized."""
    from skimage import data as skdata  # heavy optional dependency (demo extra): its sample photographs

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 3, h)), int(rng.integers(w // 3, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(np.ascontiguousarray(photo[y : y + ch, x : x + cw]))
        side = int(rng.integers(200, 900))
        img = img.resize((side, max(1, side * ch // cw)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run(model: str, n_images: int, batch_size: int, device: str, precision: str, threads: int) -> dict[str, Any]:
    import torch  # heavy optional dependency (train extra): --help runs without it

    images = _images(n_images)
    captions = [f"a photograph, number {i}, of something in the scikit-image samples" for i in range(n_images)]
    stage = ClipScoreStage(ClipScoreStage.Config(model=model, pretrained=None, batch_size=batch_size,
                                                 device=device, precision=precision, decode_threads=threads))
    stage.ensure_setup()

    # bare forward on pre-made tensors
    tensors = [stage.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    tokens = stage.tokenizer(captions)
    dtype = stage.dtype

    def forward() -> None:
        for start in range(0, n_images, batch_size):
            batch = torch.stack(tensors[start : start + batch_size]).to(stage.device, dtype=dtype)
            with torch.inference_mode():
                i = torch.nn.functional.normalize(stage.model.encode_image(batch).float(), dim=-1)
                t = torch.nn.functional.normalize(
                    stage.model.encode_text(tokens[start : start + batch_size].to(stage.device)).float(), dim=-1)
                (i * t).sum(-1).cpu()

    forward()  # warm-up (allocator, kernels)
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward()
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    bare = time.perf_counter() - t0

    # the whole stage: parquet in, process, parquet out
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.parquet", Path(tmp) / "out.parquet"
        rows = [{"id": f"b:{i}", "source": "b", "image": b, "caption": c} for i, (b, c) in enumerate(zip(images, captions))]
        pq.write_table(pa.Table.from_pylist(rows, schema=record_schema("pair")), src, row_group_size=128)

        def whole() -> int:
            f = pq.ParquetFile(src)
            writer = None
            done = 0
            for g in range(f.num_row_groups):
                out = stage.process(f.read_row_group(g))
                writer = writer or pq.ParquetWriter(dst, out.schema, compression="zstd")
                writer.write_table(out)
                done += out.num_rows
            writer.close()
            return done

        whole()  # warm-up
        t0 = time.perf_counter()
        assert whole() == n_images
        if stage.device.type == "cuda":
            torch.cuda.synchronize()
        full = time.perf_counter() - t0
    return {
        "model": model, "images": n_images, "batch_size": batch_size, "device": str(stage.device),
        "precision": precision, "torch_threads": torch.get_num_threads(), "decode_threads": threads,
        "bare_images_per_s": n_images / bare, "stage_images_per_s": n_images / full, "ratio": bare / full,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--decode-threads", type=int, default=2)
    args = parser.parse_args(argv)
    r = run(args.model, args.images, args.batch_size, args.device, args.precision, args.decode_threads)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{r['model']} (random weights, {r['precision']}) on {r['device']}, {r['images']} images, "
          f"batch {r['batch_size']}, torch threads {r['torch_threads']}, decode threads {r['decode_threads']}")
    print("| | images/s |\n|---|---:|")
    print(f"| bare forward (pre-made tensors) | {r['bare_images_per_s']:.1f} |")
    print(f"| whole stage (parquet in, decode, preprocess, forward, parquet out) | {r['stage_images_per_s']:.1f} |")
    print(f"whole stage / bare forward: {r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
