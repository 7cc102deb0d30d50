"""Training throughput and MFU of MM1 sizes on one device: the trainer's own pieces (model from the
registry, `parallelize` with compile and activation checkpointing, the trainer's AdamW groups,
bf16 autocast, `flops_per_step` and the device's bf16 peak) on synthetic packed sequences, so the
number measures the model and the step, not the data path (tools/bench/loader_throughput.py
measures that; BENCHMARKS.md puts the two side by side).

A sequence is `--seq-len` tokens in `--images` samples laid out as the pairs are (train/data:
an image's placeholder run, caption tokens, end), each sample its own document (block-diagonal
attention, FlexAttention on CUDA), random token ids, random images: weights are random too
(`vision.pretrained` is dropped: nothing is fetched), which does not change the FLOPs or the
time. MFU = (decoder FLOPs per token x tokens + image FLOPs x images) / step time / peak, with
train/model/registry.py's formulas: 6 x active non-embedding parameters + 12 x layers x width x
sequence length per token; 6 (trainable) or 2 (frozen) x tower parameters per patch plus the
tower's attention term, and 6 x connector parameters per patch, per image.

`--model` takes a comma-separated list, tried in order; a size that runs out of device memory is
reported as such and the next is tried, so one short device session can find the largest size
that fits:

    python -m tools.bench.train_mfu --model mm1-7b,mm1-3b --compile --ac [--seq-len 4096]
        [--batch 1] [--images 8] [--steps 20] [--warmup 5] [--json OUT.json]

On a machine without CUDA it runs on the CPU in fp32 (MFU not reported): the tests run it on
the tiny size for mechanics only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import time
from dataclasses import replace
from typing import Any

import torch


def synthetic_batch(model: Any, batch: int, seq_len: int, images: int, gen: torch.Generator) -> dict[str, Any]:
    """`batch` packed sequences of `images` pair-shaped samples each (tokens, doc_ids, labels,
    images), on the CPU."""
    from train.model.mm1 import text_labels

    image_id, run = model.image_token_id, model.n_image_tokens
    per_sample = seq_len // max(images, 1)
    if images and per_sample < run + 2:
        raise ValueError(f"{images} images of {run} tokens do not fit {seq_len} tokens with a caption each")
    vocab = model.cfg.decoder.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    tokens[tokens == image_id] = 0
    doc_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for i in range(max(images, 1)):
        start = i * per_sample
        doc_ids[:, start:] = i
        if images:
            tokens[:, start:start + run] = image_id
    side = model.vision.image_size
    pixels = torch.randn(batch * images, 3, side, side, generator=gen) if images else None
    return {"tokens": tokens, "doc_ids": doc_ids, "labels": text_labels(tokens, image_id, doc_ids), "images": pixels}


def measure(name: str, *, seq_len: int, batch: int, images: int, steps: int, warmup: int, compile: bool,
            ac: bool, freeze_vision: bool | None, device: torch.device) -> dict[str, Any]:
    """One size: build, warm up (compile happens here), then time `steps` optimizer steps."""
    from train.model.mm1 import MM1
    from train.model.registry import decoder_param_counts, get_config
    from train.parallelize import parallelize
    from train.recipe import OptimSection, ParallelSection
    from train.trainer import build_optimizer, flops_per_step, peak_flops

    cfg = get_config(name)
    vision = replace(cfg.vision, pretrained=None)
    if freeze_vision is not None:
        vision = replace(vision, frozen=freeze_vision)
    cfg = replace(cfg, vision=vision)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = MM1(cfg)
    model.train()
    parallelize(model, ParallelSection(compile=compile, activation_checkpointing=ac), device, bf16=bf16)
    optimizer = build_optimizer(model, OptimSection(), lr=1e-4)  # the trainer's AdamW, MM1's defaults
    decoder_fpt, image_fl = flops_per_step(model, seq_len)
    step_flops = decoder_fpt * batch * seq_len + image_fl * batch * images
    peak = peak_flops(device) if bf16 else None
    gen = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(model, batch, seq_len, images, gen) for _ in range(2)]

    def step(b: dict[str, Any]) -> float:
        moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(moved["tokens"], moved["images"], doc_ids=moved["doc_ids"], labels=moved["labels"])
        out.total_loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(batches[i % 2])
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step(batches[i % 2]) for i in range(steps)]
    sync()
    dt = (time.perf_counter() - t0) / steps
    counts = decoder_param_counts(cfg.decoder)
    return {
        "model": name, "status": "ok", "device": _device_name(device), "torch": torch.__version__,
        "precision": "bf16 autocast" if bf16 else "fp32", "compile": compile, "activation_checkpointing": ac,
        "vision_frozen": cfg.vision.frozen, "seq_len": seq_len, "batch": batch, "images_per_seq": images,
        "params_total": sum(p.numel() for p in model.parameters()), "decoder_active": counts["active"],
        "step_s": dt, "warmup_s": warm_s, "tokens_per_s": batch * seq_len / dt,
        "tflops_per_s": step_flops / dt / 1e12, "mfu": step_flops / dt / peak if peak else None,
        "peak_flops": peak, "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses_finite": all(math.isfinite(x) for x in losses),
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mm1-3b", help="registry names, comma-separated, tried in order")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--images", type=int, default=8, help="pair-shaped samples (one image each) per sequence")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile per decoder block")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per decoder block")
    ap.add_argument("--freeze-vision", choices=["yes", "no"], help="default: the registry config's")
    ap.add_argument("--all", action="store_true", help="measure every size in --model, not only up to the first that fits")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    freeze = None if args.freeze_vision is None else args.freeze_vision == "yes"
    results = []
    for name in args.model.split(","):
        try:
            r = measure(name, seq_len=args.seq_len, batch=args.batch, images=args.images, steps=args.steps,
                        warmup=args.warmup, compile=args.compile, ac=args.ac, freeze_vision=freeze, device=device)
        except torch.cuda.OutOfMemoryError as e:
            r = {"model": name, "status": "out of memory", "detail": str(e).splitlines()[0]}
        results.append(r)
        print(json.dumps(r), flush=True)
        gc.collect()  # the failed size's model and optimizer, before the next size is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if r["status"] == "ok" and not args.all:
            break
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
