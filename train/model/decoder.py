"""The language model of MM1: a Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query
attention), dense or with mixture-of-experts FFNs in every k-th layer.

Written for one device, like torchtitan's model files: FSDP, activation checkpointing and compile
are applied from outside, block by block (`Decoder.layers`). Parameter names follow torchtitan's
Llama (`tok_embeddings`, `layers.{i}.attention.wq`, `layers.{i}.feed_forward.w1`, ...);
`train/model/hf.py` maps them to and from Hugging Face checkpoints.

Two inputs, one path: token ids, or embeddings [B, S, D] that the MM1 assembly builds by splicing
image tokens into `Decoder.embed(tokens)`. Every FFN returns (output, aux losses); dense ones return
no aux losses, MoE ones their unweighted load-balance and router z-losses, which the decoder
adds up over its MoE layers and hands back unweighted (the trainer weights them with
`train.model.moe.aux_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.model.attention import (
    AttentionMask,
    Attention,
    Backend,
    build_attention_mask,
    document_segments,
    resolve_backend,
    rope_cos_sin,
)
from train.model.config import DecoderConfig
from train.model.moe import MoEFeedForward


@dataclass
class DecoderOutput:
    """logits [B, S, vocab] (None when the forward was asked not to project: the caller computes
    its loss from `hidden` in chunks, see `train.model.mm1.chunked_cross_entropy`); hidden
    [B, S, D], the final norm's output; aux_losses: each MoE aux loss summed over the MoE layers
    (MM1/ST-MoE add them per layer), unweighted (empty for a dense decoder)."""

    logits: Tensor | None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    hidden: Tensor | None = None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as Llama does, so
    bf16 activations are normalised without bf16 rounding in the mean)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class FeedForward(nn.Module):
    """The dense SwiGLU FFN: w2(silu(w1 x) * w3 x). Returns (output, {}) to share the MoE FFN's
    contract."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)  # down

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        for w in (self.w1, self.w3):
            nn.init.trunc_normal_(w.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        std = init_std if out_std is None else out_std
        nn.init.trunc_normal_(self.w2.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """`token_mask` is ignored: every position goes through the dense FFN (the MoE FFN's
        contract takes it)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), {}


def build_feed_forward(cfg: DecoderConfig, layer: int) -> nn.Module:
    """Layer `layer`'s FFN: MoE where `cfg.is_moe_layer(layer)`, dense elsewhere."""
    if cfg.is_moe_layer(layer):
        return MoEFeedForward(cfg)
    return FeedForward(cfg)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = build_feed_forward(cfg, layer)

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.reset_parameters(init_std, out_std)
        self.feed_forward.reset_parameters(init_std, out_std)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask = None, token_mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`token_mask` [B, S] (True: a real token) goes to the FFN: an MoE FFN never routes padding."""
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        ffn_out, aux = self.feed_forward(self.ffn_norm(x), token_mask)
        return x + ffn_out, aux


class Decoder(nn.Module):
    """The decoder LLM. `attn_backend`: "auto" (FlexAttention on CUDA, SDPA elsewhere), "sdpa" or
    "flex"; all three give the same results (see `train/model/attention.py`).

    Built on whatever device is current, meta included (`with torch.device("meta"): Decoder(cfg)`,
    then `to_empty` and `init_weights`); the decoder holds no buffers, so nothing goes stale.
    With `tie_embeddings` the output projection reuses the token embedding's weight in `forward`
    instead of sharing a Parameter, so tying survives `to_empty` and sharding without re-tying."""

    def __init__(self, cfg: DecoderConfig, *, attn_backend: Backend = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend = attn_backend
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Truncated-normal init with std `std`, except the projections that write into the
        residual stream (attention wo, FFN w2), whose std shrinks by sqrt(2 * n_layers) so the
        residual's variance does not grow with depth (GPT-2's rule). Norms start at 1. Consumes
        the RNG in a fixed order: deterministic under `torch.manual_seed`."""
        for _, _, init in self.init_pieces(std):
            init()

    def init_pieces(self, std: float = 0.02) -> list[tuple[str, nn.Module, Callable[[], None]]]:
        """`init_weights` in pieces, in its RNG order: (state-dict prefix, module, its init) for
        the embedding, each block, then the final norm and output head. A module built on the
        meta device can be materialised, initialised and read one piece at a time (the trainer's
        initial state of a decoder too big to hold twice)."""
        out_std = std / math.sqrt(2 * self.cfg.n_layers)

        def normal(w: Tensor) -> None:
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)

        pieces: list[tuple[str, nn.Module, Callable[[], None]]] = [
            ("tok_embeddings", self.tok_embeddings, lambda: normal(self.tok_embeddings.weight))]
        for i, layer in enumerate(self.layers):
            pieces.append((f"layers.{i}", layer, lambda layer=layer: layer.reset_parameters(std, out_std)))
        head = nn.ModuleDict({"norm": self.norm} | ({"output": self.output} if self.output is not None else {}))

        def init_head() -> None:
            self.norm.reset_parameters()
            if self.output is not None:
                normal(self.output.weight)

        pieces.append(("", head, init_head))
        return [(name, module, torch.no_grad()(init)) for name, module, init in pieces]

    def embed(self, tokens: Tensor) -> Tensor:
        """Token embeddings [B, S, D] for `tokens` [B, S]: what `forward(embeds=...)` expects."""
        return self.tok_embeddings(tokens)

    def forward(
        self,
        tokens: Tensor | None = None,
        *,
        embeds: Tensor | None = None,
        doc_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        project: bool = True,
    ) -> DecoderOutput:
        """Logits for `tokens` [B, S] or `embeds` [B, S, D] (exactly one). `doc_ids` [B, S]: packed
        documents as runs of equal ids; attention stays inside a document and positions restart
        at each one (None: one document per row). `token_mask` [B, S] bool (None: all real):
        False marks padding, which MoE layers neither route nor count (dense layers ignore it)."""
        if (tokens is None) == (embeds is None):
            raise ValueError("give exactly one of tokens and embeds")
        h = self.embed(tokens) if embeds is None else embeds
        batch, seq, _ = h.shape
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if doc_ids is None:
            positions = torch.arange(seq, device=h.device)[None]
        else:
            if doc_ids.shape != (batch, seq):
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != (batch, seq) {(batch, seq)}")
            positions = document_segments(doc_ids)[1]
        if token_mask is not None and token_mask.shape != (batch, seq):
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != (batch, seq) {(batch, seq)}")
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        mask = build_attention_mask(doc_ids, resolve_backend(self.attn_backend, h.device))

        aux: dict[str, list[Tensor]] = {}
        for layer in self.layers:
            h, layer_aux = layer(h, cos, sin, mask, token_mask)
            for name, value in layer_aux.items():
                aux.setdefault(name, []).append(value)
        h = self.norm(h)
        logits = None
        if project:
            logits = self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)
        return DecoderOutput(logits, {name: torch.stack(v).sum() for name, v in aux.items()}, h)

    @property
    def output_weight(self) -> Tensor:
        """The output projection's weight [vocab, D] (the embedding table when tied)."""
        return self.output.weight if self.output is not None else self.tok_embeddings.weight
