"""Vision-language connectors: patch features [N, grid*grid, vision_width] -> image tokens
[N, n_tokens, llm_dim] that take the place of the image placeholders in the decoder's input.

MM1 (§3.2) found the number of image tokens and the image resolution matter most and the connector
type little; it keeps Honeybee's C-Abstractor (Cha et al. 2024) at 144 tokens. The two connectors
it ablated against are here too:

- `c_abstractor`: convolutions keep locality (each output token summarises its own region of the
  image, which a set of learned queries does not guarantee) while the adaptive pooling sets the
  token count independently of the grid. Positional embedding on the patch grid, a RegNet stage of
  `depth` bottleneck blocks, adaptive average pooling to sqrt(n) x sqrt(n), a second RegNet stage,
  an MLP readout.
- `avg_pool`: adaptive average pooling of the grid to sqrt(n) x sqrt(n), then the MLP readout
  (`mlp_depth=1` is MM1's linear projection).
- `attn_pool`: `n_tokens` learned queries cross-attend to the patch features, then the readout.

The readout is `mlp_depth` linear layers with SiLU between (Honeybee's), the first to llm_dim.
Every connector has `init_weights()` to redraw its parameters after a build on the meta device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.model.config import ConnectorConfig


def _mlp(depth: int, d_in: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


def _square_side(n_tokens: int, grid: int, kind: str) -> int:
    side = math.isqrt(n_tokens) if n_tokens > 0 else 0
    if side * side != n_tokens or side == 0:
        raise ValueError(f"{kind}: n_tokens must be a positive square number (12x12 = 144), got {n_tokens}")
    if side > grid:
        raise ValueError(f"{kind}: {side}x{side} tokens from a {grid}x{grid} patch grid would upsample")
    return side


def _to_grid(x: Tensor, grid: int) -> Tensor:
    """[N, grid*grid, C] row-major patch tokens -> [N, C, grid, grid]."""
    n, length, c = x.shape
    if length != grid * grid:
        raise ValueError(f"expected {grid}x{grid} = {grid * grid} patch tokens, got {length}")
    return x.transpose(1, 2).reshape(n, c, grid, grid)


def _reset_children(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


# --------------------------------------------------------------------------------------------
# RegNet bottleneck (Radosavovic et al. 2020), as Honeybee uses it: depthwise 3x3 (group width 1),
# squeeze-excitation, LayerNorm over channels in place of batch norm (the batch here is a handful
# of images per rank, too few for batch statistics), SiLU.


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an [N, C, H, W] map (each position normalised on its own)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 1, groups: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False),
            LayerNorm2d(c_out),
            nn.SiLU() if act else nn.Identity(),
        )


class SqueezeExcite(nn.Module):
    """Channel gating from the global average (Hu et al. 2018): lets a block reweight channels by
    what the whole image holds, which local convolutions alone cannot see."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class RegBottleneck(nn.Module):
    """1x1 conv -> depthwise 3x3 conv -> squeeze-excitation -> 1x1 conv (no activation), plus the
    shortcut (a 1x1 conv + norm where the width changes), then SiLU. Stride 1: the grid is only
    resized by the pooling between the stages."""

    def __init__(self, c_in: int, c_out: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = ConvNormAct(c_in, c_out, 1)
        self.conv2 = ConvNormAct(c_out, c_out, 3, groups=c_out)
        self.se = SqueezeExcite(c_out, max(1, round(c_in * se_ratio)))
        self.conv3 = ConvNormAct(c_out, c_out, 1, act=False)
        self.shortcut = ConvNormAct(c_in, c_out, 1, act=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.shortcut(x))


def _reg_stage(depth: int, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*(RegBottleneck(c_in if i == 0 else c_out, c_out) for i in range(depth)))


# --------------------------------------------------------------------------------------------


class CAbstractor(nn.Module):
    """Honeybee's convolutional abstractor: [N, grid*grid, vision_width] -> [N, n_tokens, llm_dim]."""

    def __init__(self, cfg: ConnectorConfig, vision_width: int, grid: int, llm_dim: int):
        super().__init__()
        side = _square_side(cfg.n_tokens, grid, cfg.kind)
        hidden = cfg.hidden or vision_width
        self.grid, self.n_tokens = grid, cfg.n_tokens
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, vision_width))
        self.stage1 = _reg_stage(cfg.depth, vision_width, hidden)
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.stage2 = _reg_stage(cfg.depth, hidden, hidden)
        self.readout = _mlp(cfg.mlp_depth, hidden if cfg.depth > 0 else vision_width, llm_dim)
        self.init_weights()

    def init_weights(self) -> None:
        _reset_children(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = _to_grid(x, self.grid) + _to_grid(self.pos_embed, self.grid)
        x = self.stage2(self.pool(self.stage1(x)))
        return self.readout(x.flatten(2).transpose(1, 2))


class AvgPoolConnector(nn.Module):
    """Average pooling of the patch grid to sqrt(n_tokens)^2 tokens, then the MLP readout."""

    def __init__(self, cfg: ConnectorConfig, vision_width: int, grid: int, llm_dim: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(_square_side(cfg.n_tokens, grid, cfg.kind))
        self.grid, self.n_tokens = grid, cfg.n_tokens
        self.readout = _mlp(cfg.mlp_depth, vision_width, llm_dim)

    def init_weights(self) -> None:
        _reset_children(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(_to_grid(x, self.grid))
        return self.readout(x.flatten(2).transpose(1, 2))


class AttnPoolConnector(nn.Module):
    """`n_tokens` learned queries, one cross-attention over the patch features (multi-head,
    `hidden` wide, keys and values layer-normed: ViT features have large, uneven scales), then
    the MLP readout. The patch features already carry the ViT's positional embedding."""

    def __init__(self, cfg: ConnectorConfig, vision_width: int, grid: int, llm_dim: int):
        super().__init__()
        if cfg.n_tokens < 1:
            raise ValueError(f"{cfg.kind}: n_tokens must be positive, got {cfg.n_tokens}")
        hidden = cfg.hidden or vision_width
        # the most heads (up to 16) that divide the width: 1280 -> 16 heads of 80, ViT-H's own
        self.n_heads = next(h for h in (16, 8, 4, 2, 1) if hidden % h == 0)
        self.grid, self.n_tokens = grid, cfg.n_tokens
        self.queries = nn.Parameter(torch.empty(cfg.n_tokens, hidden))
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(vision_width)
        self.wq = nn.Linear(hidden, hidden)
        self.wkv = nn.Linear(vision_width, 2 * hidden)
        self.wo = nn.Linear(hidden, hidden)
        self.readout = _mlp(cfg.mlp_depth, hidden, llm_dim)
        self.init_weights()

    def init_weights(self) -> None:
        _reset_children(self)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        if length != self.grid * self.grid:
            raise ValueError(f"expected {self.grid * self.grid} patch tokens, got {length}")
        h = self.n_heads
        q = self.wq(self.norm_q(self.queries)).expand(n, -1, -1)
        k, v = self.wkv(self.norm_kv(x)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # [N, heads, L, d]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.readout(self.wo(y))


CONNECTORS: dict[str, type[nn.Module]] = {
    "c_abstractor": CAbstractor,
    "avg_pool": AvgPoolConnector,
    "attn_pool": AttnPoolConnector,
}


def build_connector(cfg: ConnectorConfig, vision_width: int, grid: int, llm_dim: int) -> nn.Module:
    """The connector of `cfg.kind` (a module with `n_tokens` and `init_weights()`). ValueError for
    an unknown kind, a non-square token count for the pooling kinds, more tokens than patches,
    or depths out of range."""
    if cfg.kind not in CONNECTORS:
        raise ValueError(f"unknown connector kind {cfg.kind!r}; known: {sorted(CONNECTORS)}")
    if cfg.depth < 0 or cfg.mlp_depth < 1:
        raise ValueError(f"depth must be >= 0 and mlp_depth >= 1, got {cfg.depth}, {cfg.mlp_depth}")
    return CONNECTORS[cfg.kind](cfg, vision_width, grid, llm_dim)
