"""Training FLOPs of an MM1 step, for MFU and HFU: what the model must compute for the tokens and
images a batch really holds, not what a dense square over the padded sequence would cost.

For one optimizer step (all micro-batches), the model FLOPs (the MFU numerator) are

    F_model = 6 N_dec T  +  12 n_layers d_attn P  +  I (F_tower + F_conn)

- T: real tokens (text and image placeholders; padding excluded: it is computed on, but it is
  not work the model needed);
- N_dec: the decoder's active non-embedding parameters: blocks, final norm and the output
  projection (which runs on every token); the input embedding is a lookup. In an MoE layer,
  the router and the `top_k` experts a token is sent to. Each parameter is one multiply-add
  (2 FLOPs) per token forward and two in backward (input and weight gradients): 6 N_dec T;
- P: the (query, key) pairs causal attention computes inside documents, `causal_pairs`: a
  document of L real tokens has L(L+1)/2 (query i sees keys 0..i). Per layer and pair, the score
  q.k costs 2 head_dim FLOPs per head and adding v weighted by it another 2 head_dim, so the
  forward costs 4 d_attn with d_attn = n_heads x head_dim (grouped-query attention shares keys
  and values, not scores), and backward twice that: 12 d_attn per pair and layer;
- I: images; F_tower = k (2 N_vit t + 4 L_vit w t^2) with t = patches + 1 (CLS) tokens, w the
  tower's width, N_vit its parameters less the class and positional embeddings (added, not
  multiplied), L_vit its blocks, attention full (not causal) over the t tokens; k = 3 when the
  tower trains (forward + backward) and 1 when it is frozen (its input needs no gradient, so no
  backward runs through it at all);
- F_conn = 3 x the connector's forward FLOPs, counted once by torch's FlopCounterMode on the meta
  device (the C-Abstractor's convolutions run on the 27 x 27 grid before pooling and on 12 x 12
  after it, so "6 x parameters x patches" would overstate it 2.7-fold for MM1's).

Hardware FLOPs (the HFU numerator) add the forwards that run again in backward: of each block
that activation checkpointing wraps (train/parallelize.py wraps decoder blocks and tower blocks
alike: "full" all of them, "selective" a fraction), 2 N_block T + 4 d_attn P per decoder block
and a tower block's forward per image, the latter only when the tower trains (a frozen tower has
no backward, so nothing of it is recomputed); and of the output projection, 2 V D per token,
which `chunked_cross_entropy` (train/model/mm1.py) always recomputes rather than keep the
logits. Neither count includes padding or the tiles of a masked score matrix that a kernel
computes and throws away (FlexAttention works in 128 x 128 tiles): those are the kernel's
waste, and they show as a lower MFU, which is the point.

The common convention (PaLM's appendix B, torchtitan's `get_num_flop_per_token`,
`train/model/registry.py`'s `decoder_flops_per_token`) charges 12 n_layers d S per token,
the whole S x S score matrix: about twice this module's attention term for one causal sequence,
and far more for many short packed documents. So an MFU from this module is the lower, stricter
number; BENCHMARKS.md gives both for its worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from train.model.config import MM1Config
from train.model.connector import build_connector
from train.model.mm1 import MM1
from train.model.registry import decoder_param_counts

Recompute = Literal["none", "full", "selective"]


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs per unit of work of one MM1 configuration (see the module docstring)."""

    dense_per_token: float  # 6 N_dec
    attention_per_pair: float  # 12 n_layers d_attn, all layers
    block_forward_per_token: float  # 2 N_blocks: the decoder blocks' forward (dense part), recomputed
    head_forward_per_token: float  # 2 V D: the output projection's forward, recomputed by the chunked loss
    tower_per_image: float  # k (2 N_vit t + 4 L_vit w t^2)
    tower_forward_per_image: float  # 2 N_vit t + 4 L_vit w t^2: one forward, what checkpointing recomputes
    connector_per_image: float  # 3 x the connector's forward
    tower_trainable: bool

    @classmethod
    def from_model(cls, model: nn.Module, *, tower_trainable: bool | None = None) -> "ModelFlops":
        """From a built MM1 (on any device, the meta device included); `tower_trainable`
        defaults to whether any tower parameter requires a gradient."""
        cfg: MM1Config = model.cfg
        vision = model.vision
        if tower_trainable is None:
            tower_trainable = any(p.requires_grad for p in vision.parameters())
        tower = vision.tower
        vit_params = sum(p.numel() for p in tower.parameters()) \
            - tower.class_embedding.numel() - tower.positional_embedding.numel()
        with torch.device("meta"):
            connector = build_connector(cfg.connector, vision.width, vision.grid, cfg.decoder.dim)
        return cls._build(cfg, vit_params=vit_params, vit_layers=len(tower.transformer.resblocks),
                          vit_width=vision.width, patches=vision.n_patches,
                          connector_forward=forward_flops(connector, (1, vision.n_patches, vision.width)),
                          tower_trainable=tower_trainable)

    @classmethod
    def from_config(cls, cfg: MM1Config, *, tower_trainable: bool) -> "ModelFlops":
        """Builds the model on the meta device (nothing allocated or fetched; a few seconds for
        ViT-H) and counts it."""
        with torch.device("meta"):
            model = MM1(cfg)
        return cls.from_model(model, tower_trainable=tower_trainable)

    @classmethod
    def _build(cls, cfg: MM1Config, *, vit_params: int, vit_layers: int, vit_width: int, patches: int,
               connector_forward: float, tower_trainable: bool) -> "ModelFlops":
        dec = cfg.decoder
        counts = decoder_param_counts(dec)
        non_embedding = counts["active"] - counts["embedding"]
        head = 0 if dec.tie_embeddings else dec.vocab_size * dec.dim
        blocks = non_embedding - head - dec.dim  # less the output projection and the final norm
        if dec.tie_embeddings:  # the tied table still projects every token: count it once, as the head
            non_embedding += dec.vocab_size * dec.dim
        d_attn = dec.n_heads * dec.head_dim
        t = patches + 1
        tower_forward = 2.0 * vit_params * t + 4.0 * vit_layers * vit_width * t * t
        return cls(
            dense_per_token=6.0 * non_embedding,
            attention_per_pair=12.0 * dec.n_layers * d_attn,
            block_forward_per_token=2.0 * blocks,
            head_forward_per_token=2.0 * dec.vocab_size * dec.dim,
            tower_per_image=(3.0 if tower_trainable else 1.0) * tower_forward,
            tower_forward_per_image=tower_forward,
            connector_per_image=3.0 * connector_forward,
            tower_trainable=tower_trainable,
        )


def forward_flops(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of one forward of `module` (built on the meta device) on a meta input of that
    shape, as torch's FlopCounterMode counts them: matrix products and convolutions at 2 FLOPs
    a multiply-add; element-wise work is not counted (the 6N convention ignores it too)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.empty(input_shape, device="meta"))
    return float(counter.get_total_flops())


def causal_pairs(doc_ids: Tensor, token_mask: Tensor | None = None) -> int:
    """The (query, key) pairs that document-masked causal attention computes over real tokens:
    the sum over documents of L(L+1)/2, a document being a maximal run of equal `doc_ids` within
    a row ([B, S] or [S]) and L its real tokens (`token_mask` True; None: all real). Padding
    contributes nothing wherever it lies, as its own run or inside another."""
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0)
        token_mask = None if token_mask is None else token_mask.unsqueeze(0)
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [batch, seq] or [seq], got shape {tuple(doc_ids.shape)}")
    if token_mask is not None and token_mask.shape != doc_ids.shape:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} does not match doc_ids {tuple(doc_ids.shape)}")
    if doc_ids.numel() == 0:
        return 0
    doc_ids = doc_ids.detach().cpu()
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # a row's first token starts a run
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = starts.flatten().cumsum(0) - 1  # global run index, never crossing rows
    if token_mask is not None:
        run = run[token_mask.detach().cpu().flatten().bool()]
    lengths = torch.bincount(run).to(torch.int64)
    return int((lengths * (lengths + 1) // 2).sum())


def batch_flops(mf: ModelFlops, *, real_tokens: int, causal_pairs: int, images: int, recompute: Recompute = "none",
                recompute_fraction: float = 0.0, tower_recompute_fraction: float | None = None) -> dict[str, float]:
    """FLOPs of a batch (or of a whole step: the counts add up) of `real_tokens` tokens with
    `causal_pairs` attention pairs (`causal_pairs()`) and `images` images.

    "model": the MFU numerator. "hardware": the HFU numerator, "model" plus what runs again in
    backward: the output projection's forward (always), and the forward of the blocks that
    activation checkpointing wraps, `recompute` "full" (all of them) or "selective"
    (`recompute_fraction` of the decoder's blocks and `tower_recompute_fraction` of the tower's,
    by default the same fraction; the tower's only when it trains). "tower": the vision tower's
    share of "model". Also the other parts of "model" ("decoder": dense, "attention",
    "connector") and "recompute" (hardware - model)."""
    if recompute == "full":
        fraction = tower_fraction = 1.0
    elif recompute == "selective":
        fraction = recompute_fraction
        tower_fraction = recompute_fraction if tower_recompute_fraction is None else tower_recompute_fraction
        for f in (fraction, tower_fraction):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"a recompute fraction of {f} is not in [0, 1]")
    elif recompute == "none":
        fraction = tower_fraction = 0.0
    else:
        raise ValueError(f"recompute must be none, full or selective, not {recompute!r}")
    decoder = mf.dense_per_token * real_tokens
    attention = mf.attention_per_pair * causal_pairs
    tower = mf.tower_per_image * images
    connector = mf.connector_per_image * images
    model = decoder + attention + tower + connector
    # one more forward: dense 2 N_blocks per token and a third of the attention's training FLOPs
    again = fraction * (mf.block_forward_per_token * real_tokens + mf.attention_per_pair / 3.0 * causal_pairs)
    if mf.tower_trainable:
        again += tower_fraction * mf.tower_forward_per_image * images
    again += mf.head_forward_per_token * real_tokens
    return {"model": model, "hardware": model + again, "tower": tower, "decoder": decoder, "attention": attention,
            "connector": connector, "recompute": again}


# Dense (not sparse) bf16 tensor-core peaks, from NVIDIA's datasheets, which print the sparse rate
# with a footnote ("with sparsity"; dense is half of it): H100 SXM5 1,979 -> 989.4 TFLOP/s, H100
# PCIe 1,513 -> 756, H100 NVL 1,671 -> 835 (per GPU); H200 SXM 1,979 -> 989.4, H200 NVL 1,671 -> 835;
# A100 (SXM and PCIe) 312 dense (624 sparse). First match wins, so the specific names go first;
# "NVIDIA H100 80GB HBM3" (the SXM part) and "NVIDIA H200" fall through to the plain entries.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),  # also GH200 (its Hopper die is an H100 SXM's)
    ("A100", 312e12),
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name (`torch.cuda.get_device_name`), None for
    a device this table does not know (MFU is then not reported, never guessed)."""
    name = device_name.upper()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)

