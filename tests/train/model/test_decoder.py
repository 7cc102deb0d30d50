"""The decoder LLM (train/model/decoder.py, attention.py) on tiny configs with random weights:
these tests check mechanics (shapes, masking, positions, tying, init, gradients), not quality.
Parity with Hugging Face's Llama family is in test_hf.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from train.model.attention import document_segments, flex_available
from train.model.config import DecoderConfig, MoEConfig
from train.model.decoder import Decoder, DecoderOutput, FeedForward

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(**changes) -> DecoderConfig:
    base = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64)
    return DecoderConfig(**{**base, **changes})


def build(cfg: DecoderConfig, seed: int = 0, std: float = 0.1, **kwargs) -> Decoder:
    """A model with larger-than-default weights, so masking or position mistakes show in logits."""
    torch.manual_seed(seed)
    model = Decoder(cfg, **kwargs).eval()
    model.init_weights(std=std)
    return model


def tokens_for(batch: int, seq: int, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_gqa_layout() -> None:
    cfg = tiny(n_heads=8, n_kv_heads=2)
    model = build(cfg)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (8 * 8, 64)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (2 * 8, 64)
    out = model(tokens_for(3, 10))
    assert isinstance(out, DecoderOutput)
    assert out.logits.shape == (3, 10, 96) and out.aux_losses == {}
    assert all(isinstance(layer.feed_forward, FeedForward) for layer in model.layers)


def test_gqa_equals_multi_head_with_repeated_kv_heads() -> None:
    """Query head h reads kv head h // (n_heads / n_kv_heads): a GQA model equals the multi-head
    model whose k/v projections repeat each kv head for its group."""
    gqa = build(tiny(n_heads=4, n_kv_heads=2))
    mha = Decoder(tiny(n_heads=4, n_kv_heads=None)).eval()
    sd = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    x = tokens_for(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, **TOL)
    with torch.no_grad():  # multi-query runs too
        assert build(tiny(n_kv_heads=1))(x).logits.shape == (2, 12, 96)


def test_causal() -> None:
    """Changing a later token never changes an earlier position's logits."""
    model = build(tiny())
    x = tokens_for(1, 12)
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 96
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], **TOL)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_document_segments_and_positions() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [0, 0, 1, 1, 0, 0]])
    segment, position = document_segments(doc_ids)
    assert segment.tolist() == [[0, 0, 0, 1, 1, 2], [0] * 6, [0, 0, 1, 1, 2, 2]]
    assert position.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 0, 1]]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_documents_match_each_document_alone(backend: str) -> None:
    """Packing: each sample in a packed row gets the logits it gets alone (attention never crosses
    a document boundary and positions restart at 0). Row 1 reuses id 0 after id 1: runs, not id
    values, make documents."""
    if backend == "flex" and not flex_available():
        pytest.skip("this torch has no FlexAttention")
    model = build(tiny(), attn_backend=backend)
    lengths = [[5, 7, 4], [3, 9, 4]]
    ids = [[0, 1, 2], [0, 1, 0]]
    x = tokens_for(2, 16)
    doc_ids = torch.tensor([[d for d, n in zip(row_ids, row) for _ in range(n)] for row_ids, row in zip(ids, lengths)])
    with warnings.catch_warnings(), torch.no_grad():  # CPU flex: eager, and no backward on CPU
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        packed = model(x, doc_ids=doc_ids).logits
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                alone = model(x[row : row + 1, start : start + n]).logits[0]
                torch.testing.assert_close(packed[row, start : start + n], alone, **TOL)
                start += n
        # One document per row is the plain causal model.
        torch.testing.assert_close(model(x, doc_ids=torch.zeros_like(x)).logits, model(x).logits, **TOL)


def test_positions_restart_at_each_document(monkeypatch: pytest.MonkeyPatch) -> None:
    import train.model.decoder as decoder_module

    seen = []
    real = decoder_module.rope_cos_sin
    monkeypatch.setattr(decoder_module, "rope_cos_sin", lambda pos, *a: seen.append(pos) or real(pos, *a))
    model = build(tiny())
    model(tokens_for(1, 7), doc_ids=torch.tensor([[4, 4, 4, 9, 9, 9, 9]]))
    model(tokens_for(1, 4))
    assert seen[0].tolist() == [[0, 1, 2, 0, 1, 2, 3]] and seen[1].tolist() == [[0, 1, 2, 3]]


def test_flex_and_sdpa_agree() -> None:
    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    sdpa, flex = build(tiny(), attn_backend="sdpa"), build(tiny(), attn_backend="flex")
    x = tokens_for(2, 20)
    doc_ids = torch.tensor([[0] * 3 + [1] * 10 + [2] * 7, [0] * 20])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        torch.testing.assert_close(flex(x, doc_ids=doc_ids).logits, sdpa(x, doc_ids=doc_ids).logits, **TOL)


def test_embeds_path_equals_tokens_path() -> None:
    model = build(tiny())
    x = tokens_for(2, 10)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6] * 2)
    with torch.no_grad():
        torch.testing.assert_close(model(embeds=model.embed(x)).logits, model(x).logits, **TOL)
        torch.testing.assert_close(
            model(embeds=model.embed(x), doc_ids=doc_ids).logits, model(x, doc_ids=doc_ids).logits, **TOL
        )
    with pytest.raises(ValueError, match="exactly one"):
        model(x, embeds=model.embed(x))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens_for(1, 65))
    with pytest.raises(ValueError, match="doc_ids"):
        model(x, doc_ids=doc_ids[:, :5])


def test_tied_embeddings() -> None:
    tied, untied = build(tiny(tie_embeddings=True)), build(tiny())
    assert tied.output is None
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - 96 * 64
    x = tokens_for(2, 8)
    out = tied(x).logits
    h = tied.norm(tied.layers[1](tied.layers[0](tied.embed(x), *_rope(tied, 8))[0], *_rope(tied, 8))[0])
    torch.testing.assert_close(out, h @ tied.tok_embeddings.weight.T, **TOL)
    out.sum().backward()
    assert tied.tok_embeddings.weight.grad is not None


def _rope(model: Decoder, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    from train.model.attention import rope_cos_sin

    return rope_cos_sin(torch.arange(seq)[None], model.cfg.head_dim, model.cfg.rope_theta)


def test_meta_construction_then_init_is_deterministic() -> None:
    cfg = tiny(tie_embeddings=True)
    with torch.device("meta"):
        meta = Decoder(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    direct = Decoder(cfg)
    torch.manual_seed(3)
    direct.init_weights()
    a, b = meta.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        torch.testing.assert_close(meta(tokens_for(1, 6)).logits, direct(tokens_for(1, 6)).logits)


def test_init_scales() -> None:
    """Residual-writing projections start smaller by sqrt(2 * n_layers); norms start at one."""
    torch.manual_seed(0)
    model = Decoder(tiny(n_layers=8, dim=128, ffn_hidden=256))
    block = model.layers[0]
    assert abs(block.attention.wq.weight.std().item() - 0.02) < 0.003
    assert abs(block.attention.wo.weight.std().item() - 0.02 / 4) < 0.001
    assert abs(block.feed_forward.w2.weight.std().item() - 0.02 / 4) < 0.001
    assert torch.equal(block.attention_norm.weight, torch.ones(128))


def test_backward_reaches_every_parameter() -> None:
    model = build(tiny(qkv_bias=True)).train()
    x = tokens_for(2, 12)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    logits = model(x, doc_ids=doc_ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_autocast_keeps_attention_inputs_in_one_dtype() -> None:
    """fp32 rotary angles must not promote bf16 q/k under autocast (SDPA needs q, k, v alike)."""
    model = build(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(tokens_for(2, 8), doc_ids=torch.tensor([[0] * 3 + [1] * 5] * 2))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_moe_aux_losses_are_added_over_moe_layers() -> None:
    """With MoE layers (every 2nd of 4), aux_losses holds each loss summed over them (MM1 and
    ST-MoE add the auxiliary losses per layer), unweighted."""
    cfg = tiny(n_layers=4, moe=MoEConfig(n_experts=4, every=2, capacity_factor=None))
    model = build(cfg)
    seen: list[dict[str, torch.Tensor]] = []
    for i, layer in enumerate(model.layers):
        assert isinstance(layer.feed_forward, FeedForward) == (not cfg.is_moe_layer(i))
        if cfg.is_moe_layer(i):
            layer.feed_forward.register_forward_hook(lambda m, args, out: seen.append(out[1]))
    out = model(tokens_for(2, 8))
    assert len(seen) == 2 and set(out.aux_losses) == set(seen[0])
    for name, value in out.aux_losses.items():
        torch.testing.assert_close(value, seen[0][name] + seen[1][name])
