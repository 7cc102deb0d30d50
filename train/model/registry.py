"""Named MM1 sizes (torchtitan's habit: every size in one registry, configs as data), their
parameter counts and their training FLOPs per token.

MM1 (McKinzie et al. 2024) did not publish its decoders' shapes; these are chosen from open
models of the same sizes, so that the counts land near the paper's names:

| name        | decoder shape (dim, layers, heads / kv heads, FFN hidden)   | after                  |
|-------------|--------------------------------------------------------------|------------------------|
| mm1-3b      | 3072, 26, 24 / 8, 8192                                       | OpenELM-3B / StableLM-3B widths, GQA as Llama 3 |
| mm1-7b      | 4096, 32, 32 / 8, 13312                                      | Mistral-7B's width and depth, an FFN between Llama-2's and Mistral's |
| mm1-30b     | 6656, 64, 52 / 4, 17920                                      | LLaMA-30B's width, heads and FFN; GQA (4 kv heads: 52 = 4 x 13), 64 layers |
| mm1-3b-moe  | mm1-3b, 64 experts in every 2nd layer, top-2                 | MM1 §3.5: ~64B total  |
| mm1-7b-moe  | mm1-7b, 32 experts in every 4th layer, top-2                 | MM1 §3.5: ~47B total  |

The vocabulary (50,304, a multiple of 64 near GPT-NeoX's) is the registry's default only: the
training recipe's tokenizer sets the real size. Every size uses MM1's image side: the visual tower
of `ViT-H-14-378-quickgelu` (DFN-5B weights) and a C-Abstractor to 144 tokens per image. The
`tiny` entries build in milliseconds for tests (random weights: mechanics only).

FLOPs per token (`train_flops_per_token`), for MFU: the decoder costs 6 x its active parameters
(forward + backward; the input embedding is a lookup and is not counted, the output projection
is) plus the attention term 12 x layers x width x sequence length (Kaplan et al. 2020, PaLM's
appendix B). An image costs its vision tower and connector (6 x parameters x patches when the
tower trains, 2 x when it is frozen, plus the tower's own attention term) and is spread over the
`n_tokens` image tokens it becomes.
"""

from __future__ import annotations

from dataclasses import replace

from train.model.config import ConnectorConfig, DecoderConfig, MM1Config, MoEConfig, VisionConfig

VOCAB = 50_304

_3B = DecoderConfig(vocab_size=VOCAB, dim=3072, n_layers=26, n_heads=24, n_kv_heads=8, ffn_hidden=8192)
_7B = DecoderConfig(vocab_size=VOCAB, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=13312)
_30B = DecoderConfig(vocab_size=VOCAB, dim=6656, n_layers=64, n_heads=52, n_kv_heads=4, ffn_hidden=17920)

# A tiny open_clip ViT (random weights) built from overrides: 56 px, 14 px patches -> a 4x4 grid.
TINY_VISION = VisionConfig(
    model="ViT-B-32",
    pretrained=None,
    # open_clip replaces vision_cfg whole, and builds the text tower before we drop it: keep it tiny
    overrides={"vision_cfg": {"image_size": 56, "patch_size": 14, "width": 64, "layers": 2, "head_width": 32},
               "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
               "embed_dim": 64},
    frozen=False,
)
_TINY = DecoderConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=256)

REGISTRY: dict[str, MM1Config] = {
    "mm1-3b": MM1Config("mm1-3b", _3B),
    "mm1-7b": MM1Config("mm1-7b", _7B),
    "mm1-30b": MM1Config("mm1-30b", _30B),
    "mm1-3b-moe": MM1Config("mm1-3b-moe", replace(_3B, moe=MoEConfig(n_experts=64, top_k=2, every=2))),
    "mm1-7b-moe": MM1Config("mm1-7b-moe", replace(_7B, moe=MoEConfig(n_experts=32, top_k=2, every=4))),
    "tiny": MM1Config("tiny", _TINY, TINY_VISION, ConnectorConfig(n_tokens=4, depth=1)),
    "tiny-moe": MM1Config("tiny-moe", replace(_TINY, moe=MoEConfig(n_experts=4, top_k=2, every=2)), TINY_VISION,
                          ConnectorConfig(n_tokens=4, depth=1)),
}


def get_config(name: str) -> MM1Config:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model size {name!r}; known: {sorted(REGISTRY)}") from None


# ---------------------------------------------------------------------------------------------
# Parameter counts (analytic; the tests check them against modules built on the meta device)
# ---------------------------------------------------------------------------------------------


def _attention_params(cfg: DecoderConfig) -> int:
    q = cfg.dim * cfg.n_heads * cfg.head_dim
    kv = 2 * cfg.dim * cfg.kv_heads * cfg.head_dim
    bias = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim if cfg.qkv_bias else 0  # Qwen2's q/k/v biases
    return q + kv + bias + cfg.n_heads * cfg.head_dim * cfg.dim


def _ffn_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden  # SwiGLU: w1, w3 (dim -> hidden), w2 (hidden -> dim)


def decoder_param_counts(cfg: DecoderConfig) -> dict[str, int]:
    """total, active (per token: the router and top_k experts of an MoE layer), embedding (the
    input table) and non_embedding parameters of a decoder."""
    norms = 2 * cfg.dim  # attention and FFN pre-norms of one block
    total = active = 0
    for layer in range(cfg.n_layers):
        block = _attention_params(cfg) + norms
        total += block
        active += block
        if cfg.is_moe_layer(layer):
            moe = cfg.moe
            expert = _ffn_params(cfg.dim, moe.expert_hidden or cfg.hidden)
            router = cfg.dim * moe.n_experts
            total += router + moe.n_experts * expert
            active += router + moe.top_k * expert
        else:
            total += _ffn_params(cfg.dim, cfg.hidden)
            active += _ffn_params(cfg.dim, cfg.hidden)
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    final_norm = cfg.dim
    total += embedding + head + final_norm
    active += embedding + head + final_norm
    return {"total": total, "active": active, "embedding": embedding, "non_embedding": total - embedding}


def vit_param_count(width: int, layers: int, patch: int, grid: int, mlp_ratio: float = 4.0) -> int:
    """An open_clip VisionTransformer's visual tower without its output projection: patch conv
    (no bias), class token, positional embedding, ln_pre, blocks (attention with biases, MLP
    with biases, two LayerNorms), ln_post."""
    hidden = int(width * mlp_ratio)
    block = (3 * width * width + 3 * width) + (width * width + width) \
        + (width * hidden + hidden) + (hidden * width + width) + 4 * width
    return 3 * patch * patch * width + width + (grid * grid + 1) * width + 2 * width + layers * block + 2 * width


def decoder_flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    """Training FLOPs per text token of the decoder: 6 x active non-embedding parameters (the
    output projection included) + 12 x layers x width x sequence length."""
    counts = decoder_param_counts(cfg)
    return 6.0 * (counts["active"] - counts["embedding"]) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def image_flops(vision_params: int, vision_layers: int, vision_width: int, patches: int,
                connector_params: int, trainable_vision: bool) -> float:
    """Training FLOPs of one image through the vision tower and the connector."""
    factor = 6.0 if trainable_vision else 2.0
    tower = factor * vision_params * patches + (factor * 2) * vision_layers * vision_width * patches * patches
    return tower + 6.0 * connector_params * patches


def train_flops_per_token(decoder_flops: float, image_flops_per_image: float, n_tokens: int,
                          image_token_fraction: float) -> float:
    """FLOPs per sequence token when `image_token_fraction` of the tokens are image tokens (each
    image's cost spread over its `n_tokens` tokens)."""
    return decoder_flops + image_token_fraction * image_flops_per_image / n_tokens
