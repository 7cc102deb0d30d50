"""The one place parallelism is applied (torchtitan's `parallelize.py`): the model code in
train/model/ is written for one device, and this step wraps it, in torchtitan's fixed order:

1. activation checkpointing per decoder block (`checkpoint_wrapper`, non-reentrant): each block's
   activations are recomputed in backward instead of stored. The wrapper's state-dict hooks keep
   the parameter names of the unwrapped model, so checkpoints do not depend on this setting.
2. `torch.compile` per decoder block, in place (`Module.compile`: parameter names unchanged).
   Per block rather than whole-model: the blocks are identical, so one graph is compiled and reused.
3. FSDP2 (`fully_shard`) per decoder block, then the vision tower and the connector (each its own
   group, so that a rank whose batch has no image can still run them on a dummy image and join
   their collectives: see `train/trainer.py`), then the root (embeddings, final norm, output head). On CUDA with bf16 the parameters are gathered
   in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy).

Without FSDP on several ranks the parameters are replicated and `sync_gradients` averages the
gradients after backward (one all-reduce per parameter: the small-scale path; large runs use
FSDP). Every step is optional.

On CPU with the gloo backend (torch 2.14), replication and FSDP2 with activation checkpointing
both work and are tested (tests/train/test_trainer.py; DTensor warns that its random ops may be
incomplete on a CPU mesh, which only affects how the sharded decoder's initial weights are drawn).
Compile is not tested here: on CPU it needs a C++ compiler at run time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from train.recipe import ParallelSection


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = model.decoder.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    for block in model.decoder.layers:
        block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, device: torch.device, bf16: bool) -> None:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # older spellings of the same API
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    layers = model.decoder.layers
    for i, block in enumerate(layers):
        # the last block's parameters are needed right away in backward: no point resharding them
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model.vision, mesh=mesh, mp_policy=mp)
    fully_shard(model.connector, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(model: nn.Module, cfg: ParallelSection, device: torch.device, *, bf16: bool = False) -> nn.Module:
    """Apply what `cfg` asks for to `model` (an MM1), in place; returns it. FSDP needs an
    initialised process group; `bf16` gathers parameters in bf16 under FSDP."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if cfg.fsdp:
        if not dist.is_initialized():
            raise RuntimeError("parallel.fsdp needs a process group (launch with torchrun)")
        apply_fsdp(model, device, bf16)
    return model


def sync_gradients(model: nn.Module) -> None:
    """Average gradients over ranks for a replicated (non-FSDP) model. A parameter without a
    gradient on this rank (an unused MoE expert, an image path in a text-only batch) joins with
    zeros, so every rank makes the same calls in the same order and none waits forever."""
    world = dist.get_world_size()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
