"""Expert parallelism for the MoE feed-forwards (train/model/moe.py): the experts of every MoE
layer are split over a group of `ep` ranks, and each token row travels to the rank holding its
expert and back by all-to-all.

- `apply_expert_parallel` turns each layer's stacked expert weights (w1, w3 [E, H, D], w2
  [E, D, H]) into DTensors of the same global shape, Shard(0) over the mesh's "ep" dimension
  and Replicate() over any other (state-dict names and shapes unchanged);
- `expert_parameters` lists those DTensors: FSDP leaves them alone; the trainer all-reduces
  their gradients over the replicas of each expert shard, or, when they are split over those
  replicas too (FSDP-style, so that a rank holds 1 / world of the experts), they arrive
  reduce-scattered (`gather_expert_shards`);
- `dispatch` / `combine` are the exchange the MoE forward runs (identity without a group).

Routing, capacity included, happens on each rank over its own tokens before anything is sent,
so a rank routes its micro-batch exactly as a single process would. Tested with gloo on CPU
(tests/train/test_expert_parallel.py); written for nccl too. The row counts become host
integers (the all-to-all split sizes): one host sync per MoE layer forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

EXPERT_WEIGHTS = ("w1", "w2", "w3")


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    from train.model.moe import MoEFeedForward  # moe.py imports this module

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


class _GatherShards(torch.autograd.Function):
    """A rank's dim-1 shard of a weight -> the whole weight (all-gather over the replicas); its
    backward reduce-scatters (sums) the whole gradient back to the shard, in fp32, or, while the
    layer's `replica_sync` is off, keeps it whole in the layer's buffer and returns zeros, to be
    added into the reduce-scatter of the accumulation's last backward."""

    @staticmethod
    def forward(ctx, shard: Tensor, layer: nn.Module, name: str) -> Tensor:
        group = layer.replica_group
        ctx.layer, ctx.name, ctx.dtype = layer, name, shard.dtype
        n = dist.get_world_size(group)
        front = shard.transpose(0, 1).contiguous()  # dim 1 first: all_gather_into_tensor joins dim 0
        whole = front.new_empty((front.shape[0] * n, *front.shape[1:]))
        dist.all_gather_into_tensor(whole, front, group=group)
        return whole.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        layer, name = ctx.layer, ctx.name
        grad = grad.float()
        held = layer.replica_grads.pop(name, None)
        if held is not None:
            grad = grad + held
        group = layer.replica_group
        n = dist.get_world_size(group)
        if not layer.replica_sync:
            layer.replica_grads[name] = grad
            return grad.new_zeros((grad.shape[0], grad.shape[1] // n, *grad.shape[2:])).to(ctx.dtype), None, None
        front = grad.transpose(0, 1).contiguous()
        mine = front.new_empty((front.shape[0] // n, *front.shape[1:]))
        dist.reduce_scatter_tensor(mine, front, group=group)
        return mine.transpose(0, 1).contiguous().to(ctx.dtype), None, None


def gather_expert_shards(layer: nn.Module, name: str, shard: Tensor) -> Tensor:
    """This rank's experts of `layer`'s weight `name`, whole, from its replica shard (bf16 under
    autocast: half the traffic, the matmuls run in bf16 anyway; gradients reduce in fp32)."""
    if torch.is_autocast_enabled(shard.device.type):
        shard = shard.to(torch.get_autocast_dtype(shard.device.type))
    return _GatherShards.apply(shard, layer, name)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 with split sizes; its backward is the reverse exchange."""

    @staticmethod
    def forward(
        ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
    ) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-to-all of rows: x [sum(in_splits), ...], in_splits[r] rows to rank r;
    returns [sum(out_splits), ...], out_splits[r] rows from rank r, in rank order."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class Exchange:
    """What `combine` needs to send a dispatch's rows back."""

    group: dist.ProcessGroup
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    regroup: Tensor  # received rows (by source rank, then expert) -> rows by local expert
    n_rows: int  # rows of the dispatch's input


def dispatch(
    rows: Tensor, counts: Tensor, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Exchange | None]:
    """Send rows to the ranks holding their experts. rows [N, D]: counts[e] rows for global expert
    e, experts in order, then rows that go nowhere; counts [E], E = ep * local experts, rank r
    holding experts [r * E/ep, (r+1) * E/ep). Returns (rows [M, D] grouped by local expert,
    counts [E/ep], the exchange for `combine`). With no group: (rows, counts, None)."""
    if group is None:
        return rows, counts, None
    ep = dist.get_world_size(group)
    n_local = counts.numel() // ep
    recv_counts = torch.empty_like(counts)  # [source rank, local expert]
    dist.all_to_all_single(recv_counts, counts, group=group)
    send_splits, recv_splits = torch.stack([counts, recv_counts]).view(2, ep, n_local).sum(-1).tolist()
    received = all_to_all(rows[: sum(send_splits)], recv_splits, send_splits, group)
    # Rows arrive grouped by source rank, then local expert; the experts want them by expert.
    expert = torch.arange(n_local, device=rows.device).repeat(ep)
    expert = expert.repeat_interleave(recv_counts, output_size=received.shape[0])
    regroup = torch.argsort(expert, stable=True)
    local_counts = recv_counts.view(ep, n_local).sum(0)
    return received[regroup], local_counts, Exchange(group, send_splits, recv_splits, regroup, rows.shape[0])


def combine(out: Tensor, exchange: Exchange | None) -> Tensor:
    """The inverse of `dispatch` for the expert outputs out [M, D']: each row back to its sender,
    in the order of the dispatch's input rows, with zero rows for those that went nowhere."""
    if exchange is None:
        return out
    inverse = torch.empty_like(exchange.regroup)
    inverse[exchange.regroup] = torch.arange(inverse.numel(), device=inverse.device)
    back = all_to_all(out[inverse], exchange.send_splits, exchange.recv_splits, exchange.group)
    return torch.cat([back, back.new_zeros(exchange.n_rows - back.shape[0], *back.shape[1:])])
