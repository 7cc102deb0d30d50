"""Model configurations as data (open_clip's and torchtitan's habit): plain frozen dataclasses,
JSON-able, one per part of MM1, composed into `MM1Config`. The named sizes live in
`train/model/registry.py`; the modules in this package build from these configs only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts FFNs (MM1 §3.5, following ST-MoE / GShard): top-k routing over
    `n_experts` SwiGLU experts in every `every`-th decoder layer (layers i with i % every ==
    every - 1), a load-balance loss and a router z-loss per MoE layer, summed over the layers and
    added to the language-model loss with these coefficients.

    `capacity_factor`: capacity routing, each expert keeps at most ceil(capacity_factor * real
    tokens * top_k / n_experts) assignments per forward (the tokens of one rank's micro-batch,
    padding excluded), the rest are dropped; None: dropless routing (nothing is dropped)."""

    n_experts: int
    top_k: int = 2
    every: int = 2  # 1: every layer is MoE; 2: every second layer; 4: every fourth
    expert_hidden: int | None = None  # None: the dense FFN's hidden size
    capacity_factor: float | None = 1.25  # None: dropless
    load_balance_coef: float = 0.01
    router_z_coef: float = 0.001

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be in [1, moe.n_experts={self.n_experts}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor={self.capacity_factor} must be > 0 (None: dropless)")


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: n_heads (multi-head); 1: multi-query
    ffn_hidden: int | None = None  # None: Llama's rule from dim (8/3 dim rounded to multiple_of)
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2); Llama and Mistral have none
    moe: MoEConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        h = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer % self.moe.every == self.moe.every - 1


@dataclass(frozen=True)
class VisionConfig:
    """The image encoder: an open_clip model's visual tower. `pretrained` is an open_clip tag
    (e.g. "dfn5b"), a local open_clip checkpoint file, or None (random weights: tests, mechanics
    only); `overrides` change the model config (tiny towers for tests). Features are the patch
    tokens (no CLS) of `layer` (-1: the last block's output after its final norm). The tower
    trains with the rest of the model, as in MM1's pretraining; `frozen` (a recipe's
    `model.freeze_vision: true`) keeps it fixed."""

    model: str = "ViT-H-14-378-quickgelu"
    pretrained: str | None = "dfn5b"
    overrides: dict[str, Any] = field(default_factory=dict)
    layer: int = -1
    frozen: bool = False


@dataclass(frozen=True)
class ConnectorConfig:
    """Vision-language connector: MM1's C-Abstractor (Honeybee), or the average-pool and
    attention-pool connectors MM1 ablated. `n_tokens` image tokens per image (a square number
    for the pooling kinds: 144 = 12x12)."""

    kind: Literal["c_abstractor", "avg_pool", "attn_pool"] = "c_abstractor"
    n_tokens: int = 144
    depth: int = 3  # RegNet blocks per stage (C-Abstractor)
    hidden: int | None = None  # None: the vision width
    mlp_depth: int = 2  # readout MLP layers


@dataclass(frozen=True)
class MM1Config:
    name: str
    decoder: DecoderConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    image_token_id: int | None = None  # the placeholder token; None: vocab_size - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
