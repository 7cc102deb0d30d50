"""Causal self-attention for the decoder: grouped-query attention, rotary position embeddings, and
a document mask so that samples packed into one sequence never see each other.

The document rule: token i attends to token j iff j <= i and both lie in the same document, where
a document is a maximal run of equal `doc_ids` values ([0,0,0,1,1,2] holds three). For ids that
come in contiguous runs, as the packer writes them, this is exactly "doc_ids[i] == doc_ids[j]";
defining documents by runs also keeps two separate runs that happen to share an id apart, so
padding given one id at both ends of a sequence cannot leak. Positions restart at 0 at every
document start, so a packed sample sees exactly the rotary angles it would see alone. (RoPE scores
depend on i - j only, so without the restart the math would agree too; the restart keeps the
angles small and identical, so bf16 rounding does not depend on where the packer put a sample.)

Two kernels compute the same thing:

- "sdpa": `F.scaled_dot_product_attention`, with `is_causal=True` when there are no documents and
  an explicit boolean [B, 1, S, S] mask otherwise. Runs everywhere; the reference.
- "flex": FlexAttention with a block mask, which skips the blocks a document mask empties (most of
  them in a sequence of many short samples). CUDA only in practice: eager flex attention
  materialises the whole score matrix, so on CUDA it goes through `torch.compile`. The import is
  guarded; torch builds without it fall back to "sdpa".

RoPE follows Hugging Face's Llama ("rotate half": the first and second halves of each head's
dimensions form the rotated pairs), so weights move between this decoder and a Llama, Mistral or
Qwen2 checkpoint without permuting q and k (see `train/model/hf.py`).
"""

from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.model.config import DecoderConfig

try:  # FlexAttention is in every torch >= 2.5; guarded so that a build without it still runs.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = flex_attention = None  # type: ignore[assignment]

Backend = Literal["auto", "sdpa", "flex"]
# What the layers get: None (plain causal), a boolean mask (sdpa) or a BlockMask (flex).
AttentionMask = Union[Tensor, "BlockMask", None]

_compiled_flex = None


def flex_available() -> bool:
    return flex_attention is not None


def document_segments(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(segment, position) for `doc_ids` [B, S]: `segment` numbers the runs of equal ids 0, 1, 2...
    along each row; `position` is each token's offset from the start of its run."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segment = starts.long().cumsum(dim=1) - 1
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return segment, index - run_start


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [B, S, head_dim] (float32) for integer `positions` [B, S], computed once per
    forward and shared by every layer. Computed from the positions rather than looked up in a
    buffer, so the model holds no state that a meta-device build or `to_empty` would leave stale;
    the arithmetic matches Hugging Face's Llama rotary embedding (fp32, both halves repeated)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = positions.float()[..., None] * inv_freq  # [B, S, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` [B, H, S, head_dim] by the angles behind cos/sin [B, S, head_dim]. cos and sin
    are cast to x's dtype first: under bf16 autocast q and k are bf16, and fp32 angles would
    silently promote them."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def resolve_backend(backend: Backend, device: torch.device) -> Literal["sdpa", "flex"]:
    """"auto" picks flex on CUDA when this torch has it, sdpa elsewhere."""
    if backend == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    if backend == "flex" and not flex_available():
        raise RuntimeError("this torch build has no torch.nn.attention.flex_attention; use backend='sdpa'")
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"unknown attention backend {backend!r}")
    return backend


def build_attention_mask(doc_ids: Tensor | None, backend: Literal["sdpa", "flex"]) -> AttentionMask:
    """The mask for one forward, built once and shared by all layers. None means plain causal
    attention (no documents: the kernels' fast causal path)."""
    if doc_ids is None:
        return None
    segment, _ = document_segments(doc_ids)
    batch, seq = segment.shape
    if backend == "sdpa":
        causal = torch.ones(seq, seq, dtype=torch.bool, device=segment.device).tril()
        return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]

    def document_causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q >= kv) & (segment[b, q] == segment[b, kv])

    # on CUDA the mask is built by a compiled function (eager construction evaluates the mask
    # for every (query, key) pair in Python-dispatched ops, milliseconds per layer call at 4096)
    return create_block_mask(document_causal, batch, None, seq, seq, device=segment.device,
                             _compile=segment.is_cuda)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    global _compiled_flex
    if q.is_cuda:
        # Eager flex attention materialises the full score matrix; the compiled one is the fused
        # kernel. Compiled once per process, on first use (compiling is slow; CPU never needs it).
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


class Attention(nn.Module):
    """Multi-head self-attention with `n_kv_heads` key/value heads shared by groups of query heads
    (GQA; MQA when 1). No output bias and, unless `qkv_bias`, no input biases (Llama)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.kv_heads:
            raise ValueError(f"dim {cfg.dim}, n_heads {cfg.n_heads}, kv_heads {cfg.kv_heads} do not divide")
        if cfg.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {cfg.head_dim}")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(w.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
            if w.bias is not None:
                nn.init.zeros_(w.bias)
        std = init_std if out_std is None else out_std
        nn.init.trunc_normal_(self.wo.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask = None) -> Tensor:
        """x [B, S, D] -> [B, S, D]. `mask` comes from `build_attention_mask` (None: causal)."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            out = _flex(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))
