"""The exchanges an MoE layer runs under expert parallelism (train/expert_parallel.py applies it):
`dispatch` / `combine` send each token row to the rank holding its expert and back by
all-to-all (identity without a group), and `gather_expert_shards` gathers expert weights that
are also split over their replicas (FSDP-style) for a forward and reduce-scatters their gradient
on the last micro-batch. The model (train/model/moe.py) calls these; it never imports the
parallelize step, so the model stays code for one device plus these collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


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
