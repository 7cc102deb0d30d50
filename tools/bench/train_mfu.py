"""Training throughput, MFU and HFU of MM1 sizes on one device, on synthetic packed sequences, so
the number measures the model and the step, not the data path (tools/bench/loader_throughput.py
measures that; BENCHMARKS.md puts the two side by side).

The step is built here from the model's own pieces, apart from the trainer's internals: the
registry model with random weights (`vision.pretrained` dropped: nothing is fetched, and FLOPs
and time do not depend on the weights), activation checkpointing and per-block compile by
train/parallelize.py's `apply_activation_checkpointing` and `apply_compile`, bf16 autocast on
CUDA, AdamW (fused on CUDA; decay on matrices only, as the trainer does), `accum` micro-batches
per optimizer step. FLOPs come from train/flops.py: MFU counts the model FLOPs of the tokens,
document-masked attention pairs and images a step holds; HFU adds the forward that activation
checkpointing computes again; both divide by the device's dense bf16 peak (`train.flops.peak_flops`).

A sequence is `--seq-len` tokens in `--images` samples laid out as the pairs are (train/data: an
image's placeholder run, caption tokens, end), each sample its own document (block-diagonal
attention, FlexAttention on CUDA), no padding.

`--model` and `--batch` take comma-separated lists, tried in order: a size or batch that runs out
of device memory is reported as such and the next is tried, so one short device session finds
the largest that fits:

    python -m tools.bench.train_mfu --model mm1-7b,mm1-3b --batch 2,1 --compile --ac selective
        [--ac-every 2] [--tower trained|frozen] [--accum 1] [--seq-len 4096] [--images 8]
        [--steps 20] [--warmup 5] [--all] [--json OUT.json]

On a machine without CUDA it runs on the CPU in fp32 (MFU not reported): the tests run it on the
tiny sizes for mechanics only.
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
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from train.flops import ModelFlops, batch_flops, causal_pairs, peak_flops
from train.model.mm1 import MM1, text_labels
from train.model.registry import decoder_param_counts, get_config
from train.parallelize import apply_activation_checkpointing, apply_compile

AC_MODES = ("none", "full", "selective")


def synthetic_batch(model: Any, batch: int, seq_len: int, images: int, gen: torch.Generator) -> dict[str, Any]:
    """`batch` packed sequences of `images` pair-shaped samples each (tokens, doc_ids, labels,
    images), on the CPU."""
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


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> tuple[float, float]:
    """Activation checkpointing by train/parallelize.py (`mode` "none", "full" or "selective":
    every `every`-th block, of the decoder and of the tower alike). Returns the fractions of the
    decoder's and of the tower's blocks it wrapped, counted on the model (what HFU recomputes)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {AC_MODES}, not {mode!r}")
    if every < 1:
        raise ValueError(f"ac_every must be >= 1, not {every}")
    apply_activation_checkpointing(model, mode, every)

    def wrapped(blocks: nn.ModuleList) -> float:
        return sum(isinstance(b, CheckpointWrapper) for b in blocks) / max(len(blocks), 1)

    return wrapped(model.decoder.layers), wrapped(model.vision.tower.transformer.resblocks)


def build_adamw(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW as the trainer builds it (MM1's betas; decay on matrices and tables only), fused on
    CUDA (one kernel for all parameters), for-each elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    cuda = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda, foreach=not cuda)


def measure(name: str, *, seq_len: int, batch: int, images: int, steps: int, warmup: int, compile: bool,
            ac: str, ac_every: int = 2, accum: int = 1, tower: str | None = None,
            device: torch.device) -> dict[str, Any]:
    """One size and batch: build, warm up (compile happens here), then time `steps` optimizer
    steps of `accum` micro-batches of `batch` sequences. `tower`: "trained", "frozen" or None
    (the registry config's)."""
    cfg = get_config(name)
    vision = replace(cfg.vision, pretrained=None)
    if tower is not None:
        vision = replace(vision, frozen=tower == "frozen")
    cfg = replace(cfg, vision=vision)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = MM1(cfg)
    model.train()
    mf = ModelFlops.from_model(model)
    fraction, tower_fraction = apply_ac(model, ac, ac_every)
    if compile:
        apply_compile(model)
    optimizer = build_adamw(model)
    gen = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(model, batch, seq_len, images, gen) for _ in range(2)]
    # every micro-batch has the same layout, so one step's FLOPs are accum x one micro-batch's
    b0 = batches[0]
    n_images = 0 if b0["images"] is None else b0["images"].shape[0]
    fl = batch_flops(mf, real_tokens=b0["tokens"].numel() * accum, causal_pairs=causal_pairs(b0["doc_ids"]) * accum,
                     images=n_images * accum, recompute=ac, recompute_fraction=fraction,
                     tower_recompute_fraction=tower_fraction)
    peak = peak_flops(torch.cuda.get_device_name(device)) if bf16 else None

    def step(i: int) -> float:
        loss = 0.0
        for j in range(accum):
            b = batches[(i * accum + j) % 2]
            moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(moved["tokens"], moved["images"], doc_ids=moved["doc_ids"], labels=moved["labels"])
            (out.total_loss / accum).backward()
            loss += float(out.loss.detach()) / accum
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step(i) for i in range(steps)]
    sync()
    dt = (time.perf_counter() - t0) / steps
    counts = decoder_param_counts(cfg.decoder)
    return {
        "model": name, "status": "ok", "device": _device_name(device), "torch": torch.__version__,
        "precision": "bf16 autocast" if bf16 else "fp32", "tower": "frozen" if cfg.vision.frozen else "trained",
        "batch": batch, "accum": accum, "seq_len": seq_len, "images_per_seq": images, "compile": compile,
        "activation_checkpointing": ac, "ac_every": ac_every if ac == "selective" else None,
        "recompute_fraction": fraction, "tower_recompute_fraction": tower_fraction,
        "tokens_per_s": batch * accum * seq_len / dt, "mfu": fl["model"] / dt / peak if peak else None,
        "hfu": fl["hardware"] / dt / peak if peak else None, "tower_share": fl["tower"] / fl["model"],
        "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "step_s": dt, "warmup_s": warm_s, "model_tflops_per_s": fl["model"] / dt / 1e12,
        "hardware_tflops_per_s": fl["hardware"] / dt / 1e12, "step_flops": fl, "peak_flops": peak,
        "params_total": sum(p.numel() for p in model.parameters()), "decoder_active": counts["active"],
        "losses_finite": all(math.isfinite(x) for x in losses),
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def _free(device: torch.device) -> None:
    gc.collect()  # a failed attempt's model and optimizer, before the next is built
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_or_oom(name: str, *, device: torch.device, **kwargs: Any) -> dict[str, Any]:
    """`measure`, with running out of device memory reported as a result rather than raised."""
    try:
        return measure(name, device=device, **kwargs)
    except torch.cuda.OutOfMemoryError as e:
        return {"model": name, "status": "out of memory", "batch": kwargs.get("batch"),
                "activation_checkpointing": kwargs.get("ac"), "detail": str(e).splitlines()[0]}
    finally:
        _free(device)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mm1-3b", help="registry names, comma-separated, tried in order")
    ap.add_argument("--batch", type=_ints, default=[1], help="sequences per micro-batch, comma-separated, "
                    "tried in order when one runs out of memory")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--images", type=int, default=8, help="pair-shaped samples (one image each) per sequence")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile per block (decoder and tower)")
    ap.add_argument("--ac", choices=AC_MODES, default="none",
                    help="activation checkpointing of the decoder's and the tower's blocks")
    ap.add_argument("--ac-every", type=int, default=2, help="selective: checkpoint every k-th block")
    ap.add_argument("--tower", choices=["trained", "frozen"], help="default: the registry config's")
    ap.add_argument("--all", action="store_true",
                    help="measure every size in --model, not only up to the first that fits")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    results = []
    for name in args.model.split(","):
        ok = False
        for batch in args.batch:
            r = measure_or_oom(name, seq_len=args.seq_len, batch=batch, images=args.images, steps=args.steps,
                               warmup=args.warmup, compile=args.compile, ac=args.ac, ac_every=args.ac_every,
                               accum=args.accum, tower=args.tower, device=device)
            results.append(r)
            print(json.dumps(r), flush=True)
            if r["status"] == "ok":
                ok = True
                break
        if ok and not args.all:
            break
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
