"""The mixture-of-experts feed-forward of MM1's MoE decoders (MM1 §3.5, after GShard, Switch and
ST-MoE): a linear router picks the top-k of `n_experts` SwiGLU experts for every real token, and
two auxiliary losses (load balance, router z) keep the router healthy.

One forward path for every layout (no Python loop over tokens):

1. route (fp32): softmax over the experts, top-k, gates; padding (`token_mask` False) is never
   routed and never counted;
2. keep or drop: with `capacity_factor` set, expert e keeps its first C assignments, C =
   ceil(capacity_factor * real tokens * k / n_experts), all first choices ahead of any second
   choice and earlier tokens first; with None (dropless) it keeps them all;
3. permute the kept assignments into rows grouped by expert;
4. [expert parallel] send each row to the rank that holds its expert (all-to-all);
5. run every expert on its contiguous rows (`grouped_swiglu`);
6. [expert parallel] send the outputs back;
7. un-permute: y[t] = sum over t's kept choices of gate * expert output (0 if none is kept).

Capacity counts the tokens of this forward on this rank only (GShard's local groups), so routing
does not depend on how many ranks share the experts. Single device is the expert-parallel path
with no group; `train/expert_parallel.py` shards the experts and does the exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from train.model.expert_exchange import combine, dispatch, gather_expert_shards
from train.model.config import DecoderConfig, MoEConfig


def expert_capacity(n_tokens: int | Tensor, moe: MoEConfig) -> int | Tensor | None:
    """Slots per expert for a forward over `n_tokens` real tokens: ceil(capacity_factor * tokens *
    k / experts), at least 1 and at most `n_tokens` (an expert never gets a token twice), or None
    when `capacity_factor` is None (dropless). A tensor count gives a tensor (no host sync)."""
    if moe.capacity_factor is None:
        return None
    if isinstance(n_tokens, Tensor):  # same float64 arithmetic as the int branch
        cap = torch.ceil(n_tokens.double() * moe.capacity_factor * moe.top_k / moe.n_experts).long()
        return torch.minimum(cap, n_tokens).clamp(min=1)
    cap = math.ceil(moe.capacity_factor * n_tokens * moe.top_k / moe.n_experts)
    return max(1, min(cap, n_tokens))


def aux_loss(aux_losses: dict[str, Tensor], moe: MoEConfig) -> Tensor:
    """The weighted sum the trainer adds to the language-model loss: load_balance_coef * lb +
    router_z_coef * z (for one layer's losses, or for losses already summed over layers)."""
    return moe.load_balance_coef * aux_losses["load_balance"] + moe.router_z_coef * aux_losses["router_z"]


def moe_param_counts(cfg: DecoderConfig) -> tuple[int, int]:
    """(total, active) parameters of one MoE feed-forward: active counts the router and the top_k
    experts a token runs through, which is what sets the compute per token."""
    assert cfg.moe is not None, "moe_param_counts needs a DecoderConfig with moe set"
    hidden = cfg.moe.expert_hidden or cfg.hidden
    router = cfg.dim * cfg.moe.n_experts
    expert = 3 * cfg.dim * hidden
    return router + cfg.moe.n_experts * expert, router + cfg.moe.top_k * expert


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def can_use_grouped_mm(rows: Tensor, w1: Tensor) -> bool:
    """Whether `torch._grouped_mm` (CUTLASS grouped GEMM) serves these shapes: CUDA sm90+, bf16
    compute, and dim and hidden multiples of 8 (16-byte aligned rows)."""
    return (
        hasattr(torch, "_grouped_mm")
        and rows.is_cuda
        and torch.cuda.get_device_capability(rows.device) >= (9, 0)
        and _compute_dtype(rows) == torch.bfloat16
        and rows.shape[-1] % 8 == 0
        and w1.shape[1] % 8 == 0
    )


def grouped_swiglu(
    rows: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, *, grouped_mm: bool | None = None
) -> Tensor:
    """SwiGLU experts on contiguous row ranges: rows [N, D] hold counts[0] rows for expert 0, then
    counts[1] for expert 1, ...; rows past counts.sum() are skipped. w1, w3 [E, H, D], w2 [E, D, H].
    Returns [N, D] in the compute dtype (autocast's, else the rows'), zeros for skipped rows.
    `grouped_mm`: True forces `torch._grouped_mm`, False a loop of plain matmuls over the experts
    (one host sync for the row counts), None picks by `can_use_grouped_mm`."""
    if grouped_mm is None:
        grouped_mm = can_use_grouped_mm(rows, w1)
    dtype = _compute_dtype(rows)
    rows, w1, w2, w3 = (t.to(dtype) for t in (rows, w1, w2, w3))
    return (_swiglu_grouped_mm if grouped_mm else _swiglu_loop)(rows, counts, w1, w2, w3)


def _swiglu_loop(rows: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    sizes = counts.tolist()
    tail = rows.shape[0] - sum(sizes)
    outs = [
        F.linear(F.silu(F.linear(h, w1[e])) * F.linear(h, w3[e]), w2[e])
        for e, h in enumerate(rows.split(sizes + [tail])[:-1])
    ]
    return torch.cat(outs + [rows.new_zeros(tail, w2.shape[1])])


def _swiglu_grouped_mm(
    rows: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, align: int = 8
) -> Tensor:
    # Each expert's group is padded to a multiple of `align` rows: the weight-gradient GEMM
    # contracts over a group's rows, which CUTLASS needs 16-byte aligned (8 bf16 rows). Index
    # arithmetic on the device only: no host sync.
    n_rows, n_experts, device = rows.shape[0], counts.numel(), rows.device
    ends = counts.cumsum(0)
    starts = ends - counts
    padded = (counts + align - 1) // align * align
    p_ends = padded.cumsum(0)
    p_starts = p_ends - padded
    q = torch.arange(n_rows + n_experts * (align - 1), device=device)  # bounds the padded rows
    e_q = torch.searchsorted(p_ends, q, right=True).clamp(max=n_experts - 1)
    within = q - p_starts[e_q]
    src = torch.where((within < counts[e_q]) & (q < p_ends[-1]), starts[e_q] + within, n_rows)
    h = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])[src]  # row n_rows: zeros
    offs = p_ends.to(torch.int32)
    a = torch._grouped_mm(h, w1.transpose(-2, -1), offs=offs)
    b = torch._grouped_mm(h, w3.transpose(-2, -1), offs=offs)
    out = torch._grouped_mm(F.silu(a) * b, w2.transpose(-2, -1), offs=offs)  # rows past offs[-1]: unset
    i = torch.arange(n_rows, device=device)
    e_i = torch.searchsorted(ends, i, right=True)  # n_experts: a skipped row
    e_c = e_i.clamp(max=n_experts - 1)
    out = out[p_starts[e_c] + i - starts[e_c]]
    return torch.where((e_i < n_experts).unsqueeze(-1), out, 0)


@dataclass
class Routing:
    """Where one forward's tokens go. T tokens, E experts, k choices. The k*T (token, choice)
    assignments are numbered choice-major: assignment a = j*T + t is token t's j-th choice."""

    logits: Tensor  # [T, E] fp32
    probs: Tensor  # [T, E] fp32, softmax of logits
    experts: Tensor  # [T, k] long, the chosen experts, most probable first
    gates: Tensor  # [T, k] fp32, the weights of the chosen experts' outputs
    kept: Tensor  # [T, k] bool: a real token's assignment that got a place at its expert
    real: Tensor  # [T] bool: not padding
    n_real: Tensor  # () long, real tokens
    counts: Tensor  # [E] long, real assignments per expert (before the capacity cut)
    kept_counts: Tensor  # [E] long, kept assignments per expert
    capacity: Tensor  # () long, C (dropless: the busiest expert's count)
    order: Tensor  # [k*T] long: the kept assignments grouped by expert (priority order), then the rest


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts, a drop-in for the dense feed-forward of a decoder layer.

    forward(x [B, S, D], token_mask [B, S] bool or None) -> (y [B, S, D], {"load_balance": lb,
    "router_z": z}), the losses unweighted (weight them with `aux_loss`). token_mask False marks
    padding: it is not routed, gets y = 0, and counts in neither capacity nor the losses, so the
    real tokens route exactly as they would without it. A token dropped by every chosen expert also
    gets y = 0: the decoder's residual connection carries it through the layer unchanged.

    Gates: the top-k probabilities renormalised to sum to 1 (ST-MoE, Mixtral); with top_k == 1 the
    raw probability (Switch), else the router would get no task gradient.

    Expert weights are stacked as [E, out, in], each slice an nn.Linear weight (w1, w3: dim ->
    hidden; w2: hidden -> dim), so dense FFN weights copy into any expert (sparse upcycling).
    Under expert parallelism (`train.expert_parallel.apply_expert_parallel`) they are DTensors of
    the same global shape, sharded over `ep_group`; this rank computes its `n_experts / ep_size`.

    `last_stats` (detached, for logging): tokens_per_expert (real assignments routed, before the
    capacity cut), dropped_fraction (of the real assignments), capacity. With `record_routing`,
    `last_routing` = (experts [N, k], kept [N, k]) of the N real tokens in token order.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        assert cfg.moe is not None, "MoEFeedForward needs a DecoderConfig with moe set"
        self.moe = cfg.moe
        n_experts, top_k = cfg.moe.n_experts, cfg.moe.top_k
        assert 1 <= top_k <= n_experts, f"top_k={top_k} must be in [1, n_experts={n_experts}]"
        dim, hidden = cfg.dim, cfg.moe.expert_hidden or cfg.hidden
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # gate projection
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # up projection
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # down projection
        self.ep_group: dist.ProcessGroup | None = None  # set by apply_expert_parallel
        self.ep_size, self.ep_rank = 1, 0
        self.last_stats: dict[str, Tensor] = {}
        self.record_routing = False
        self.last_routing: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """Truncated-normal init (Llama/torchtitan style); `out_std` for w2 lets the decoder scale
        the residual-branch output by depth. Safe on the meta device; call again after
        `to_empty()` to materialise."""
        for w in (self.router.weight, self.w1, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=init_std, a=-3 * init_std, b=3 * init_std)
        std = init_std if out_std is None else out_std
        nn.init.trunc_normal_(self.w2, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def route(self, x: Tensor, token_mask: Tensor | None = None) -> Routing:
        """Route T tokens x [T, D]; token_mask [T] (True: real). The router runs in fp32 (ST-MoE:
        its softmax and logsumexp are where bf16 round-off hurts). No host sync."""
        n_tokens, n_experts, top_k = x.shape[0], self.moe.n_experts, self.moe.top_k
        with torch.autocast(x.device.type, enabled=False):  # autocast would run it in bf16
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_probs, experts = probs.topk(top_k, dim=-1)
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if top_k > 1 else top_probs
        real = torch.ones(n_tokens, dtype=torch.bool, device=x.device)
        if token_mask is not None:
            real = token_mask.reshape(n_tokens).to(device=x.device, dtype=torch.bool)
        n_real = real.sum()

        # Choice-major assignments; padding takes the extra expert id E, which sorts after every
        # real one, so the real assignments rank within their experts as if padding were absent.
        flat_expert = torch.where(real, experts.t(), n_experts).reshape(-1)  # [k*T]
        counts = torch.zeros(n_experts + 1, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        by_expert = torch.argsort(flat_expert, stable=True)
        starts = counts.cumsum(0) - counts
        position = torch.empty_like(flat_expert)  # of each assignment within its expert
        arange = torch.arange(flat_expert.numel(), device=x.device)
        position[by_expert] = arange - starts[flat_expert[by_expert]]
        counts = counts[:n_experts]
        capacity = expert_capacity(n_real, self.moe)
        if capacity is None:  # dropless
            kept = flat_expert < n_experts
            capacity, kept_counts = counts.max(), counts
        else:
            kept = (flat_expert < n_experts) & (position < capacity)
            kept_counts = torch.minimum(counts, capacity)
        order = torch.argsort(torch.where(kept, flat_expert, n_experts), stable=True)
        kept = kept.view(top_k, n_tokens).t()
        return Routing(logits, probs, experts, gates, kept, real, n_real, counts, kept_counts, capacity, order)

    def local_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(w1, w2, w3) of the experts this rank computes (all of them without expert parallelism)."""
        local = tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        if getattr(self, "replica_group", None) is None:
            return local
        return tuple(gather_expert_shards(self, name, w) for name, w in zip(("w1", "w2", "w3"), local))

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        bsz, seq, dim = x.shape
        n_experts, top_k = self.moe.n_experts, self.moe.top_k
        flat = x.reshape(-1, dim)
        n_tokens = flat.shape[0]
        r = self.route(flat, token_mask)

        # Permute (assignment a is token a % T), exchange, run the experts, exchange back.
        rows, counts, exchange = dispatch(flat[r.order % n_tokens], r.kept_counts, self.ep_group)
        out = combine(grouped_swiglu(rows, counts, *self.local_weights()), exchange)

        # Un-permute (out holds zeros past the kept rows) and mix each token's choices by gate.
        inverse = torch.empty_like(r.order)
        inverse[r.order] = torch.arange(r.order.numel(), device=x.device)
        gates = torch.where(r.kept, r.gates, 0).t().unsqueeze(-1).to(out.dtype)  # [k, T, 1]
        y = (out[inverse].view(top_k, n_tokens, -1) * gates).sum(dim=0)

        # Means over real tokens only. Switch/GShard load balance: f_e (share of the real
        # assignments, before the capacity cut) carries no gradient; P_e (mean router probability)
        # does; minimum 1 when uniform. ST-MoE z-loss: mean squared logsumexp of the logits.
        n = r.n_real.clamp(min=1)
        f = r.counts.float() / (n * top_k)
        p = torch.where(r.real.unsqueeze(-1), r.probs, 0).sum(dim=0) / n
        load_balance = n_experts * (f * p).sum()
        router_z = torch.where(r.real, torch.logsumexp(r.logits, dim=-1).square(), 0).sum() / n

        with torch.no_grad():
            self.last_stats = {
                "tokens_per_expert": r.counts.detach(),
                "dropped_fraction": (r.counts.sum() - r.kept.sum()) / (n * top_k).float(),
                "capacity": r.capacity.detach(),
            }
            if self.record_routing:
                self.last_routing = (r.experts[r.real], r.kept[r.real])
        return y.view(bsz, seq, dim), {"load_balance": load_balance, "router_z": router_z}
