"""MoEFeedForward: routing, capacity, padding, auxiliary losses, stats, the grouped expert GEMM,
init and a few training steps (expert parallelism over ranks: tests/train/test_expert_parallel.py).

Every model here has random weights (or weights crafted by the test): these tests check
mechanics (which experts a token reaches, what the losses equal, that gradients flow and a loss
goes down), not what a trained router learns. Tiny configs keep the file to a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.model.config import DecoderConfig, MoEConfig
from train.model.decoder import Decoder
from train.model.moe import MoEFeedForward, aux_loss, expert_capacity, grouped_swiglu, moe_param_counts

DIM, HIDDEN, EXPERTS = 32, 64, 8


def tiny(
    capacity_factor: float | None = None, top_k: int = 2, expert_hidden: int | None = None
) -> DecoderConfig:
    moe = MoEConfig(
        n_experts=EXPERTS, top_k=top_k, capacity_factor=capacity_factor, expert_hidden=expert_hidden
    )
    return DecoderConfig(vocab_size=64, dim=DIM, n_layers=2, n_heads=4, ffn_hidden=HIDDEN, moe=moe)


def build(seed: int = 0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    return MoEFeedForward(tiny(**kw))


def expert_out(m: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e applied directly, as a dense SwiGLU FFN would be."""
    return F.linear(F.silu(F.linear(x, m.w1[e])) * F.linear(x, m.w3[e]), m.w2[e])


def reference(m: MoEFeedForward, x: torch.Tensor, experts, gates, kept) -> torch.Tensor:
    """Per token: the gate-weighted sum of the outputs of its kept chosen experts."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(experts.shape[1]):
            if kept[t, j]:
                out[t] += gates[t, j] * expert_out(m, int(experts[t, j]), flat[t])
    return out.view_as(x)


@torch.no_grad()
def test_top2_output_is_gate_weighted_sum_of_the_two_chosen_experts():
    m = build(capacity_factor=None)
    x = torch.randn(2, 12, DIM)
    y, _ = m(x)
    r = m.route(x.reshape(-1, DIM))
    assert r.experts.shape == (24, 2) and bool(r.kept.all())
    assert (r.experts[:, 0] != r.experts[:, 1]).all()
    # the chosen experts are the two most probable ones
    assert torch.equal(r.experts.sort(dim=1).values, r.probs.topk(2, dim=-1).indices.sort(dim=1).values)
    torch.testing.assert_close(y, reference(m, x, r.experts, r.gates, r.kept), atol=1e-5, rtol=1e-4)
    assert m.last_stats["dropped_fraction"] == 0


@torch.no_grad()
def test_gates_are_the_renormalised_top_k_probabilities():
    m = build()
    r = m.route(torch.randn(40, DIM))
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(40))
    top = r.probs.gather(1, r.experts)
    torch.testing.assert_close(r.gates, top / top.sum(-1, keepdim=True))
    assert (r.gates[:, 0] >= r.gates[:, 1]).all()


@torch.no_grad()
def test_top1_keeps_the_raw_probability_so_the_router_still_learns():
    m = build(top_k=1)
    r = m.route(torch.randn(10, DIM))
    torch.testing.assert_close(r.gates[:, 0], r.probs.max(-1).values)


@torch.no_grad()
def test_load_balance_is_one_for_a_uniform_router():
    """Zero router weights: every probability is 1/E, so lb = E * sum_e f_e / E = 1 whatever
    expert the top-k's tie-breaking picks."""
    m = build()
    m.router.weight.zero_()
    _, aux = m(torch.randn(2, 16, DIM))
    torch.testing.assert_close(aux["load_balance"], torch.tensor(1.0))


@torch.no_grad()
def test_load_balance_is_one_for_evenly_spread_tokens_and_larger_when_collapsed():
    m = build()
    # Cyclic construction: token t leans to experts t%E and (t+1)%E, so f and P are both uniform.
    m.router.weight.copy_(4.0 * torch.eye(EXPERTS, DIM))
    t = torch.arange(4 * EXPERTS)
    x = F.one_hot(t % EXPERTS, DIM).float() + 0.5 * F.one_hot((t + 1) % EXPERTS, DIM).float()
    _, aux = m(x.unsqueeze(0))
    assert torch.equal(m.last_stats["tokens_per_expert"], torch.full((EXPERTS,), 8))
    torch.testing.assert_close(aux["load_balance"], torch.tensor(1.0))

    # Collapse: a direction every token shares sends all of them to experts 0 and 1.
    _, aux = m(_collapse(m, 32))
    assert m.last_stats["tokens_per_expert"].tolist() == [32, 32] + [0] * (EXPERTS - 2)
    assert aux["load_balance"] > 1.0
    torch.testing.assert_close(aux["load_balance"], torch.tensor(EXPERTS / 2), atol=1e-3, rtol=0)


@torch.no_grad()
def test_router_z_loss_is_zero_when_logsumexp_is_zero_and_grows_with_logit_scale():
    m = build()
    # logits all -log(E): sum of exp is 1, every logsumexp is 0
    w = torch.zeros(EXPERTS, DIM)
    w[:, 0] = -math.log(EXPERTS)
    m.router.weight.copy_(w)
    x = torch.randn(1, 16, DIM)
    x[..., 0] = 1.0
    _, aux = m(x)
    torch.testing.assert_close(aux["router_z"], torch.tensor(0.0), atol=1e-6, rtol=0)

    # all-zero logits: logsumexp = log(E)
    m.router.weight.zero_()
    _, aux = m(x)
    torch.testing.assert_close(aux["router_z"], torch.tensor(math.log(EXPERTS) ** 2))

    torch.manual_seed(1)
    base = torch.randn(EXPERTS, DIM)
    zs = []
    for scale in (1.0, 4.0, 16.0):
        m.router.weight.copy_(scale * base)
        zs.append(float(m(x)[1]["router_z"]))
    assert zs[0] < zs[1] < zs[2]


def test_aux_loss_weights_the_two_losses_with_the_config_coefficients():
    moe = MoEConfig(n_experts=8)
    losses = {"load_balance": torch.tensor(1.5), "router_z": torch.tensor(3.0)}
    torch.testing.assert_close(aux_loss(losses, moe), torch.tensor(0.01 * 1.5 + 0.001 * 3.0))


def test_expert_capacity():
    assert expert_capacity(64, MoEConfig(n_experts=8, capacity_factor=1.25)) == 20  # ceil(1.25*64*2/8)
    assert expert_capacity(10, MoEConfig(n_experts=8, capacity_factor=1.0)) == 3  # ceil(2.5)
    assert expert_capacity(4, MoEConfig(n_experts=2, capacity_factor=8.0)) == 4  # never above T
    assert expert_capacity(64, MoEConfig(n_experts=8, capacity_factor=None)) is None
    # the tensor form (no host sync) gives the same numbers
    for cf in (0.25, 1.0, 1.25, 1.1, 3.0):
        moe = MoEConfig(n_experts=8, capacity_factor=cf)
        for n in (0, 1, 7, 10, 64, 333, 4096):
            assert int(expert_capacity(torch.tensor(n), moe)) == expert_capacity(n, moe), (cf, n)


def test_config_rejects_bad_routing_settings():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(n_experts=2, capacity_factor=0.0)


@torch.no_grad()
def test_capacity_drops_overflow_first_choices_first_and_dropped_slots_contribute_zero():
    m = build(capacity_factor=0.25)
    x = torch.randn(2, 32, DIM)
    y, _ = m(x)
    r = m.route(x.reshape(-1, DIM))
    cap = expert_capacity(64, m.moe)
    assert int(r.capacity) == cap == 4

    kept_per_expert = torch.zeros(EXPERTS, dtype=torch.long).index_add_(
        0, r.experts[r.kept], torch.ones(int(r.kept.sum()), dtype=torch.long)
    )
    assert torch.equal(kept_per_expert, r.counts.clamp(max=cap))
    assert torch.equal(kept_per_expert, r.kept_counts)
    dropped = 1 - kept_per_expert.sum() / (64 * 2)
    assert dropped > 0.5
    torch.testing.assert_close(m.last_stats["dropped_fraction"], dropped.float())
    assert torch.equal(m.last_stats["tokens_per_expert"], r.counts)
    assert int(m.last_stats["capacity"]) == cap

    # Priority: an expert takes second choices only after all its first choices, and within a
    # choice, earlier tokens first.
    for e in range(EXPERTS):
        first, second = r.experts[:, 0] == e, r.experts[:, 1] == e
        if r.kept[:, 1][second].any():
            assert r.kept[:, 0][first].all()
        for j, sel in ((0, first), (1, second)):
            k = r.kept[:, j][sel].long()
            assert torch.equal(k, k.sort(descending=True).values)

    torch.testing.assert_close(y, reference(m, x, r.experts, r.gates, r.kept), atol=1e-5, rtol=1e-4)
    fully_dropped = ~r.kept.any(dim=1)
    assert fully_dropped.any()
    assert (y.reshape(-1, DIM)[fully_dropped] == 0).all()


def _collapse(m, n_tokens: int) -> torch.Tensor:
    """Point m's router at experts 0 and 1 along a direction every one of `n_tokens` random
    tokens shares (returned [1, n_tokens, DIM]): a collapsed router."""
    w = torch.zeros(EXPERTS, DIM)
    w[0, 0] = w[1, 0] = 20.0
    m.router.weight.copy_(w)
    x = torch.randn(1, n_tokens, DIM)
    x[..., 0] = 1.0
    return x


@torch.no_grad()
def test_dropless_never_drops_even_when_the_router_collapses():
    m = build(capacity_factor=None)
    x = _collapse(m, 40)
    y, _ = m(x)
    r = m.route(x.reshape(-1, DIM))
    assert bool(r.kept.all()) and torch.equal(r.kept_counts, r.counts)
    assert r.counts.tolist() == [40, 40] + [0] * (EXPERTS - 2)
    assert m.last_stats["dropped_fraction"] == 0 and int(m.last_stats["capacity"]) == 40
    torch.testing.assert_close(y, reference(m, x, r.experts, r.gates, r.kept), atol=1e-5, rtol=1e-4)


def scatter_real(x_real: torch.Tensor, mask: torch.Tensor, fill: float = 30.0) -> torch.Tensor:
    """A [B, S, D] batch holding the rows of x_real [N, D] where mask is True, in order, and
    large garbage elsewhere (padding must not matter, whatever it holds)."""
    x = fill * torch.randn(*mask.shape, x_real.shape[-1])
    x[mask] = x_real
    return x


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
def test_padding_is_never_routed_and_changes_nothing_for_real_tokens(capacity_factor):
    """A batch with heavy padding routes its real tokens exactly as the real tokens alone: same
    experts, same kept set, same loads and capacity, same outputs, losses and gradients."""
    m = build(capacity_factor=capacity_factor)
    m.record_routing = True
    torch.manual_seed(5)
    x_real = torch.randn(1, 24, DIM)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, :10] = mask[1, 3:9] = mask[2, 12:] = True  # 10 + 6 + 8 = 24 real tokens
    x_pad = scatter_real(x_real[0], mask)

    a = x_real.clone().requires_grad_()
    y_real, aux_real = m(a)
    stats_real, routing_real = m.last_stats, m.last_routing
    (y_real.square().sum() + aux_loss(aux_real, m.moe)).backward()
    grads_real = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    b = x_pad.clone().requires_grad_()
    y_pad, aux_pad = m(b, token_mask=mask)
    (y_pad.square().sum() + aux_loss(aux_pad, m.moe)).backward()

    assert torch.equal(m.last_routing[0], routing_real[0]) and torch.equal(m.last_routing[1], routing_real[1])
    assert torch.equal(m.last_stats["tokens_per_expert"], stats_real["tokens_per_expert"])
    assert int(m.last_stats["tokens_per_expert"].sum()) == 24 * 2  # padding counted nowhere
    assert torch.equal(m.last_stats["capacity"], stats_real["capacity"])
    torch.testing.assert_close(m.last_stats["dropped_fraction"], stats_real["dropped_fraction"], atol=0, rtol=0)
    assert (y_pad[~mask] == 0).all()  # padding gets exactly 0
    torch.testing.assert_close(y_pad[mask], y_real[0], atol=1e-6, rtol=1e-6)
    for name in aux_real:
        torch.testing.assert_close(aux_pad[name], aux_real[name], atol=1e-6, rtol=1e-6)
    assert (b.grad[~mask] == 0).all()
    torch.testing.assert_close(b.grad[mask], a.grad[0], atol=1e-6, rtol=1e-6)
    for p, g in zip(m.parameters(), grads_real):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_an_all_padding_batch_gives_zeros_and_finite_losses():
    m = build(capacity_factor=1.25)
    y, aux = m(torch.randn(2, 4, DIM), token_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert (y == 0).all() and all(float(v) == 0 for v in aux.values())
    assert int(m.last_stats["tokens_per_expert"].sum()) == 0 and m.last_stats["dropped_fraction"] == 0


def test_grouped_swiglu_fallback_and_grouped_mm_match_a_per_expert_reference():
    """Rows grouped by expert (some experts empty, unused rows at the end): the loop of matmuls
    and, where this build has it on CPU, torch._grouped_mm (with its 8-row group padding) give
    each expert's SwiGLU on its rows and zeros past them; gradients agree too."""
    torch.manual_seed(0)
    experts, hidden = 4, 24
    w1, w3 = torch.randn(experts, hidden, DIM) / 6, torch.randn(experts, hidden, DIM) / 6
    w2 = torch.randn(experts, DIM, hidden) / 5
    counts = torch.tensor([5, 0, 11, 3])
    rows = torch.randn(23, DIM)  # 19 grouped rows, then 4 to skip

    expected, start = torch.zeros(23, DIM), 0
    for e, n in enumerate(counts.tolist()):
        h = rows[start:start + n]
        expected[start:start + n] = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T
        start += n

    def run(grouped_mm: bool):
        leaves = [t.clone().requires_grad_() for t in (rows, w1, w2, w3)]
        out = grouped_swiglu(leaves[0], counts, *leaves[1:], grouped_mm=grouped_mm)
        (out * torch.linspace(-1, 1, DIM)).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out, grads = run(grouped_mm=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out[19:] == 0).all() and (grads[0][19:] == 0).all() and (grads[1][1] == 0).all()
    try:
        out_g, grads_g = run(grouped_mm=True)
    except (AttributeError, RuntimeError, NotImplementedError) as err:  # no CPU grouped GEMM here
        pytest.skip(f"torch._grouped_mm on CPU: {err}")
    torch.testing.assert_close(out_g, out, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads_g, grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)


def test_decoder_sums_aux_losses_over_moe_layers_and_keeps_padding_out_of_routing():
    """Two MoE layers: the decoder's aux losses are the sums of the layers'. With token_mask, what
    trailing padding holds changes neither the real tokens' logits (causal attention, padding kept
    out of capacity) nor the aux losses."""
    moe = MoEConfig(n_experts=4, every=1, capacity_factor=0.5)
    cfg = DecoderConfig(vocab_size=64, dim=DIM, n_layers=2, n_heads=4, ffn_hidden=HIDDEN, moe=moe)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    model.init_weights(std=0.1)
    seen: list[dict[str, torch.Tensor]] = []
    for layer in model.layers:
        assert isinstance(layer.feed_forward, MoEFeedForward)
        layer.feed_forward.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        out = model(tokens, token_mask=mask)
    assert len(seen) == 2 and set(out.aux_losses) == {"load_balance", "router_z"}
    for name, value in out.aux_losses.items():
        torch.testing.assert_close(value, seen[0][name] + seen[1][name])

    other = tokens.clone()
    other[1, 5:] = (other[1, 5:] + 7) % 64
    with torch.no_grad():
        out2 = model(other, token_mask=mask)
        unmasked = model(other)
    torch.testing.assert_close(out2.logits[mask], out.logits[mask], atol=1e-6, rtol=1e-6)
    for name in out.aux_losses:
        torch.testing.assert_close(out2.aux_losses[name], out.aux_losses[name], atol=1e-6, rtol=1e-6)
    # without the mask the padding competes for capacity and the losses see it
    assert not torch.allclose(unmasked.aux_losses["router_z"], out.aux_losses["router_z"])


@torch.no_grad()
def test_a_large_capacity_drops_nothing_and_matches_no_cap():
    x = torch.randn(2, 16, DIM)
    y_cap, aux_cap = build(capacity_factor=EXPERTS / 2)(x)  # capacity = T
    m = build(capacity_factor=None)
    y, aux = m(x)
    torch.testing.assert_close(y_cap, y)
    torch.testing.assert_close(aux_cap["load_balance"], aux["load_balance"])
    assert m.last_stats["dropped_fraction"] == 0


def test_stats_are_detached_and_gradients_reach_router_and_every_expert():
    m = build(capacity_factor=1.25)
    y, aux = m(torch.randn(2, 32, DIM))
    for v in m.last_stats.values():
        assert not v.requires_grad and v.grad_fn is None
    (y.square().mean() + aux_loss(aux, m.moe)).backward()
    assert m.router.weight.grad.abs().sum() > 0
    for w in (m.w1, m.w2, m.w3):
        per_expert = w.grad.abs().flatten(1).sum(1)
        assert (per_expert > 0).all(), per_expert  # 64 tokens * 2 choices reach all 8 experts


def test_a_few_adamw_steps_lower_the_loss():
    """Mechanics: MoE FFN (with residual) + linear head learns a fixed random classification batch."""
    torch.manual_seed(0)
    moe = MoEFeedForward(tiny(capacity_factor=1.25))
    head = torch.nn.Linear(DIM, 5)
    x, labels = torch.randn(4, 16, DIM), torch.randint(0, 5, (4, 16))
    opt = torch.optim.AdamW([*moe.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        h, aux = moe(x)
        loss = F.cross_entropy(head(x + h).flatten(0, 1), labels.flatten()) + aux_loss(aux, moe.moe)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_builds_on_the_meta_device_then_materialises():
    cfg = tiny(capacity_factor=1.25)
    with torch.device("meta"):
        m = MoEFeedForward(cfg)
    assert all(p.is_meta for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == moe_param_counts(cfg)[0]
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.reset_parameters()
    y, aux = m(torch.randn(1, 8, DIM))
    assert torch.isfinite(y).all() and all(torch.isfinite(v) for v in aux.values())


def test_deterministic_given_the_seed():
    x = torch.randn(2, 8, DIM)
    a, b = build(seed=3, capacity_factor=0.5), build(seed=3, capacity_factor=0.5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    (ya, auxa), (yb, auxb) = a(x), b(x)
    assert torch.equal(ya, yb) and torch.equal(auxa["load_balance"], auxb["load_balance"])
    assert torch.equal(a(x)[0], ya)


def test_param_counts():
    cfg = tiny()
    total, active = moe_param_counts(cfg)
    expert = 3 * DIM * HIDDEN
    assert (total, active) == (DIM * EXPERTS + EXPERTS * expert, DIM * EXPERTS + 2 * expert)
    assert total == sum(p.numel() for p in MoEFeedForward(cfg).parameters())
    total16, _ = moe_param_counts(tiny(expert_hidden=16))
    assert total16 == DIM * EXPERTS + EXPERTS * 3 * DIM * 16


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_bf16_forward_keeps_the_dtype_and_fp32_losses(capacity_factor):
    m = build(capacity_factor=capacity_factor).to(torch.bfloat16)
    y, aux = m(torch.randn(2, 8, DIM, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 8, DIM)
    assert aux["load_balance"].dtype == aux["router_z"].dtype == torch.float32


def test_the_router_stays_fp32_under_bf16_autocast():
    m = build(capacity_factor=1.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = m(torch.randn(2, 8, DIM))
        r = m.route(torch.randn(16, DIM))
    assert y.dtype == torch.bfloat16
    assert r.logits.dtype == r.gates.dtype == torch.float32
    assert aux["load_balance"].dtype == aux["router_z"].dtype == torch.float32
