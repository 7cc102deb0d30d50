"""The MM1 training loop: `train(recipe, run_dir)`, launched by torchrun (one process per device)
or as a single process.

Start: the mesh (train/mesh.py) is resolved from `parallel.*` and the world; the model is built on
the meta device, parallelized (train/parallelize.py: expert parallelism, activation
checkpointing, compile, FSDP2/HSDP), allocated, and filled with the initial weights that rank 0
alone draws under the seed (and reads from the HF decoder checkpoint and the tower's open_clip
checkpoint) and broadcasts into every rank's shards: the same seed gives the same weights on any
mesh, and no rank holds a full copy it does not own. Master weights and AdamW states are fp32
whatever a checkpoint's dtype; on CUDA the compute runs under bf16 autocast (FSDP gathers bf16).

One step (`train_step`, which tests call directly with fixed micro-batches): `grad_accum`
micro-batches; the LM loss is summed over target tokens and divided by the target tokens of the
whole step (all micro-batches, all ranks), so a token's weight does not depend on the layout;
gradients are reduced in the last micro-batch's backward only; every rank says whether its loss
was finite and an all-reduce agrees on it. A step that is non-finite on any rank is skipped on
every rank (gradients dropped, no optimizer update, nothing checkpointed, counted);
`max_bad_steps` in a row stop the run with `Diverged` (`mm1 train` exits with EXIT_DIVERGED).
Otherwise gradients are clipped to `grad_clip` by their global norm and AdamW (fused on CUDA)
steps; the schedule advances with every step, skipped or not, so the learning rate follows the
data.

Checkpoints (train/checkpoint.py) hold the model, optimizer and scheduler, and per rank, as JSON:
the loader's state, the RNG states and the step. With `resume` the newest checkpoint in `run_dir`
is loaded and the run continues with the batches, and so the losses, an uninterrupted run would
have had (exactly, with `deterministic: true`).

Parameter groups (`param_groups`): the tower and the connector may have their own learning-rate
multipliers; MM1's decoupled decay (torch AdamW's weight_decay) applies to matrices, not to norm
gains, biases, embedding tables or position embeddings.

Metrics: every step a JSON line in `run_dir/<log.jsonl>` (rank 0; other ranks
`metrics.rank<R>.jsonl`, for comparing ranks) with the step's loss, this rank's own loss, the
MoE auxiliary loss, the learning rate, grad norm, tokens/s, MFU and HFU (CUDA, train/flops.py's
accounting: real tokens, the attention document masks let run) and the tower's share of the
FLOPs, and peak memory; a log line every `log.every` steps; validation losses per kind every
`validation.every` steps. Rank 0 writes the same numbers as TensorBoard scalars into
`run_dir/tensorboard` when the tensorboard package is installed (`log.tensorboard`).

The run directory: `recipe.yaml` (the resolved recipe of the newest start and its overrides;
an earlier start's different recipe kept as `recipe.until-step-<N>.yaml`), the metrics files,
`tensorboard/`, and the `step-<N>` checkpoints. A start from step N (N = 0 without a checkpoint)
first drops the metrics past N, so after a resume each file is one series with no step twice:
the resumed run's steps replace the killed run's (TensorBoard: `purge_step`).

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
import re
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from train import checkpoint as ckpt
from train.data.loader import Loader, LoaderConfig
from train.data.mixture import KINDS, MixtureConfig
from train.data.samples import TextTokenizer
from train.expert_parallel import expert_parameters
from train.export import describe
from train.flops import ModelFlops, batch_flops, causal_pairs, peak_flops
from train.mesh import ParallelDims, dims_for
from train.model.connector import build_connector
from train.model.decoder import Decoder
from train.model.fit import misfit_message
from train.model.hf import decoder_config_from_hf, read_hf_decoder
from train.model.mm1 import IGNORE, MM1
from train.model.moe import moe_param_counts
from train.model.registry import get_config
from train.model.vision import VisionEncoder, vision_state_dict
from train.parallelize import parallelize, recomputed_fraction, set_gradient_sync, sync_gradients
from train.recipe import OptimSection, TrainRecipe
from train.schedule import lr_lambda, mm1_peak_lr

log = logging.getLogger("mm1.train")

EXIT_DIVERGED = 3  # `mm1 train`'s exit status after max_bad_steps non-finite steps in a row
EXIT_STOPPED = 17  # the exit status of a run ended by MM1_STOP_AFTER_STEP
INJECT_NAN_ENV = "MM1_INJECT_NAN_AT_STEP"
STOP_AFTER_ENV = "MM1_STOP_AFTER_STEP"



class StartError(ValueError):
    """The run cannot start: the mesh does not fit the world or the model, or the initial weights
    (a checkpoint) do not fit the model. The message names the key and what was expected;
    `mm1 train` prints it and exits with status 2 on every rank."""


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
    np.random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


# building ----------------------------------------------------------------------------------------


def model_config(recipe: TrainRecipe, vocab: int, image_token_id: int):
    """The MM1Config a run trains: the registry size; the decoder's shape from the HF checkpoint's
    config.json when one is given (else the size's, its vocabulary padded to a multiple of 64 for
    matmul efficiency, nanoGPT's 50304); the tower frozen or not as the recipe says."""
    cfg = get_config(recipe.model.name)
    if recipe.model.freeze_vision is not None:
        cfg = replace(cfg, vision=replace(cfg.vision, frozen=recipe.model.freeze_vision))
    if recipe.model.vision_checkpoint is not None:
        cfg = replace(cfg, vision=replace(cfg.vision, pretrained=recipe.model.vision_checkpoint))
    if recipe.model.decoder_checkpoint:
        config_json = Path(recipe.model.decoder_checkpoint) / "config.json"
        try:
            decoder = decoder_config_from_hf(json.loads(config_json.read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"model.decoder_checkpoint: cannot read {config_json}: {e}") from None
        if cfg.decoder.moe is not None:
            decoder = replace(decoder, moe=cfg.decoder.moe)  # sparse upcycling: dense FFNs copied into experts
        if decoder.vocab_size < vocab:
            raise ValueError(f"model.decoder_checkpoint has {decoder.vocab_size} tokens, the tokenizer {vocab}")
    else:
        decoder = replace(cfg.decoder, vocab_size=64 * math.ceil(vocab / 64))
    return replace(cfg, decoder=decoder, image_token_id=image_token_id)


def initial_parts(recipe: TrainRecipe, cfg) -> Iterator[dict[str, torch.Tensor]]:
    """The model's initial weights, fp32, on CPU, one part at a time (rank 0 alone makes them):
    the tower, the connector, then the decoder's embedding, each block and its head
    (`Decoder.init_pieces`), so that no more than one decoder block is ever held beside the
    checkpoint (an MoE block upcycled into 64 experts is 4.8B parameters; the whole 3B-MoE, 262
    GB). Random parts are drawn under the recipe's seed, in that order; the decoder comes from
    the Hugging Face checkpoint and the tower from its open_clip tag or file when the recipe
    names them. The same seed gives the same weights whatever the mesh: drawn once, here, then
    broadcast and sharded. `n_parts(cfg)` parts."""
    torch.manual_seed(recipe.seed)
    vision = VisionEncoder(replace(cfg.vision, pretrained=None))
    if cfg.vision.pretrained is not None:
        yield {f"vision.{k}": v.float() for k, v in vision_state_dict(cfg.vision, cfg.vision.pretrained).items()}
    else:
        yield {f"vision.{k}": v.float() for k, v in vision.state_dict().items()}
    connector = build_connector(cfg.connector, vision.width, vision.grid, cfg.decoder.dim)
    connector.init_weights()
    yield {f"connector.{k}": v.float() for k, v in connector.state_dict().items()}
    del vision, connector

    hf = None
    if recipe.model.decoder_checkpoint:
        _, hf = read_hf_decoder(recipe.model.decoder_checkpoint, dtype=None)  # as stored; cast per part
    with torch.device("meta"):
        decoder = Decoder(cfg.decoder)
    for name, module, init in decoder.init_pieces():
        prefix = f"{name}." if name else ""
        module.to_empty(device="cpu")
        init()  # drawn even when the checkpoint replaces it: the routers' draws stay in place
        part = {f"{prefix}{k}": v.float() for k, v in module.state_dict().items()}
        module.to_empty(device="meta")
        if hf is not None:
            part = _from_checkpoint(cfg, part, hf)
        yield {f"decoder.{k}": v for k, v in part.items()}


def n_parts(cfg) -> int:
    """How many parts `initial_parts` yields: tower, connector, embedding, blocks, head."""
    return 2 + 1 + cfg.decoder.n_layers + 1


def _from_checkpoint(cfg, part: dict[str, torch.Tensor], hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder part's tensors taken from the checkpoint (`hf`, our names), fp32; a dense FFN
    copied into every expert of an MoE layer (sparse upcycling, Komatsuzaki et al. 2023); the
    routers keep their random init. A tensor the checkpoint lacks is an error naming it."""
    out = {}
    for key, random_init in part.items():
        if key in hf:
            out[key] = hf.pop(key).float()
        elif ".feed_forward.w" in key and f"{key}.weight" in hf:  # an expert stack from a dense FFN
            out[key] = hf.pop(f"{key}.weight").float().unsqueeze(0).expand_as(random_init).clone()
        elif ".router." in key:
            out[key] = random_init
        else:
            raise ValueError(f"model.decoder_checkpoint lacks decoder.{key} (expected by {cfg.name})")
    return out


def _inactive_expert_params(cfg) -> int:
    """Parameters of the experts a token does not run through (0 for a dense model): MM1's lr
    rule is fitted on dense models, where N is what every token trains; for an MoE that is the
    active count (recipes/train/mm1-3b-moe.yaml argues it)."""
    moe = cfg.decoder.moe
    if moe is None:
        return 0
    total, active = moe_param_counts(cfg.decoder)
    return sum(total - active for layer in range(cfg.decoder.n_layers) if cfg.decoder.is_moe_layer(layer))


def build_model(recipe: TrainRecipe, cfg, dims: ParallelDims, device: torch.device, *,
                state: dict[str, torch.Tensor] | None = None, bf16: bool = False) -> nn.Module:
    """The training model: built on the meta device, parallelized (train/parallelize.py), then
    allocated on `device` and filled with the initial weights: `state` if given (rank 0's counts;
    a full fp32 state dict), else `initial_parts(recipe, cfg)`, made on rank 0 only, part by
    part, and broadcast into every rank's shards. Parameters are fp32 (the master weights) whatever the
    checkpoints' dtypes; bf16 is only what FSDP gathers for compute. Under FSDP the image path
    joins every forward (`join_image_path`)."""
    with torch.device("meta"):
        model = MM1(cfg)
    parallelize(model, recipe.parallel, dims, device, bf16=bf16)
    model.to_empty(device=device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rank0 = dims.world == 1 or not dist.is_initialized() or dist.get_rank() == 0
    parts = (iter([state]) if state is not None else initial_parts(recipe, cfg)) if rank0 else None
    count = 1 if state is not None else n_parts(cfg)
    if dims.world > 1 and dist.is_initialized():
        shared = [count]
        dist.broadcast_object_list(shared, src=0)  # rank 0 decides: a given `state` is one part
        count = shared[0]
    seen: set[str] = set()
    for i in range(count):
        part, error = {}, None
        if rank0:
            try:
                part = next(parts)
                _check_part(expected, part, seen, last=i == count - 1)
            except ValueError as e:
                error = str(e)
        if dims.world > 1 and dist.is_initialized():
            shared = [error]
            dist.broadcast_object_list(shared, src=0)  # every rank fails alike, none waits for a broadcast
            error = shared[0]
        if error is not None:
            raise StartError(error)
        _load_part(model, part, dims)
    if dims.fsdp:
        join_image_path(model, device)
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise AssertionError(f"master weights must be fp32: {bad[:3]}")
    return model


def _check_part(expected: dict[str, tuple], part: dict[str, torch.Tensor], seen: set[str], last: bool) -> None:
    """A part of the initial weights fits the model: known names, the right shapes; after the
    last part, every tensor had its value. Else an error naming them."""
    extra = sorted(set(part) - set(expected))
    wrong = [f"{k}: found {list(v.shape)}, expected {list(expected[k])}" for k, v in part.items()
             if k in expected and tuple(v.shape) != expected[k]]
    seen.update(part)
    missing = sorted(set(expected) - seen) if last else []
    message = misfit_message("the initial weights do not fit the model:", wrong=wrong, missing=missing,
                             unexpected=extra)
    if message:
        raise ValueError(message)


def _load_part(model: nn.Module, part: dict[str, torch.Tensor], dims: ParallelDims) -> None:
    """Copy one part of the initial weights into the (possibly sharded) model: in one process
    directly, on several ranks from rank 0's copy by broadcast, each rank keeping its shards."""
    if dims.world == 1 or not dist.is_initialized():
        missing, unexpected = model.load_state_dict(part, strict=False)
        assert not unexpected, unexpected
        return
    set_model_state_dict(model, part, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))


NO_DECAY = ("tok_embeddings.weight", "positional_embedding", "class_embedding", "pos_embed")


def param_groups(model: nn.Module, o: OptimSection, lr: float) -> list[dict[str, Any]]:
    """AdamW's groups: (tower, connector, decoder) x (decay, no decay) x (dense, expert weights).
    Each part's learning rate is `lr` x its multiplier (`vision_lr_mult`, `connector_lr_mult`).
    No weight decay on norms, biases, embedding tables and position embeddings. Expert weights
    under expert parallelism live on another mesh than FSDP's, and a fused or foreach step
    cannot mix meshes: they get groups of their own. Empty groups are left out."""
    experts = {id(p) for p in expert_parameters(model)}
    mults = {"vision": o.vision_lr_mult, "connector": o.connector_lr_mult, "decoder": 1.0}
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[0] if name.split(".")[0] in mults else "decoder"
        decay = p.ndim >= 2 and not name.endswith(NO_DECAY)
        key = (part, decay, id(p) in experts)
        g = groups.setdefault(key, {"params": [], "weight_decay": o.weight_decay if decay else 0.0,
                                    "lr": lr * mults[part], "name": f"{part}{'' if decay else '/no_decay'}"
                                    f"{'/experts' if key[2] else ''}"})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, o: OptimSection, lr: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused on CUDA (one kernel per group), foreach elsewhere."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, o, lr), lr=lr, betas=o.betas, eps=o.eps, **kind)


def _loader(recipe: TrainRecipe, model: nn.Module, outs: list[str], d: Distributed, *, steps: int | None,
            repeat: bool, state: dict | None):
    r = recipe.data
    mixture = MixtureConfig(outs=tuple(outs), tokenizer=r.tokenizer, seq_len=r.seq_len, weights=dict(r.weights),
                            n_image_tokens=recipe.n_image_tokens, max_images=r.max_images,
                            caption_ratio=r.caption_ratio, buffer_size=r.buffer_size, seed=recipe.seed,
                            repeat=repeat, max_skipped_fraction=r.max_skipped_fraction, packing=r.packing)
    # the tower's own preprocessing (size, resize mode, interpolation, mean/std); uint8 images,
    # pinned on CUDA, normalised on the device by the tower
    cfg = LoaderConfig.for_tower(mixture, model.vision.preprocess_cfg, batch_size=r.batch_size, steps=steps,
                                 workers=r.workers, pin_memory=d.device.type == "cuda")
    return Loader(cfg, rank=d.rank, world=d.world, state=state)


# measuring ---------------------------------------------------------------------------------------


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# the step ----------------------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    for key in ("tokens", "doc_ids", "labels", "token_mask", "images"):
        if out.get(key) is not None:
            out[key] = out[key].to(device, non_blocking=True)
    return out


def _forward(model: nn.Module, batch: dict, autocast: bool, device: torch.device):
    model._images_in_batch = batch["images"] is not None  # read by join_image_path's hook (FSDP)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(batch["tokens"], batch["images"], doc_ids=batch["doc_ids"], labels=batch["labels"],
                     token_mask=batch.get("token_mask"))


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients of `params`, the same tensor on every rank, whatever
    mixes of plain tensors and DTensors (FSDP shards on the dense mesh, expert weights on the
    expert mesh) they are: local sums of squares, all-reduced over each mesh dimension a
    gradient is sharded along. No host synchronisation."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            dims = tuple(i for i, pl in enumerate(g.placements) if isinstance(pl, Shard))
            groups.setdefault((id(g.device_mesh), dims), []).append(g)
        else:
            groups.setdefault((None, ()), []).append(g)
    total = None
    for (_, dims), grads in groups.items():
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        sq = torch.stack([t.float().pow(2).sum() for t in local]).sum()
        for dim in dims:
            dist.all_reduce(sq, group=grads[0].device_mesh.get_group(dim))
        total = sq if total is None else total + sq.to(total.device)
    return torch.zeros(()) if total is None else total.sqrt()


@dataclass
class StepResult:
    loss: float  # the step's LM loss: target-token sum over every micro-batch and rank / their count
    rank_loss: float  # this rank's own: its target-token sum / its targets
    aux: float  # the weighted MoE auxiliary losses, averaged over micro-batches and ranks
    grad_norm: float  # nan when the step was skipped
    skipped: bool  # some rank's loss or the gradient norm was non-finite: no update anywhere
    targets: int  # target tokens of the step (every rank)
    rank_targets: int  # this rank's


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *,
               dims: ParallelDims, device: torch.device, autocast: bool = False,
               grad_clip: float | None = None, poison: bool = False) -> StepResult:
    """One optimizer step over this rank's `micro_batches` (every rank calls it with as many).

    The LM loss is cross-entropy summed over target tokens and divided by the target tokens of
    the whole step, counted over every micro-batch of every rank before the first forward (one
    all-reduce): each micro-batch backpropagates its sum x (world / step targets), which FSDP's
    and `sync_gradients`' mean over ranks turns into sum / step targets, so a token weighs the
    same whatever shares its micro-batch or rank. MoE auxiliary losses are per-batch statistics:
    their mean over micro-batches and ranks is added. Gradients are reduced only in the last
    backward. Then one all-reduce agrees whether every rank's loss was finite; a non-finite step
    drops its gradients everywhere. `poison` makes this rank's loss NaN (the NaN-injection hook).
    Two host synchronisations per step (the finiteness check and the norm), none per micro-batch."""
    accum = len(micro_batches)
    count = torch.tensor([float(sum(int((mb["labels"] != IGNORE).sum()) for mb in micro_batches))], device=device)
    local_targets = count.clone()
    if dims.world > 1:
        dist.all_reduce(count)
    scale = dims.world / count.clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        set_gradient_sync(model, i == accum - 1)
        out = _forward(model, _to_device(mb, device), autocast, device)
        lm = out.loss_sum * float("nan") if poison else out.loss_sum
        (lm * scale[0] + out.aux_total / accum).backward()
        loss_sum += lm.detach()
        aux_sum += out.aux_total.detach() / accum
    stats = torch.stack([loss_sum, aux_sum, (~torch.isfinite(loss_sum)).float()])
    if dims.world > 1:
        dist.all_reduce(stats)
    total_loss, aux, nonfinite = stats.tolist()
    bad, norm = nonfinite > 0, float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    if not bad:
        sync_gradients(model, dims)
        norm_t = grad_norm(params)
        if grad_clip is not None:
            coef = (grad_clip / (norm_t + 1e-6)).clamp(max=1.0)
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, coef.to(grads[0].device)) if grads else None
        norm = float(norm_t)
        bad = not math.isfinite(norm)  # equal on every rank: computed from reduced gradients
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n = float(count[0])
    return StepResult(loss=total_loss / max(n, 1.0), rank_loss=float(loss_sum) / max(float(local_targets[0]), 1.0),
                      aux=aux / dims.world, grad_norm=norm, skipped=bad, targets=int(n),
                      rank_targets=int(local_targets[0]))


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
                            doc_ids=batch["doc_ids"].to(d.device), token_mask=batch["token_mask"].to(d.device))
            labels = batch["labels"].to(d.device)
            per_token = F.cross_entropy(out.logits.float().transpose(1, 2), labels, ignore_index=IGNORE,
                                        reduction="none")
            token_kinds = batch["token_kinds"].to(d.device)
            for i, kind in enumerate(KINDS):  # a sequence may hold several kinds: by token
                mine = (token_kinds == i) & (labels != IGNORE)
                sums[kind][0] += float(per_token[mine].sum())
                sums[kind][1] += float(mine.sum())
    model.train()
    flat = _all_reduce([x for k in KINDS for x in sums[k]], "sum", d)
    return {f"val/{k}": flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(KINDS) if flat[2 * i + 1] > 0}


RECIPE_COPY = "recipe.yaml"  # the resolved recipe of the newest start, in the run directory
TENSORBOARD_DIR = "tensorboard"  # rank 0's TensorBoard event files, in the run directory


def write_recipe_copy(run_dir: Path, recipe: TrainRecipe, overrides: dict[str, Any] | None, step: int) -> Path:
    """`run_dir/recipe.yaml`: `recipe` resolved (every default filled in; `mm1 train` reads it
    as it is), under a header naming the step the run starts from and, as a one-line YAML
    mapping after `# overrides: `, the overrides given. Every start rewrites it. A resume whose
    resolved recipe differs from the one there first keeps the old file as
    `recipe.until-step-<step>.yaml` (the recipe that trained the steps kept), unless that name is
    taken: then the old file's steps past the resume point were discarded, and so is it."""
    path = run_dir / RECIPE_COPY
    body = recipe.model_dump(mode="json")
    if step > 0 and path.exists() and yaml.safe_load(path.read_text()) != body:
        kept = run_dir / f"recipe.until-step-{step:08d}.yaml"
        if not kept.exists():
            os.replace(path, kept)
    start = f"resumed from step {step}" if step else "started from step 0"
    plain = json.loads(json.dumps(overrides or {}, default=str))  # a Path given in code dumps as its text
    given = yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=10**9).strip()
    header = f"# The resolved recipe (defaults filled in) of the run in this folder, {start}.\n# overrides: {given}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(body, sort_keys=False))
    os.replace(tmp, path)
    return path


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop the records of `path` (metrics JSON lines) past `last_step`, the step a run resumes
    from, so that the steps the resumed run takes replace the ones a killed run logged after its
    checkpoint instead of repeating them; a line a crash cut short goes too. Written to a
    temporary file beside it, then renamed over it (a crash leaves the old or the new file).
    Returns how many lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            keep = line.endswith("\n") and json.loads(line)["step"] <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def _scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) of every number in a metrics record but the step, nested dicts as `a/b`."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and key != "step":
            yield f"{prefix}{key}", float(value)


class _Metrics:
    """Per-step JSON lines, appended to a file trimmed to the step the run starts from (each rank
    its own; rank 0 also the files of ranks the world no longer has); on rank 0, the same numbers
    as TensorBoard scalars (tag = the record's key, `data_skipped/<kind>/<reason>` for nested
    ones), with `purge_step` dropping a killed run's events past the resume point."""

    def __init__(self, run_dir: Path, recipe: TrainRecipe, d: Distributed, start_step: int):
        stem = Path(recipe.log.jsonl).stem
        path = run_dir / (recipe.log.jsonl if d.rank == 0 else f"{stem}.rank{d.rank}.jsonl")
        mine = [path]
        if d.rank == 0:  # the files of ranks the world no longer has: no other rank opens them
            for p in run_dir.glob(f"{stem}.rank*.jsonl"):
                other = re.fullmatch(rf"{re.escape(stem)}\.rank(\d+)\.jsonl", p.name)
                if other and int(other[1]) >= d.world:
                    mine.append(p)
        for p in mine:
            if n := trim_metrics(p, start_step):
                log.info("%s: %d record(s) past step %d dropped: the run goes on from there", p, n, start_step)
        self.file = open(path, "a")
        self.tensorboard = tensorboard_writer(run_dir, recipe, start_step) if d.rank == 0 else None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for tag, value in _scalars(record):
                self.tensorboard.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()  # flushes


def tensorboard_writer(run_dir: Path, recipe: TrainRecipe, start_step: int):
    """A SummaryWriter on run_dir/tensorboard, or None (log.tensorboard false, or the package
    missing: one log line saying how to get it)."""
    if not recipe.log.tensorboard:
        return None
    try:
        # optional (the `tensorboard` extra); torch's writer imports the package itself
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("no TensorBoard logging: the tensorboard package is not installed "
                 "(pip install 'mm1-pipeline[tensorboard]'; log.tensorboard: false silences this)")
        return None
    # purge_step: events of steps after the resume point, left by a killed run, are dropped by
    # TensorBoard's reader, as the resumed run rewrites those steps
    return SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)


def train(recipe: TrainRecipe, run_dir: str | Path, *, resume: bool = True,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `recipe` to `recipe.steps`, checkpointing into `run_dir` (resuming from its newest
    checkpoint when `resume`); rank 0 first writes `run_dir/recipe.yaml` (`write_recipe_copy`:
    the resolved recipe and the `overrides` it was loaded with, for the record). Returns the final
    metrics: step, loss (the step's target-weighted loss over every rank), losses per step of this
    invocation, skipped steps, last validation losses. Raises `Diverged` after `max_bad_steps`
    consecutive non-finite steps, StartError when the mesh does not fit the world or the initial
    weights do not fit the model."""
    d = init_distributed()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(recipe.seed, recipe.deterministic)
    nan_at, stop_after = _env_hooks(d.rank)
    try:
        tokenizer = TextTokenizer.from_file(recipe.data.tokenizer)
        autocast = d.device.type == "cuda" and recipe.precision == "bf16"
        try:
            cfg = model_config(recipe, tokenizer._tok.get_vocab_size(), tokenizer.image_id)
            moe = cfg.decoder.moe
            dims = dims_for(recipe.parallel, d.world, moe.n_experts if moe is not None else None)
            model = build_model(recipe, cfg, dims, d.device, bf16=autocast)
        except StartError:
            raise
        except ValueError as e:  # every rank raises it: the checks are on data all ranks share
            raise StartError(f"{recipe.name}: cannot start on {d.world} rank(s): {e}") from None
        n_params = sum(p.numel() for p in model.parameters())
        n_active = n_params - _inactive_expert_params(cfg)
        model.train()
        peak = mm1_peak_lr(n_active) if recipe.optim.lr == "mm1" else float(recipe.optim.lr)
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
            log.info("resumed from %s at step %d", latest, step)
            # the next step's lr from this recipe's schedule: the saved groups hold the old one's,
            # which differs when `steps` (the cosine's length) or the warmup changed
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * factor
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if d.rank == 0:
            log.info("%s: %s, %.1fM parameters (%.1fM active), peak lr %.3g, %d steps, world %d on %s, mesh dp_replicate=%d "
                     "dp_shard=%d ep=%d", recipe.name, recipe.model.name, n_params / 1e6, n_active / 1e6, peak, recipe.steps,
                     d.world, d.device, dims.dp_replicate, dims.dp_shard, dims.ep)
            write_recipe_copy(run_dir, recipe, overrides, step)

        return _loop(recipe, run_dir, d, dims, model, optimizer, scheduler, step, skipped, losses, loader_state,
                     autocast, nan_at, stop_after)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Throughput:
    """Model FLOPs (MFU) and hardware FLOPs (HFU, with recomputation) of each step, from the
    batches' real tokens, the attention their document masks let run, and their images
    (train/flops.py); the device's bf16 peak."""

    def __init__(self, model: nn.Module, recipe: TrainRecipe, device: torch.device):
        tower_trainable = any(p.requires_grad for p in model.vision.parameters())
        self.mf = ModelFlops.from_config(model.cfg, tower_trainable=tower_trainable)
        p = recipe.parallel
        self.recompute = p.activation_checkpointing
        self.fraction = recomputed_fraction(p.activation_checkpointing, p.ac_every, model.cfg.decoder.n_layers)
        self.tower_fraction = recomputed_fraction(p.activation_checkpointing, p.ac_every,
                                                  len(model.vision.tower.transformer.resblocks))
        self.peak = peak_flops(torch.cuda.get_device_name(device)) \
            if device.type == "cuda" and recipe.precision == "bf16" else None

    def batch(self, batch: dict) -> list[float]:
        """[real tokens, images, model FLOPs, hardware FLOPs, tower FLOPs] of one micro-batch."""
        mask = batch.get("token_mask")
        if mask is None:
            mask = torch.ones_like(batch["tokens"], dtype=torch.bool)
        real, images = int(mask.sum()), 0 if batch["images"] is None else int(batch["images"].shape[0])
        f = batch_flops(self.mf, real_tokens=real, causal_pairs=causal_pairs(batch["doc_ids"], mask), images=images,
                        recompute=self.recompute, recompute_fraction=self.fraction,
                        tower_recompute_fraction=self.tower_fraction)
        return [float(real), float(images), f["model"], f["hardware"], f["tower"]]


def _loop(recipe, run_dir, d, dims, model, optimizer, scheduler, step, skipped, losses, loader_state, autocast,
          nan_at, stop_after) -> dict[str, Any]:
    accum = recipe.data.grad_accum
    throughput = _Throughput(model, recipe, d.device)
    metrics = _Metrics(run_dir, recipe, d, step)
    consecutive, val = 0, {}
    description = describe(model)  # in every checkpoint, so `mm1 export` needs only the folder
    loader = _loader(recipe, model, recipe.data.outs, d, steps=recipe.steps * accum, repeat=True, state=loader_state)
    try:
        batches = iter(loader)
        while step < recipe.steps:
            step += 1
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            counts = [sum(x) for x in zip(*(throughput.batch(mb) for mb in micro))]
            result = train_step(model, optimizer, micro, dims=dims, device=d.device, autocast=autocast,
                                grad_clip=recipe.optim.grad_clip, poison=step in nan_at)
            if result.skipped:
                skipped += 1
                consecutive += 1
            else:
                consecutive = 0
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            tok_sum, img_sum, model_flops, hw_flops, tower_flops = _all_reduce(counts, "sum", d)
            losses.append(result.loss)
            dt = time.perf_counter() - t0
            peak = throughput.peak
            record = {"step": step, "loss": result.loss, "rank_loss": result.rank_loss, "aux_loss": result.aux,
                      "targets": result.targets, "rank_targets": result.rank_targets, "rank_images": counts[1], "lr": lr, "grad_norm": result.grad_norm,
                      "skipped": result.skipped, "skipped_total": skipped, "tokens_per_s": tok_sum / dt,
                      "mfu": model_flops / dt / d.world / peak if peak else None,
                      "hfu": hw_flops / dt / d.world / peak if peak else None,
                      "tower_flops_share": tower_flops / model_flops if model_flops else None,
                      # bad samples skipped by this rank's loader workers, cumulative, by kind/reason
                      "data_skipped": micro[-1].get("skipped", {}),
                      "data_dropped_on_reshard": micro[-1].get("dropped_on_reshard", 0),
                      "data_retried": micro[-1].get("retried", 0),
                      "memory_gib": _peak_memory_gib(d.device)}
            if recipe.validation.outs and step % recipe.validation.every == 0:
                val = validate(model, recipe, d, autocast)
                record.update(val)
            metrics.write(record)
            bad = result.skipped
            if d.rank == 0 and (step % recipe.log.every == 0 or step == recipe.steps or bad):
                log.info("step %d loss %.4f lr %.3g grad %.3g tok/s %.0f%s mem %.2fGiB%s", step, result.loss, lr,
                         result.grad_norm, record["tokens_per_s"],
                         f" mfu {record['mfu']:.1%} hfu {record['hfu']:.1%}" if record["mfu"] is not None else "",
                         record["memory_gib"], " SKIPPED (non-finite)" if bad else "")
            if consecutive >= recipe.max_bad_steps:
                raise Diverged(f"{consecutive} consecutive non-finite steps (last: step {step})")
            if not bad and (step % recipe.checkpoint.every == 0 or step == recipe.steps):
                # the RNG states are saved and restored per rank by train/checkpoint.py (a rank
                # that did not exist at save time is seeded from (step, rank) there)
                extra = {"loader": loader.state_dict(), "step": step, "skipped": skipped}
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
