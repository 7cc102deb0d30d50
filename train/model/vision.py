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

Weights: `vision_state_dict` reads them without building a CLIP model, so that one rank reads
the checkpoint and broadcasts it (the others never hold a full copy): from a local open_clip
checkpoint file (.pt/.bin read with weights_only, or .safetensors; a whole CLIP state dict, keys
`visual.*`, maybe under "state_dict", maybe with DDP's "module." prefix), or from an open_clip tag
(open_clip's own download path, then the same reader). The tensors come back fp32 whatever the
file holds (master weights are fp32), keyed as `VisionEncoder.state_dict()` keys them. A
checkpoint that does not fit the configured tower (another width, depth or resolution) is refused
with a ValueError that names the keys and both shapes: positional embeddings are not
interpolated to another resolution, as open_clip's own loader would do silently.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from train.data.images import normalize
from train.model.config import VisionConfig
from train.model.fit import misfit_message

_SCHEMES = ("hf-hub:", "local-dir:")  # open_clip names whose weights come with the name


def _has_scheme(cfg: VisionConfig) -> bool:
    return cfg.model.startswith(_SCHEMES)


def _create_clip(cfg: VisionConfig, load_weights: bool, device: torch.device) -> nn.Module:
    """The whole open_clip model of `cfg`, with random weights, or with `load_weights` those that
    an `hf-hub:`/`local-dir:` name brings (tags and files are read by `vision_state_dict`).

    A tag still decides the preprocessing (DFN-5B squashes, the default resizes the shortest side
    and crops), so it is passed on as a preprocess override instead of as `pretrained`: open_clip
    would download the checkpoint even with `load_weights=False`.
    """
    # open_clip: heavy (~6 s to import, torchvision with it): imported where used, not with this module
    import open_clip

    pretrained, preprocess = cfg.pretrained, None
    if pretrained is not None and not _has_scheme(cfg):
        preprocess = open_clip.get_pretrained_cfg(cfg.model, pretrained) or None  # {} for a file
        pretrained = None
    # open_clip warns on the root logger that the model is "initialized randomly" whenever it loads
    # no weights itself: here that is always (a tag or a file is loaded by `vision_state_dict`, and
    # None means random weights by the recipe's choice), so the line would only mislead
    quiet = _DropMessage("No pretrained weights loaded for model")
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(
            cfg.model, pretrained=pretrained, load_weights=load_weights, device=device,
            force_preprocess_cfg=preprocess, weights_only=True, **cfg.overrides,
        )
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class VisionEncoder(nn.Module):
    """Images [N, 3, H, W] (preprocessed by `preprocess`, H = W = the tower's image size) ->
    patch tokens [N, grid * grid, width] of block `cfg.layer`, in row-major patch order.

    `cfg.pretrained`: an open_clip tag (downloaded by open_clip), a local open_clip checkpoint
    file, or None (random weights: tests and mechanics only); built on a real device the encoder
    loads it at once (`vision_state_dict`), on the meta device it waits for `init_weights()`.
    The tower trains unless `cfg.frozen` (MM1 pretrains it with the rest of the model), which
    turns off `requires_grad` for every parameter; the tower has no dropout or batch norm on
    this path (patch dropout is skipped), so train and eval modes compute the same thing.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        device = torch.get_default_device()
        clip = _create_clip(cfg, load_weights=False, device=device)  # weights: init_weights, below
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
        self.depth = len(blocks)  # the whole tower's blocks, those dropped below included
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
        if device.type != "meta" and (cfg.pretrained is not None or _has_scheme(cfg)):
            self.init_weights()
        if cfg.frozen:
            self.requires_grad_(False)

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """open_clip's evaluation transform for this tower: PIL image -> [3, size, size] float
        tensor, with the model's (or its pretrained tag's) resize mode, interpolation, mean and std."""
        # open_clip: heavy (~6 s to import, torchvision with it): imported where used, not with this module
        import open_clip

        pp = self.preprocess_cfg
        return open_clip.image_transform(
            pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
            resize_mode=pp["resize_mode"], interpolation=pp["interpolation"], fill_color=pp["fill_color"],
        )

    def init_weights(self) -> None:
        """Load the tower's weights again from `cfg.pretrained` (or draw fresh random ones when it
        is None): for a tower built on the meta device and materialised with `to_empty`. Reads
        them with `vision_state_dict` and copies them into the parameters in place (their dtype
        and device, `requires_grad` untouched)."""
        self.load_state_dict(_tower_state_dict(self.cfg, self.cfg.pretrained, self), strict=True)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 pixels [N, 3, S, S] (the loader's, resized) -> the tower's input, normalised by
        its preprocessing's mean and std on the images' device; float images pass unchanged."""
        if images.dtype != torch.uint8:
            return images
        pp = self.preprocess_cfg
        return normalize(images, torch.tensor(pp["mean"]).view(3, 1, 1), torch.tensor(pp["std"]).view(3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Images [N, 3, S, S]: float (normalised) or uint8 (normalised here, on the device)."""
        images = self.normalize(images)
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


# weights ------------------------------------------------------------------------------------------


def vision_state_dict(cfg: VisionConfig, source: str | None) -> dict[str, Tensor]:
    """The weights of `VisionEncoder(cfg)`: fp32 tensors on CPU keyed as its `state_dict()` keys
    them (`tower.*`, the kept blocks only), read from `source`:

    - a local open_clip checkpoint file holding a whole CLIP state dict (keys `visual.*`; maybe
      under "state_dict", maybe with "module." prefixes): .safetensors, or .pt/.bin/.pth read
      with `torch.load(weights_only=True)`;
    - an open_clip pretrained tag of `cfg.model` (e.g. "dfn5b"): downloaded (or found in the
      cache) by open_clip, then read as a file;
    - None: fresh random weights, drawn from torch's global generator as open_clip initialises
      them; for an `hf-hub:`/`local-dir:` model, whose weights come with its name, those weights.

    Meant for one rank, which then broadcasts: the text tower and the dropped blocks are read and
    released, never returned. ValueError when the source is neither a file nor a tag of the
    model, or when its tensors do not fit the tower (missing, unexpected, or another shape: the
    message names the source, the keys, and the shapes found and expected)."""
    with torch.device("meta"):  # the shapes to check against: nothing allocated or fetched
        reference = VisionEncoder(replace(cfg, pretrained=None))
    return _tower_state_dict(cfg, source, reference)


def _tower_state_dict(cfg: VisionConfig, source: str | None, encoder: VisionEncoder) -> dict[str, Tensor]:
    """`vision_state_dict`, checked against `encoder` (of the same config; on any device)."""
    if _has_scheme(cfg):
        if source is not None and source != cfg.pretrained:
            raise ValueError(f"{cfg.model}: the weights come with the model's name; a vision source "
                             f"({source!r}) cannot replace them")
        # open_clip resolves the hub repo or folder and loads its checkpoint
        clip_sd = _create_clip(cfg, load_weights=True, device=torch.device("cpu")).state_dict()
        origin = cfg.model
    elif source is None:
        clip_sd = _create_clip(replace(cfg, pretrained=None), load_weights=False, device=torch.device("cpu")).state_dict()
        origin = "random init"
    else:
        path = _checkpoint_file(cfg, source)
        # open_clip: heavy (~6 s to import, torchvision with it): imported where used, not with this module
        from open_clip.factory import load_state_dict  # "state_dict" wrapper, "module." prefix, safetensors

        clip_sd = load_state_dict(path, device="cpu", weights_only=True)
        origin = source if path == source else f"{source} ({path})"
    return _select_tower(clip_sd, encoder, origin)


def _checkpoint_file(cfg: VisionConfig, source: str) -> str:
    """The local file of `source`: an open_clip tag of `cfg.model` (open_clip downloads it, or
    finds it in its cache), else a path to an existing file."""
    # open_clip: heavy (~6 s to import, torchvision with it): imported where used, not with this module
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(cfg.model, source)
    if tag_cfg:
        return open_clip.download_pretrained(tag_cfg)
    if os.path.isfile(source):
        return source
    tags = open_clip.list_pretrained_tags_by_model(cfg.model)
    raise ValueError(f"vision checkpoint {source!r}: neither a file nor an open_clip tag of {cfg.model} "
                     f"(its tags: {tags})")


def _droppable(key: str, encoder: VisionEncoder) -> bool:
    """A tensor of the configured tower that the encoder does not keep: the contrastive
    projection, the blocks after the one it reads, and the final norm when that is not read.
    (A block beyond the tower's depth is another model: unexpected.)"""
    if key == "proj" or (not encoder.final_norm and key.startswith("ln_post.")):
        return True
    m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return m is not None and encoder.block < int(m.group(1)) < encoder.depth


def _select_tower(clip_sd: Mapping[str, Tensor], encoder: VisionEncoder, origin: str) -> dict[str, Tensor]:
    """The encoder's tensors (fp32) out of a whole CLIP state dict, or a ValueError naming every
    difference (the first few of each kind)."""
    found = {k.removeprefix("visual."): v for k, v in clip_sd.items() if k.startswith("visual.")}
    cfg = encoder.cfg
    model = cfg.model + (" with overrides" if cfg.overrides else "")
    where = (f"vision checkpoint {origin} does not fit {model} (width {encoder.width}, {encoder.depth} blocks, "
             f"a {encoder.grid}x{encoder.grid} patch grid; reading layer {cfg.layer})")
    if not found:
        raise ValueError(f"{where}: it holds no visual.* tensors (an open_clip CLIP state dict has them); "
                         f"its first keys: {list(clip_sd)[:5]}")
    expected = {k.removeprefix("tower."): v for k, v in encoder.state_dict().items()}
    wrong = [f"visual.{k}: found {list(found[k].shape)}, expected {list(v.shape)}"
             for k, v in expected.items() if k in found and found[k].shape != v.shape]
    missing = [f"visual.{k}" for k in expected if k not in found]
    unexpected = [f"visual.{k}" for k in found if k not in expected and not _droppable(k, encoder)]
    message = misfit_message(where + ":", wrong=wrong, missing=missing, unexpected=unexpected)
    if message:
        raise ValueError(message)
    return {f"tower.{k}": _fp32(found[k]) for k in expected}


def _fp32(t: Tensor) -> Tensor:
    """Master weights are fp32 whatever the file holds; contiguous, ready to broadcast."""
    return (t.float() if t.is_floating_point() else t).contiguous()
