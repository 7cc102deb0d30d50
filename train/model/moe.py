"""The mixture-of-experts feed-forward of MM1's MoE decoders (MM1 §3.5, after GShard, Switch
and ST-MoE): a linear router picks the top-k of `n_experts` SwiGLU experts for every token, each
expert takes at most `capacity` tokens per forward, and two auxiliary losses keep the router
healthy (a load-balance loss and a router z-loss).

Written for one device, like the rest of `train/model/`: expert parallelism, if ever wanted,
belongs in the parallelize step, not here.

How a forward runs (no Python loop over tokens or experts):

1. route: router logits (fp32) -> softmax -> top-k experts and gates for each token;
2. assign capacity slots: the k*T (token, expert) assignments are sorted by expert (stably, with
   all first choices ahead of all second choices, and earlier tokens ahead of later ones), and the
   i-th assignment of expert e gets slot e*C + i if i < C, else it is dropped;
3. dispatch: gather the tokens into an [E, C, D] buffer (empty slots hold zeros);
4. run every expert on its C rows with three batched matmuls;
5. combine: gather each assignment's row back, scale it by its gate, and sum the k rows per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.model.config import DecoderConfig, MoEConfig


def expert_capacity(n_tokens: int, moe: MoEConfig) -> int | None:
    """Slots per expert for a forward over `n_tokens` tokens: ceil(capacity_factor * tokens * k /
    experts), at most `n_tokens` (an expert never gets a token twice), or None when
    `capacity_factor` is None (no token is ever dropped)."""
    if moe.capacity_factor is None:
        return None
    cap = math.ceil(moe.capacity_factor * n_tokens * moe.top_k / moe.n_experts)
    return max(1, min(cap, n_tokens))


def aux_loss(aux_losses: dict[str, Tensor], moe: MoEConfig) -> Tensor:
    """The weighted sum the trainer adds to the language-model loss (per MoE layer; sum or average
    over layers is the caller's choice): load_balance_coef * lb + router_z_coef * z."""
    return moe.load_balance_coef * aux_losses["load_balance"] + moe.router_z_coef * aux_losses["router_z"]


def moe_param_counts(cfg: DecoderConfig) -> tuple[int, int]:
    """(total, active) parameters of one MoE feed-forward: active counts the router and the top_k
    experts a token runs through, which is what sets the compute per token."""
    assert cfg.moe is not None, "moe_param_counts needs a DecoderConfig with moe set"
    hidden = cfg.moe.expert_hidden or cfg.hidden
    router = cfg.dim * cfg.moe.n_experts
    expert = 3 * cfg.dim * hidden
    return router + cfg.moe.n_experts * expert, router + cfg.moe.top_k * expert


@dataclass
class Routing:
    """Where one forward's tokens go. T tokens, E experts, k choices, C slots per expert.

    `slots[t, j]` is the row of the flattened [E*C, D] expert buffer that holds token t's j-th
    choice, or E*C when that assignment was dropped for capacity."""

    logits: Tensor  # [T, E] fp32
    probs: Tensor  # [T, E] fp32, softmax of logits
    experts: Tensor  # [T, k] long, the chosen experts, most probable first
    gates: Tensor  # [T, k] fp32, the weights of the chosen experts' outputs
    slots: Tensor  # [T, k] long
    counts: Tensor  # [E] long, assignments routed to each expert (before any drop)
    capacity: int  # C

    @property
    def kept(self) -> Tensor:
        """[T, k] bool: the assignment got a slot (its expert's output is used)."""
        return self.slots < self.counts.numel() * self.capacity


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts, a drop-in for the dense feed-forward of a decoder layer.

    forward(x [B, S, D]) -> (y [B, S, D], {"load_balance": lb, "router_z": z}), the losses
    unweighted (weight them with `aux_loss`). A token dropped by every chosen expert gets y = 0,
    so the decoder's residual connection carries it through the layer unchanged.

    Gates: the top-k probabilities renormalised to sum to 1 (ST-MoE, Mixtral). The output is then
    a convex mix of the chosen experts, whose scale does not depend on how sure the router is, and
    the router still learns from the task loss through the ratio between the gates. With top_k == 1
    the renormalised gate would be the constant 1 and the router would get no task gradient, so
    there the raw probability is kept (Switch).

    Expert weights are stacked as [E, out, in], each slice an nn.Linear weight: dense FFN weights
    (w1, w3: dim -> hidden; w2: hidden -> dim) copy into any expert as they are (sparse upcycling),
    and the experts run as batched matmuls.

    `last_stats` holds the last forward's routing numbers for logging, detached (no graph kept):
    tokens_per_expert (assignments routed, before the capacity cut), dropped_fraction (of the k*T
    assignments) and capacity.
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
        self.last_stats: dict[str, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """Truncated-normal init (Llama/torchtitan style); `out_std` for w2 lets the decoder scale
        the residual-branch output by depth. Safe on the meta device; call again after
        `to_empty()` to materialise."""
        for w in (self.router.weight, self.w1, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=init_std, a=-3 * init_std, b=3 * init_std)
        std = init_std if out_std is None else out_std
        nn.init.trunc_normal_(self.w2, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def route(self, x: Tensor) -> Routing:
        """Route T tokens x [T, D]. The router runs in fp32 (ST-MoE: its softmax and logsumexp are
        where bf16 round-off hurts)."""
        n_tokens, n_experts, top_k = x.shape[0], self.moe.n_experts, self.moe.top_k
        logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_probs, experts = probs.topk(top_k, dim=-1)
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if top_k > 1 else top_probs

        # Choice-major order: every token's first choice claims a slot before any second choice.
        flat_expert = experts.t().reshape(-1)  # [k*T]
        counts = torch.zeros(n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        capacity = expert_capacity(n_tokens, self.moe)
        if capacity is None:  # no cap: room for the busiest expert (one host sync per forward)
            capacity = max(int(counts.max()), 1)
        order = torch.argsort(flat_expert, stable=True)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(flat_expert)  # position of each assignment within its expert
        rank[order] = torch.arange(flat_expert.numel(), device=x.device) - starts[flat_expert[order]]
        slots = torch.where(rank < capacity, flat_expert * capacity + rank, n_experts * capacity)
        return Routing(logits, probs, experts, gates, slots.view(top_k, n_tokens).t(), counts, capacity)

    def run_experts(self, h: Tensor) -> Tensor:
        """SwiGLU of every expert on its own rows: h [E, C, D] -> [E, C, D]."""
        a = torch.bmm(h, self.w1.transpose(1, 2))
        b = torch.bmm(h, self.w3.transpose(1, 2))
        return torch.bmm(F.silu(a) * b, self.w2.transpose(1, 2))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        bsz, seq, dim = x.shape
        n_experts, top_k = self.moe.n_experts, self.moe.top_k
        flat = x.reshape(-1, dim)
        n_tokens = flat.shape[0]
        r = self.route(flat)
        n_slots = n_experts * r.capacity

        # Dispatch: which token fills each slot (n_tokens: the zero row appended to the input).
        # Dropped assignments all write the extra entry n_slots, which is cut off before use.
        slot_token = torch.full((n_slots + 1,), n_tokens, dtype=torch.long, device=x.device)
        token = torch.arange(n_tokens, device=x.device).repeat(top_k)  # choice-major, like slots
        slot_token.scatter_(0, r.slots.t().reshape(-1), token)
        padded = torch.cat([flat, flat.new_zeros(1, dim)])
        h = padded[slot_token[:n_slots]].view(n_experts, r.capacity, dim)

        # Combine: each assignment reads its slot's output (a dropped one reads the zero row).
        y = self.run_experts(h).view(n_slots, dim)
        y = torch.cat([y, y.new_zeros(1, dim)])[r.slots]  # [T, k, D]
        out = (y * r.gates.unsqueeze(-1).to(y.dtype)).sum(dim=1)

        # Switch/GShard load balance: f_e (fraction of the k*T assignments, before the capacity
        # cut) carries no gradient; P_e (mean router probability) does. Minimum 1 when uniform.
        f = r.counts.float() / (n_tokens * top_k)
        load_balance = n_experts * (f * r.probs.mean(dim=0)).sum()
        router_z = torch.logsumexp(r.logits, dim=-1).square().mean()  # ST-MoE z-loss

        with torch.no_grad():
            self.last_stats = {
                "tokens_per_expert": r.counts.detach(),
                "dropped_fraction": (~r.kept).float().mean(),
                "capacity": torch.tensor(r.capacity),
            }
        return out.view(bsz, seq, dim), {"load_balance": load_balance, "router_z": router_z}
