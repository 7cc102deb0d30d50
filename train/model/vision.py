"""The image encoder: an open_clip ViT's visual tower, read out as patch tokens.

MM1 encodes each image with ViT-H/14 at 378 px (DFN-5B weights) and hands the connector its patch
grid: 27 x 27 = 729 tokens of width 1280. open_clip builds the tower and loads the weights (its own
configs, tags and checkpoint reader, `weights_only=True`); this module keeps only the visual tower
(the text tower is dropped to save memory) and runs it block by block so that it can stop at any
layer and return the patch tokens without the CLS token or the contrastive projection.

Which features: `VisionConfig.layer` indexes the transformer blocks like a Python list. The last
block (-1, the default) is read after the tower's final LayerNorm (`ln_post`), i.e. the embedding
CLIP was trained to pool from, minus the projection to the contrastive space; any other block is
read as its raw residual-stream output (LLaVA and Honeybee take the penultimate block, layer=-2).
The blocks after the chosen one are dropped at build: they would cost compute and hold parameters
that never receive a gradient.

Building on the meta device (`with torch.device("meta"): VisionEncoder(cfg)`) allocates nothing
and fetches nothing: that is how the full ViT-H is counted (631,371,520 parameters without the
text tower and the projection) and how a sharded run builds it before materialising. A tower
built there carries no weights: after `to_empty`, `init_weights()` loads them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from train.model.config import VisionConfig

_SCHEMES = ("hf-hub:", "local-dir:")


def _create_clip(cfg: VisionConfig, load_weights: bool, device: torch.device) -> nn.Module:
    """The whole open_clip model of `cfg`, with the weights of `cfg.pretrained` when asked.

    Without weights, a tag still decides the preprocessing (DFN-5B squashes, the default
    resizes the shortest side and crops), so it is passed on as a preprocess override instead of
    as `pretrained`: open_clip would download the checkpoint even with `load_weights=False`.
    """
    import open_clip

    pretrained, preprocess = cfg.pretrained, None
    if not load_weights and pretrained is not None and not cfg.model.startswith(_SCHEMES):
        preprocess = open_clip.get_pretrained_cfg(cfg.model, pretrained) or None  # {} for a file
        pretrained = None
    return open_clip.create_model(
        cfg.model, pretrained=pretrained, load_weights=load_weights, device=device,
        force_preprocess_cfg=preprocess, weights_only=True, **cfg.overrides,
    )


class VisionEncoder(nn.Module):
    """Images [N, 3, H, W] (preprocessed by `preprocess`, H = W = the tower's image size) ->
    patch tokens [N, grid * grid, width] of block `cfg.layer`, in row-major patch order.

    `cfg.pretrained`: an open_clip tag (downloaded by open_clip), a checkpoint file (read by
    open_clip with weights_only), or None (random weights: tests and mechanics only). `frozen`
    turns off `requires_grad` for every parameter; the tower has no dropout or batch norm on
    this path (patch dropout is skipped), so train and eval modes compute the same thing.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        device = torch.get_default_device()
        clip = _create_clip(cfg, load_weights=device.type != "meta", device=device)
        tower = clip.visual
        del clip  # the text tower goes with it
        if not all(hasattr(tower, a) for a in ("conv1", "class_embedding", "positional_embedding")):
            raise ValueError(f"{cfg.model}: not an open_clip VisionTransformer ({type(tower).__name__})")
        if getattr(tower, "attn_pool", None) is not None:
            raise ValueError(f"{cfg.model}: attentional-pool towers (CoCa) have no patch-token readout")
        gh, gw = tower.grid_size
        if gh != gw:
            raise ValueError(f"{cfg.model}: a non-square patch grid {gh}x{gw}")

        blocks = tower.transformer.resblocks
        if not -len(blocks) <= cfg.layer < len(blocks):
            raise ValueError(f"layer {cfg.layer} out of range for a {len(blocks)}-block tower")
        self.block = cfg.layer % len(blocks)
        self.final_norm = self.block == len(blocks) - 1
        tower.transformer.resblocks = blocks[: self.block + 1]
        tower.proj = None  # the contrastive projection: not on the patch-token path
        if not self.final_norm:
            tower.ln_post = nn.Identity()
        self.tower = tower
        self.grid: int = gh
        self.width: int = tower.conv1.out_channels
        self.image_size: int = tower.image_size[0]
        self.preprocess_cfg: dict[str, Any] = dict(tower.preprocess_cfg)
        if cfg.frozen:
            self.requires_grad_(False)

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """open_clip's evaluation transform for this tower: PIL image -> [3, size, size] float
        tensor, with the model's (or its pretrained tag's) resize mode, interpolation, mean and std."""
        import open_clip

        pp = self.preprocess_cfg
        return open_clip.image_transform(
            pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
            resize_mode=pp["resize_mode"], interpolation=pp["interpolation"], fill_color=pp["fill_color"],
        )

    def init_weights(self) -> None:
        """Load the tower's weights again from `cfg.pretrained` (or draw fresh random ones when it
        is None): for a tower built on the meta device and materialised with `to_empty`. Builds a
        temporary open_clip model on CPU and copies the parameters this encoder kept."""
        src = _create_clip(self.cfg, load_weights=True, device=torch.device("cpu")).visual
        mine = self.tower.state_dict()
        theirs = src.state_dict()
        self.tower.load_state_dict({k: theirs[k] for k in mine}, strict=True)

    def forward(self, images: Tensor) -> Tensor:
        t = self.tower
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images of {tuple(images.shape[-2:])}, the tower takes {self.image_size} px")
        x = t.conv1(images.to(t.conv1.weight.dtype))  # [N, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [N, grid*grid, width], row-major patches
        cls = t.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + t.positional_embedding.to(x.dtype)
        x = t.ln_pre(x)
        # open_clip >= 2.24 runs its blocks batch-first; older ones sequence-first
        batch_first = getattr(t.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in t.transformer.resblocks:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        return t.ln_post(x[:, 1:])  # ln_post is the identity unless the last block is read
