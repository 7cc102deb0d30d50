"""The MM1 training loop: `train(recipe, run_dir)`, launched by torchrun (one process per device)
or as a single process.

One step: `grad_accum` micro-batches from this rank's loader, forward under bf16 autocast on CUDA
(fp32 on CPU), `MM1Output.total_loss` (the LM loss plus weighted MoE auxiliary losses) backward;
then every rank says whether its loss was finite and an all-reduce (MAX) agrees on it. A step
that is non-finite on any rank is skipped on every rank (gradients dropped, no optimizer update,
nothing checkpointed, counted); `max_bad_steps` in a row stop the run with `Diverged`
(`mm1 train` exits with EXIT_DIVERGED). Otherwise gradients are averaged (FSDP reduces them
itself), clipped to `grad_clip`, and AdamW steps; the schedule advances with every step, skipped
or not, so the learning rate follows the data.

Checkpoints (train/checkpoint.py) hold the model, optimizer and scheduler, and per rank, as JSON:
the loader's state, the RNG states and the step. With `resume` the newest checkpoint in `run_dir`
is loaded and the run continues with the batches, and so the losses, an uninterrupted run would
have had (exactly, with `deterministic: true`).

Weight decay: MM1's decoupled decay (torch AdamW's weight_decay) applies to matrices and
embedding tables (every parameter of 2 or more dimensions), not to norm gains and biases,
whose decay only pulls them towards a meaningless 0 (nanoGPT's and most LLM trainers' rule).

Metrics: every step a JSON line in `run_dir/<log.jsonl>` (rank 0; other ranks
`metrics.rank<R>.jsonl`, for comparing ranks) with the loss averaged over ranks, this rank's own
loss, the learning rate, grad norm, tokens/s, MFU (CUDA only) and peak memory; a log line every
`log.every` steps; validation losses per kind every `validation.every` steps.

Test hooks (environment, read once at start): MM1_INJECT_NAN_AT_STEP="rank:step" (or
"rank:first-last") makes that rank's loss NaN at those steps; MM1_STOP_AFTER_STEP=N ends the process abruptly (os._exit) after
step N, as a crash would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.export import describe
from train.recipe import OptimSection, TrainRecipe

log = logging.getLogger("mm1.train")

EXIT_DIVERGED = 3  # `mm1 train`'s exit status after max_bad_steps non-finite steps in a row
EXIT_STOPPED = 17  # the exit status of a run ended by MM1_STOP_AFTER_STEP
INJECT_NAN_ENV = "MM1_INJECT_NAN_AT_STEP"
STOP_AFTER_ENV = "MM1_STOP_AFTER_STEP"

# dense bf16 peak FLOP/s per device, for MFU (no entry: MFU not reported)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class Diverged(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss or gradient on some rank."""

    exit_code = EXIT_DIVERGED


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this call initialised the process group (and destroys it)


def init_distributed() -> Distributed:
    """Rank, world and device from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a
    process group with nccl on CUDA, gloo on CPU when there is more than one rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    return Distributed(rank, world, device, owns)


def _all_reduce(values: list[float], op: str, d: Distributed) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _env_hooks(rank: int) -> tuple[range, int | None]:
    """(steps whose loss this rank makes NaN, the step after which the process exits)."""
    nan_at = range(0)
    spec = os.environ.get(INJECT_NAN_ENV)
    if spec:
        r, _, steps = spec.partition(":")
        first, _, last = steps.partition("-")
        if int(r) == rank:
            nan_at = range(int(first), int(last or first) + 1)
    stop = os.environ.get(STOP_AFTER_ENV)
    return nan_at, int(stop) if stop else None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


# building ----------------------------------------------------------------------------------------


def build_model(recipe: TrainRecipe, tokenizer: Any, device: torch.device) -> nn.Module:
    """MM1 of the recipe's size, its vocabulary and placeholder token from the tokenizer (the
    registry's vocabulary is a default only). With FSDP the decoder is built on the meta device
    and materialised by `materialize` after sharding; otherwise built here, on CPU, under the
    seed (every replica starts equal)."""
    from train.model.mm1 import MM1, with_pretrained_decoder
    from train.model.registry import get_config

    cfg = get_config(recipe.model.name)
    if recipe.model.freeze_vision is not None:
        cfg = replace(cfg, vision=replace(cfg.vision, frozen=recipe.model.freeze_vision))
    vocab = tokenizer._tok.get_vocab_size()
    if recipe.model.decoder_checkpoint:
        model = with_pretrained_decoder(cfg, recipe.model.decoder_checkpoint, image_token_id=tokenizer.image_id)
        if model.cfg.decoder.vocab_size < vocab:
            raise ValueError(f"decoder checkpoint has {model.cfg.decoder.vocab_size} tokens, the tokenizer {vocab}")
        return model
    padded = 64 * math.ceil(vocab / 64)  # a multiple of 64 for matmul efficiency (nanoGPT's 50304)
    cfg = replace(cfg, decoder=replace(cfg.decoder, vocab_size=padded), image_token_id=tokenizer.image_id)
    if not recipe.parallel.fsdp:
        return MM1(cfg)
    with torch.device("meta"):
        model = MM1(cfg)
    for part in (model.vision, model.connector):  # small: built whole, then sharded
        part.to_empty(device="cpu")
        part.init_weights()
    return model


def materialize(model: nn.Module, device: torch.device) -> None:
    """After sharding: allocate the decoder's (meta) shards on `device` and initialise them."""
    model.decoder.to_empty(device=device)
    model.decoder.init_weights()


def build_optimizer(model: nn.Module, o: OptimSection, lr: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices and embedding tables only (the module docstring says why)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas, eps=o.eps, foreach=True)


def _loader(recipe: TrainRecipe, model: nn.Module, outs: list[str], d: Distributed, *, steps: int | None,
            repeat: bool, state: dict | None):
    from train.data.loader import Loader, LoaderConfig
    from train.data.mixture import MixtureConfig

    r = recipe.data
    mixture = MixtureConfig(outs=tuple(outs), tokenizer=r.tokenizer, seq_len=r.seq_len, weights=dict(r.weights),
                            n_image_tokens=recipe.n_image_tokens, max_images=r.max_images,
                            caption_ratio=r.caption_ratio, buffer_size=r.buffer_size, seed=recipe.seed,
                            repeat=repeat)
    pp = model.vision.preprocess_cfg
    cfg = LoaderConfig(mixture, batch_size=r.batch_size, steps=steps, workers=r.workers,
                       image_size=model.vision.image_size, image_mean=tuple(pp["mean"]), image_std=tuple(pp["std"]))
    return Loader(cfg, rank=d.rank, world=d.world, state=state)


# measuring ---------------------------------------------------------------------------------------


def flops_per_step(model: nn.Module, seq_len: int) -> tuple[float, float]:
    """(training FLOPs per sequence token of the decoder, training FLOPs per image)."""
    from train.model.registry import decoder_flops_per_token, image_flops

    vision = model.vision
    vision_params = sum(p.numel() for p in vision.parameters())
    connector_params = sum(p.numel() for p in model.connector.parameters())
    trainable = any(p.requires_grad for p in vision.parameters())
    per_image = image_flops(vision_params, len(vision.tower.transformer.resblocks), vision.width,
                            vision.n_patches + 1, connector_params, trainable)
    return decoder_flops_per_token(model.cfg.decoder, seq_len), per_image


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s (PEAK_FLOPS), None off CUDA or for an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# the loop ----------------------------------------------------------------------------------------


def _forward(model: nn.Module, batch: dict, d: Distributed, autocast: bool):
    tokens = batch["tokens"].to(d.device, non_blocking=True)
    images = batch["images"]
    images = None if images is None else images.to(d.device, non_blocking=True)
    model._images_in_batch = images is not None  # read by join_image_path's hook (FSDP)
    with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens, images, doc_ids=batch["doc_ids"].to(d.device), labels=batch["labels"].to(d.device))
        total = out.total_loss
    return out, total


def join_image_path(model: nn.Module, device: torch.device) -> None:
    """FSDP: the vision and connector groups gather (and reduce in backward) on every rank, in the
    same order on every rank. A rank whose batch has no image runs them on a blank image at the
    point where images are encoded (just before the decoder) and adds the result times zero to the
    decoder's input, so forward and backward meet the other ranks' collectives in order."""
    size = model.vision.image_size

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs.get("embeds")
        if embeds is not None and not getattr(model, "_images_in_batch", True):
            blank = model.connector(model.vision(torch.zeros(1, 3, size, size, device=device)))
            kwargs["embeds"] = embeds + 0.0 * blank.sum().to(embeds.dtype)
        return args, kwargs

    model.decoder.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
def validate(model: nn.Module, recipe: TrainRecipe, d: Distributed, autocast: bool) -> dict[str, float]:
    """Mean LM loss per kind (token-weighted) over up to `validation.batches` batches per rank of
    one pass over the validation outputs. Ranks stop together when any runs out (FSDP needs
    every rank in every forward)."""
    import torch.nn.functional as F

    from train.data.mixture import KINDS
    from train.model.mm1 import IGNORE

    v = recipe.validation
    sums = {k: [0.0, 0.0] for k in KINDS}
    model.eval()
    with _loader(recipe, model, v.outs, d, steps=None, repeat=False, state=None) as loader:
        it = iter(loader)
        for _ in range(v.batches):
            batch = next(it, None)
            if _all_reduce([1.0 if batch is None else 0.0], "max", d)[0] > 0:
                break
            images = batch["images"]
            model._images_in_batch = images is not None
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(batch["tokens"].to(d.device), None if images is None else images.to(d.device),
                            doc_ids=batch["doc_ids"].to(d.device))
            labels = batch["labels"].to(d.device)
            per_token = F.cross_entropy(out.logits.float().transpose(1, 2), labels, ignore_index=IGNORE,
                                        reduction="none")
            counted = (labels != IGNORE).sum(1)
            for row, kind in enumerate(batch["kinds"]):
                sums[kind][0] += float(per_token[row].sum())
                sums[kind][1] += float(counted[row])
    model.train()
    flat = _all_reduce([x for k in KINDS for x in sums[k]], "sum", d)
    return {f"val/{k}": flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(KINDS) if flat[2 * i + 1] > 0}


class _Metrics:
    """Per-step JSON lines (appended: a resumed run adds to the killed run's file)."""

    def __init__(self, run_dir: Path, recipe: TrainRecipe, rank: int):
        name = recipe.log.jsonl if rank == 0 else f"{Path(recipe.log.jsonl).stem}.rank{rank}.jsonl"
        self.file = open(run_dir / name, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(recipe: TrainRecipe, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Run `recipe` to `recipe.steps`, checkpointing into `run_dir` (resuming from its newest
    checkpoint when `resume`). Returns the final metrics: step, loss (averaged over ranks),
    losses per step of this invocation, skipped steps, last validation losses. Raises
    `Diverged` after `max_bad_steps` consecutive non-finite steps."""
    from train import checkpoint as ckpt
    from train.data.samples import TextTokenizer
    from train.parallelize import parallelize, sync_gradients
    from train.schedule import lr_lambda, mm1_peak_lr

    d = init_distributed()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(recipe.seed, recipe.deterministic)
    nan_at, stop_after = _env_hooks(d.rank)
    try:
        tokenizer = TextTokenizer.from_file(recipe.data.tokenizer)
        model = build_model(recipe, tokenizer, d.device)
        n_params = sum(p.numel() for p in model.parameters())
        autocast = d.device.type == "cuda" and recipe.precision == "bf16"
        decoder_fpt, image_fl = flops_per_step(model, recipe.data.seq_len)
        parallelize(model, recipe.parallel, d.device, bf16=autocast)
        if recipe.parallel.fsdp:
            join_image_path(model, d.device)
        if recipe.parallel.fsdp and not recipe.model.decoder_checkpoint:
            materialize(model, d.device)
        if not recipe.parallel.fsdp:
            model.to(d.device)  # fully_shard has placed the sharded model already
        model.train()
        peak = mm1_peak_lr(n_params) if recipe.optim.lr == "mm1" else float(recipe.optim.lr)
        optimizer = build_optimizer(model, recipe.optim, peak)
        o = recipe.optim
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s + 1, o.warmup, recipe.steps, o.min_lr_ratio))

        step, skipped, losses = 0, 0, []
        loader_state = None
        latest = ckpt.latest_checkpoint(run_dir) if resume else None
        if latest is not None:
            extra = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
            step, skipped, loader_state = int(extra["step"]), int(extra.get("skipped", 0)), extra["loader"]
            ckpt.restore_rng(extra["rng"])
            log.info("resumed from %s at step %d", latest, step)
        if d.rank == 0:
            log.info("%s: %s, %.1fM parameters, peak lr %.3g, %d steps, world %d on %s", recipe.name,
                     recipe.model.name, n_params / 1e6, peak, recipe.steps, d.world, d.device)

        return _loop(recipe, run_dir, d, model, optimizer, scheduler, step, skipped, losses, loader_state,
                     autocast, (decoder_fpt, image_fl), nan_at, stop_after, ckpt, sync_gradients)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _loop(recipe, run_dir, d, model, optimizer, scheduler, step, skipped, losses, loader_state, autocast,
          flops, nan_at, stop_after, ckpt, sync_gradients) -> dict[str, Any]:
    accum = recipe.data.grad_accum
    replicated = d.world > 1 and not recipe.parallel.fsdp
    params = [p for p in model.parameters() if p.requires_grad]
    device_peak = peak_flops(d.device) if recipe.precision == "bf16" else None  # MFU: against the bf16 peak
    metrics = _Metrics(run_dir, recipe, d.rank)
    consecutive, val = 0, {}
    description = describe(model)  # in every checkpoint, so `mm1 export` needs only the folder
    loader = _loader(recipe, model, recipe.data.outs, d, steps=recipe.steps * accum, repeat=True, state=loader_state)
    try:
        batches = iter(loader)
        while step < recipe.steps:
            step += 1
            t0 = time.perf_counter()
            lm_loss, n_tokens, n_images = 0.0, 0, 0
            for _ in range(accum):
                batch = next(batches)
                out, total = _forward(model, batch, d, autocast)
                if step in nan_at:
                    total = total * float("nan")
                (total / accum).backward()
                lm_loss += float(out.loss.detach()) / accum + (float("nan") if step in nan_at else 0.0)
                n_tokens += batch["tokens"].numel()
                n_images += 0 if batch["images"] is None else batch["images"].shape[0]
            bad = _all_reduce([0.0 if math.isfinite(lm_loss) else 1.0], "max", d)[0] > 0
            grad_norm = float("nan")
            if not bad:
                if replicated:
                    sync_gradients(model)
                clip = recipe.optim.grad_clip if recipe.optim.grad_clip is not None else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                bad = not math.isfinite(grad_norm)  # equal on every rank: computed from synced gradients
            if bad:
                skipped += 1
                consecutive += 1
            else:
                optimizer.step()
                consecutive = 0
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            loss_sum, tok_sum, img_sum = _all_reduce([lm_loss, n_tokens, n_images], "sum", d)
            loss = loss_sum / d.world
            losses.append(loss)
            dt = time.perf_counter() - t0
            step_flops = flops[0] * tok_sum + flops[1] * img_sum
            record = {"step": step, "loss": loss, "rank_loss": lm_loss, "rank_images": n_images, "lr": lr, "grad_norm": grad_norm,
                      "skipped": bad, "skipped_total": skipped, "tokens_per_s": tok_sum / dt,
                      "mfu": step_flops / dt / d.world / device_peak if device_peak else None,
                      "memory_gib": _peak_memory_gib(d.device)}
            if recipe.validation.outs and step % recipe.validation.every == 0:
                val = validate(model, recipe, d, autocast)
                record.update(val)
            metrics.write(record)
            if d.rank == 0 and (step % recipe.log.every == 0 or step == recipe.steps or bad):
                log.info("step %d loss %.4f lr %.3g grad %.3g tok/s %.0f%s mem %.2fGiB%s", step, loss, lr,
                         grad_norm, record["tokens_per_s"],
                         f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else "", record["memory_gib"],
                         " SKIPPED (non-finite)" if bad else "")
            if consecutive >= recipe.max_bad_steps:
                raise Diverged(f"{consecutive} consecutive non-finite steps (last: step {step})")
            if not bad and (step % recipe.checkpoint.every == 0 or step == recipe.steps):
                extra = {"loader": loader.state_dict(), "rng": ckpt.capture_rng(), "step": step, "skipped": skipped}
                ckpt.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     extra=extra, keep=recipe.checkpoint.keep, description=description)
            if stop_after == step:
                # a crash: no final checkpoint, no cleanup, except that the loader's workers are
                # stopped (torchrun kills a failed rank's group; a bare os._exit would orphan them,
                # blocked on their queues' feeder threads, holding the parent's stdout open)
                loader.close()
                metrics.close()
                os._exit(EXIT_STOPPED)
    finally:
        loader.close()
        metrics.close()
    return {"step": step, "loss": losses[-1] if losses else None, "losses": losses, "skipped": skipped, **val}
