"""Expert parallelism for the MoE feed-forwards (train/model/moe.py): the experts of every MoE
layer are split over a group of `ep` ranks, and each token row travels to the rank holding its
expert and back by all-to-all.

- `apply_expert_parallel` turns each layer's stacked expert weights (w1, w3 [E, H, D], w2
  [E, D, H]) into DTensors of the same global shape, Shard(0) over the mesh's "ep" dimension
  and Replicate() over any other (state-dict names and shapes unchanged);
- `expert_parameters` lists those DTensors: FSDP leaves them alone, and the trainer all-reduces
  their gradients over the mesh's other dimensions (the replicas of each expert shard);
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


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh, ep_dim: str = "ep") -> None:
    """Shard the experts of every MoE layer of `model` (an MM1, a Decoder, or one MoE layer) over
    `mesh`'s `ep_dim` dimension, in place: w1, w2, w3 become DTensor parameters (Shard(0) over
    `ep_dim`, Replicate() over the other dimensions), and each layer gets `ep_group`, `ep_size`
    and `ep_rank`. The values come from the mesh's first rank (`distribute_tensor` scatters
    them); meta-device weights stay on the meta device (then `to_empty` and init or load). Call
    it once, before the optimizer is built. Raises ValueError when `ep_dim` is not a mesh
    dimension or the ep size does not divide a layer's expert count."""
    names = mesh.mesh_dim_names or ()
    if ep_dim not in names:
        raise ValueError(f"the mesh has dimensions {names}, none named {ep_dim!r}")
    ep = mesh.size(names.index(ep_dim))
    layers = _moe_layers(model)
    for layer in layers:
        if layer.moe.n_experts % ep:
            n_experts = layer.moe.n_experts
            raise ValueError(f"parallel.ep={ep} does not divide the {n_experts} experts of an MoE layer")
    placements = [Shard(0) if name == ep_dim else Replicate() for name in names]
    group, rank = mesh.get_group(ep_dim), mesh.get_local_rank(ep_dim)
    for layer in layers:
        for name in EXPERT_WEIGHTS:
            full = getattr(layer, name).detach()
            setattr(layer, name, nn.Parameter(distribute_tensor(full, mesh, placements)))
        layer.ep_group, layer.ep_size, layer.ep_rank = group, ep, rank


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights `apply_expert_parallel` sharded (DTensors), in module order; empty when
    it was not applied."""
    return [getattr(m, name) for m in _moe_layers(model) if m.ep_group is not None for name in EXPERT_WEIGHTS]


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
