"""Expert parallelism for the MoE feed-forwards (train/model/moe.py): the experts of every MoE
layer are split over a group of `ep` ranks, and each token row travels to the rank holding its
expert and back by all-to-all.

- `apply_expert_parallel` turns each layer's stacked expert weights (w1, w3 [E, H, D], w2
  [E, D, H]) into DTensors of the same global shape, Shard(0) over the mesh's "ep" dimension
  and Replicate() over any other (state-dict names and shapes unchanged);
- `expert_parameters` lists those DTensors: FSDP leaves them alone; the trainer all-reduces
  their gradients over the replicas of each expert shard, or, when they are split over those
  replicas too (FSDP-style, so that a rank holds 1 / world of the experts), they arrive
  reduce-scattered (`gather_expert_shards`, train/model/expert_exchange.py);
- `dispatch` / `combine` (train/model/expert_exchange.py) are the exchange the MoE forward runs
  (identity without a group).

Routing, capacity included, happens on each rank over its own tokens before anything is sent,
so a rank routes its micro-batch exactly as a single process would. Tested with gloo on CPU
(tests/train/test_expert_parallel.py); written for nccl too. The row counts become host
integers (the all-to-all split sizes): one host sync per MoE layer forward.
"""

from __future__ import annotations


from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from train.model.moe import MoEFeedForward

EXPERT_WEIGHTS = ("w1", "w2", "w3")


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh, ep_dim: str = "ep",
                          replica_dim: str | None = None) -> None:
    """Shard the experts of every MoE layer of `model` (an MM1, a Decoder, or one MoE layer) over
    `mesh`'s `ep_dim` dimension, in place: w1, w2, w3 become DTensor parameters (Shard(0) over
    `ep_dim`, Replicate() over the other dimensions), and each layer gets `ep_group`, `ep_size`
    and `ep_rank`. With `replica_dim` (the mesh dimension over which the ranks hold the same
    experts) each expert weight is also split along its dim 1 over that dimension (Shard(1)),
    FSDP-style: a rank keeps 1 / world of the experts' weights, gradients and optimizer states,
    gathers its experts whole for each forward and reduce-scatters their gradients
    (`gather_expert_shards`). The values come from the mesh's first rank (`distribute_tensor`
    scatters them); meta-device weights stay on the meta device (then `to_empty` and init or
    load). Call it once, before the optimizer is built. Raises ValueError when `ep_dim` is not a
    mesh dimension, the ep size does not divide a layer's expert count, or the replicas do not
    divide the weights' dim 1."""
    names = mesh.mesh_dim_names or ()
    if ep_dim not in names:
        raise ValueError(f"the mesh has dimensions {names}, none named {ep_dim!r}")
    ep = mesh.size(names.index(ep_dim))
    replicas = mesh.size(names.index(replica_dim)) if replica_dim is not None else 1
    layers = _moe_layers(model)
    for layer in layers:
        if layer.moe.n_experts % ep:
            n_experts = layer.moe.n_experts
            raise ValueError(f"parallel.ep={ep} does not divide the {n_experts} experts of an MoE layer")
        for name in EXPERT_WEIGHTS:
            if getattr(layer, name).shape[1] % replicas:
                raise ValueError(f"the {replicas} replicas of each expert shard do not divide {name}'s dim 1 "
                                 f"({getattr(layer, name).shape[1]}): choose parallel.ep so that world / ep does")
    placements = [Shard(0) if name == ep_dim else Shard(1) if name == replica_dim and replicas > 1 else Replicate()
                  for name in names]
    group, rank = mesh.get_group(ep_dim), mesh.get_local_rank(ep_dim)
    replica_group = mesh.get_group(replica_dim) if replicas > 1 else None
    for layer in layers:
        for name in EXPERT_WEIGHTS:
            full = getattr(layer, name).detach()
            setattr(layer, name, nn.Parameter(distribute_tensor(full, mesh, placements)))
        layer.ep_group, layer.ep_size, layer.ep_rank = group, ep, rank
        layer.replica_group = replica_group
        layer.replica_sync = True
        layer.replica_grads = {}


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights `apply_expert_parallel` sharded (DTensors), in module order; empty when
    it was not applied."""
    return [getattr(m, name) for m in _moe_layers(model) if m.ep_group is not None for name in EXPERT_WEIGHTS]


def experts_shard_replicas(model: nn.Module) -> bool:
    """The expert weights are split over their replicas too (their gradients arrive summed)."""
    return any(getattr(m, "replica_group", None) is not None for m in _moe_layers(model))


def set_expert_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter the replica-sharded experts' gradients in this backward (the last
    micro-batch of an accumulation), or accumulate them whole until then."""
    for m in _moe_layers(model):
        m.replica_sync = enabled
