"""The one place parallelism is applied (torchtitan's `parallelize.py`): the model code in
train/model/ is written for one device, and this step wraps it, in torchtitan's fixed order:

1. expert parallelism (MoE sizes with `parallel.ep` > 1): each MoE layer's stacked expert
   weights become DTensors sharded over the expert mesh's "ep" dimension
   (train/expert_parallel.py); tokens reach their experts by all-to-all. When the world holds
   several replicas of each expert shard (world > ep), each is also split over them along its
   dim 1 and gathered for the forward (FSDP-style: a rank keeps 1 / world of the experts'
   weights, gradients and AdamW states; gradients reduce-scattered in the last micro-batch's
   backward). FSDP itself leaves these weights alone (`ignored_params`); `sync_gradients`
   finishes their mean.
2. activation checkpointing per block of the decoder and of the vision tower
   (`checkpoint_wrapper`, non-reentrant): "full" wraps every block, "selective" every
   `ac_every`-th (memory traded for less recomputation). The wrapper's state-dict hooks keep the
   parameter names of the unwrapped model, so checkpoints do not depend on this setting.
3. `torch.compile` per block, in place (`Module.compile`: parameter names unchanged). Per block
   rather than whole-model: the blocks are identical, so one graph is compiled and reused.
4. FSDP2 (`fully_shard`) over the dense mesh ("dp_shard", or ("dp_replicate", "dp_shard") for
   HSDP) per decoder block, per tower block, then the rest of the tower and the connector (each
   its own group, so that a rank whose batch has no image can still run them on a blank image
   and join their collectives: see `train/trainer.py`), then the root (embeddings, final norm,
   output head). On CUDA with bf16 the parameters are gathered in bf16 and gradients reduced in
   fp32 (MixedPrecisionPolicy); the sharded master weights stay fp32.

Without sharding on several ranks (`dp_shard` 1) the parameters are replicated and
`sync_gradients` averages the gradients once per optimizer step.

The model may be on the meta device when this runs (the trainer builds it there and loads the
initial weights after sharding, so no rank holds what it does not own).

On CPU with the gloo backend (torch 2.14), replication, FSDP2, HSDP and expert parallelism with
activation checkpointing work and are tested (tests/train/test_layouts.py). Compile is not tested
here: on CPU it needs a C++ compiler at run time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # older spellings of the same API
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from train.expert_parallel import (
    apply_expert_parallel, expert_parameters, experts_shard_replicas, set_expert_gradient_sync,
)
from train.mesh import ParallelDims
from train.recipe import ParallelSection


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks: the decoder's and the vision tower's."""
    return [model.decoder.layers, model.vision.tower.transformer.resblocks]


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 2) -> None:
    """Wrap every block ("full") or every `every`-th one ("selective": blocks 0, every, 2*every...)
    of the decoder and the tower ("none": nothing)."""
    if mode == "none":
        return
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            if mode == "full" or i % every == 0:
                blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                               preserve_rng_state=False)


def recomputed_fraction(mode: str, every: int, n_blocks: int) -> float:
    """The fraction of `n_blocks` blocks whose forward runs again in backward."""
    if mode == "none":
        return 0.0
    if mode == "full":
        return 1.0
    return len(range(0, n_blocks, every)) / n_blocks


def apply_compile(model: nn.Module) -> None:
    for blocks in _block_lists(model):
        for block in blocks:
            block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, mesh, bf16: bool, ignored: set[nn.Parameter] | None = None) -> None:
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    kw = {"mesh": mesh, "mp_policy": mp}
    if ignored:
        kw["ignored_params"] = ignored
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            # the last block's parameters are needed right away in backward: no point resharding them
            fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kw)
    fully_shard(model.vision, **kw)
    fully_shard(model.connector, **kw)
    fully_shard(model, **kw)


def parallelize(model: nn.Module, cfg: ParallelSection, dims: ParallelDims, device: torch.device, *,
                bf16: bool = False) -> nn.Module:
    """Apply what `cfg` asks for on the mesh `dims` to `model` (an MM1), in place; returns it.
    Sharding needs an initialised process group (torchrun)."""
    ignored: set[nn.Parameter] = set()
    if dims.ep > 1:
        # with replicas (world > ep) each expert shard is also split over them, FSDP-style
        apply_expert_parallel(model, dims.expert_mesh(device.type), "ep",
                              replica_dim="ep_replicate" if dims.world > dims.ep else None)
        ignored = set(expert_parameters(model))
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    if dims.fsdp:
        if not dist.is_initialized():
            raise RuntimeError("sharding (parallel.dp_shard > 1) needs a process group (launch with torchrun)")
        apply_fsdp(model, dims.dense_mesh(device.type), bf16, ignored)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP: reduce-scatter gradients in this backward (the last micro-batch of an accumulation)
    or keep them unsharded and accumulate locally (the others). No-op without FSDP."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    set_expert_gradient_sync(model, enabled)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def sync_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Once per optimizer step, after the last backward: sum the gradients that no FSDP group
    reduced and divide by the world size, as FSDP's own mean does for the rest. That is every
    dense gradient on a replicated mesh (dp_shard 1), and the expert weights' gradients under
    expert parallelism, summed over the ranks that hold the same experts (each already holds the
    contributions of its whole expert group's tokens, through the all-to-all), unless the
    experts are split over those ranks (then the sum came with the reduce-scatter).

    A parameter without a gradient on this rank (an unused MoE expert, an image path in a
    text-only batch) joins with zeros, so every rank makes the same calls in the same order and
    none waits forever."""
    if dims.world == 1:
        return
    experts, replicas = set(), None
    if dims.ep > 1:
        experts = {id(p) for p in expert_parameters(model)}
        # the ranks holding the same experts (the expert mesh's other dimension), unless the
        # experts are split over them too: then their gradients arrived reduce-scattered
        if dims.world > dims.ep and not experts_shard_replicas(model):
            replicas = expert_parameters(model)[0].device_mesh.get_group("ep_replicate")
    for p in model.parameters():
        if not p.requires_grad or not (id(p) in experts or dims.replicated):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = _local(p.grad)
        if id(p) not in experts:
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
        elif replicas is not None:
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=replicas)
        g.div_(dims.world)
