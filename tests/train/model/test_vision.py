"""The vision encoder on tiny open_clip towers with random weights: these test mechanics (shapes,
layer choice, freezing, weight loading, preprocessing), not features. The full ViT-H is only built
on the meta device (counted, never allocated or downloaded). Checkpoints are tiny CLIP models
saved to tmp_path: no tag is ever fetched."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import open_clip
import pytest
import torch
from PIL import Image

from train.model.config import VisionConfig
from train.model.registry import REGISTRY, TINY_VISION
from train.model.vision import VisionEncoder, vision_state_dict

# A 2-block ViT at 56 px with 14 px patches: a 4x4 grid of width 64 (2 heads); a tiny text tower
# too, since open_clip builds the whole CLIP model before the encoder drops it.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 56, "patch_size": 14, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def _cfg(**kw) -> VisionConfig:
    return VisionConfig(**{"model": "ViT-H-14-378-quickgelu", "pretrained": None, "overrides": TINY, **kw})


def _encoder(seed: int = 0, **kw) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(_cfg(**kw))


def test_patch_tokens_shape_and_attributes(caplog):
    with caplog.at_level("WARNING"):
        enc = _encoder()
    # open_clip's "initialized randomly" line would mislead: our loader brings the weights, or none by choice
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    out = enc(torch.randn(3, 3, 56, 56))
    assert out.shape == (3, 16, 64)
    assert (enc.grid, enc.width, enc.n_patches, enc.image_size) == (4, 64, 16, 56)
    assert torch.isfinite(out).all()
    # only the visual tower is kept, and no contrastive projection
    visual = open_clip.create_model("ViT-H-14-378-quickgelu", pretrained=None, **TINY).visual
    n_visual = sum(p.numel() for p in visual.parameters())
    assert enc.tower.proj is None
    assert sum(p.numel() for p in enc.parameters()) == n_visual - visual.proj.numel()
    with pytest.raises(ValueError, match="56 px"):
        enc(torch.randn(1, 3, 64, 64))


def _reference(tower: torch.nn.Module, images: torch.Tensor, block: int, norm: bool) -> torch.Tensor:
    """open_clip's own intermediate-feature path, as an independent check of the encoder's loop."""
    out = tower.forward_intermediates(
        images, indices=[block], normalize_intermediates=norm, intermediates_only=True, output_fmt="NLC")
    return out["image_intermediates"][0]


@pytest.mark.parametrize("layer", [-1, -2, 0, 1])
def test_layer_selection_matches_open_clip(layer):
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-H-14-378-quickgelu", pretrained=None, **TINY).eval()
    enc = _encoder(layer=layer)
    enc.tower.load_state_dict(
        {k: v for k, v in clip.visual.state_dict().items() if k in enc.tower.state_dict()}, strict=True)
    images = torch.randn(2, 3, 56, 56)
    block = layer % 2
    with torch.no_grad():
        want = _reference(clip.visual, images, block, norm=block == 1)
        got = enc(images)
    torch.testing.assert_close(got, want)
    # the blocks after the chosen one are not kept; ln_post only on the last block
    assert len(enc.tower.transformer.resblocks) == block + 1
    assert enc.final_norm == (block == 1)


def test_layers_give_different_features():
    images = torch.randn(2, 3, 56, 56)
    last, first = _encoder(layer=-1)(images), _encoder(layer=0)(images)
    assert last.shape == first.shape
    assert not torch.allclose(last, first)
    with pytest.raises(ValueError, match="out of range"):
        _encoder(layer=2)


def test_the_tower_trains_by_default_in_every_size():
    """MM1 pretrains the whole model: freezing the tower is a recipe's explicit choice."""
    assert VisionConfig().frozen is False
    assert all(not cfg.vision.frozen for cfg in REGISTRY.values())
    assert all(p.requires_grad for p in _encoder().parameters())


def test_frozen_has_no_grad_and_unfrozen_trains():
    frozen = _encoder(frozen=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    images = torch.randn(2, 3, 56, 56, requires_grad=True)
    assert not frozen(torch.randn(2, 3, 56, 56)).requires_grad
    frozen(images).sum().backward()  # gradients still reach the input (nothing to update inside)
    assert images.grad is not None and all(p.grad is None for p in frozen.parameters())

    live = _encoder(frozen=False)
    live(torch.randn(2, 3, 56, 56)).square().mean().backward()
    assert all(p.grad is not None for p in live.parameters())


def test_checkpoint_file_loads_and_meta_build_then_init_weights(tmp_path):
    torch.manual_seed(7)
    clip = open_clip.create_model("ViT-H-14-378-quickgelu", pretrained=None, **TINY)
    path = tmp_path / "tiny-clip.pt"
    torch.save({"state_dict": clip.state_dict()}, path)  # the layout open_clip's trainer writes
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = _reference(clip.visual.eval(), images, 1, norm=True)

    loaded = _encoder(seed=99, pretrained=str(path))  # only the file can make these equal
    torch.testing.assert_close(loaded(images), want)

    with torch.device("meta"):
        lazy = VisionEncoder(_cfg(pretrained=str(path)))
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    torch.testing.assert_close(lazy(images), want)
    assert all(p.requires_grad for p in lazy.parameters())  # the tower trains unless frozen


def test_preprocess_gives_the_tower_size():
    enc = _encoder()
    x = enc.preprocess(Image.new("RGB", (120, 80), (200, 30, 30)))
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    assert enc(x[None]).shape == (1, 16, 64)


def test_uint8_images_are_normalised_by_the_tower_like_the_loaders_floats():
    """The loader may ship resized uint8 pixels (a quarter of the bytes); the tower normalises
    them on their device with its own mean/std, giving exactly the loader's float path."""
    import io

    from train.data.images import ImagePreprocessor

    enc = _encoder()
    buf = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 30, 90)).save(buf, "PNG")
    pp = enc.preprocess_cfg
    as_float = ImagePreprocessor(56, pp["mean"], pp["std"])(buf.getvalue())
    as_uint8 = ImagePreprocessor(56, pp["mean"], pp["std"], uint8=True)(buf.getvalue())
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 56, 56)
    assert torch.equal(enc.normalize(as_uint8[None])[0], as_float)
    torch.testing.assert_close(enc(as_uint8[None]), enc(as_float[None]))


def test_mm1_vit_h_on_meta_counts_and_takes_dfn5b_preprocessing():
    """The default config (ViT-H/14 at 378 px, DFN-5B): built on meta, nothing is allocated and
    the tag is not fetched, but its preprocessing (squash resize, bicubic) is still used."""
    cfg = VisionConfig()
    assert (cfg.model, cfg.pretrained, cfg.layer) == ("ViT-H-14-378-quickgelu", "dfn5b", -1)
    with torch.device("meta"):
        enc = VisionEncoder(cfg)
    n = sum(p.numel() for p in enc.parameters())
    # ViT-H/14 visual tower: 632,682,240 with the 1280x1024 projection, which the encoder drops
    assert n == 631_371_520
    assert (enc.grid, enc.width, enc.n_patches, enc.image_size) == (27, 1280, 729, 378)
    assert enc.preprocess_cfg["resize_mode"] == "squash"
    assert enc.preprocess_cfg["interpolation"] == "bicubic"
    x = enc.preprocess(Image.new("RGB", (500, 300)))
    assert x.shape == (3, 378, 378)

    penultimate = dataclasses.replace(cfg, layer=-2)
    with torch.device("meta"):
        shorter = VisionEncoder(penultimate)
    assert len(shorter.tower.transformer.resblocks) == 31
    assert sum(p.numel() for p in shorter.parameters()) < n


# vision_state_dict: the tower's weights from a local open_clip checkpoint --------------------------


def _tiny_clip(seed: int = 0, **vision) -> torch.nn.Module:
    """The registry's tiny CLIP (TINY_VISION), its vision config changed by `vision`."""
    torch.manual_seed(seed)
    overrides = dict(TINY_VISION.overrides)
    overrides["vision_cfg"] = {**overrides["vision_cfg"], **vision}
    return open_clip.create_model(TINY_VISION.model, pretrained=None, **overrides)


def _save(sd: dict, path, dtype=None) -> str:
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # a DDP trainer's layout
    return str(path)


@pytest.mark.parametrize("name, dtype", [("clip.pt", None), ("clip.safetensors", None),
                                         ("clip-bf16.bin", torch.bfloat16), ("clip-bf16.safetensors", torch.bfloat16)])
def test_vision_state_dict_reads_a_local_checkpoint_as_fp32(tmp_path, name, dtype):
    clip = _tiny_clip(seed=3)
    saved = {k: (v.to(dtype) if dtype is not None else v) for k, v in clip.state_dict().items()}
    path = _save(saved, tmp_path / name)

    sd = vision_state_dict(TINY_VISION, path)
    enc = VisionEncoder(TINY_VISION)
    assert list(sd) == list(enc.state_dict())  # our keys, in our order: tower.*, no projection
    assert all(k.startswith("tower.") for k in sd) and "tower.proj" not in sd
    for key, value in sd.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        torch.testing.assert_close(value, saved["visual." + key.removeprefix("tower.")].float(), rtol=0, atol=0)

    # the encoder built with the file as `pretrained`, directly or on meta then init_weights
    images = torch.randn(2, 3, 56, 56)
    loaded = VisionEncoder(replace(TINY_VISION, pretrained=path))
    with torch.device("meta"):
        lazy = VisionEncoder(replace(TINY_VISION, pretrained=path))
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    enc.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), enc(images))
        torch.testing.assert_close(lazy(images), enc(images))


def test_vision_state_dict_keeps_only_the_blocks_read(tmp_path):
    path = _save(_tiny_clip().state_dict(), tmp_path / "clip.pt")
    first = replace(TINY_VISION, layer=0)
    sd = vision_state_dict(first, path)
    assert list(sd) == list(VisionEncoder(first).state_dict())
    assert not any(k.startswith(("tower.transformer.resblocks.1.", "tower.ln_post.")) for k in sd)


def test_vision_state_dict_of_none_is_a_random_init():
    torch.manual_seed(0)
    a = vision_state_dict(TINY_VISION, None)
    torch.manual_seed(0)
    b = vision_state_dict(TINY_VISION, None)
    assert list(a) == list(VisionEncoder(TINY_VISION).state_dict())
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)


def test_a_checkpoint_of_another_size_is_refused_naming_keys_and_shapes(tmp_path):
    wide = _save(_tiny_clip(width=128).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError) as err:
        vision_state_dict(TINY_VISION, wide)
    msg = str(err.value)
    assert "wide.pt" in msg and TINY_VISION.model in msg
    assert "visual.conv1.weight: found [128, 3, 14, 14], expected [64, 3, 14, 14]" in msg

    deeper = _save(_tiny_clip(layers=3).state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): \['visual\.transformer\.resblocks\.2\."):
        vision_state_dict(TINY_VISION, deeper)
    with pytest.raises(ValueError, match="resblocks.2"):  # whichever block is read: another model
        vision_state_dict(replace(TINY_VISION, layer=0), deeper)

    sd = {k: v for k, v in _tiny_clip().state_dict().items() if k != "visual.ln_pre.weight"}
    with pytest.raises(ValueError, match=r"missing \(1\): \['visual\.ln_pre\.weight'\]"):
        vision_state_dict(TINY_VISION, _save(sd, tmp_path / "holed.safetensors"))

    with pytest.raises(ValueError, match="no visual"):
        vision_state_dict(TINY_VISION, _save({"text.weight": torch.zeros(2)}, tmp_path / "text.pt"))
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        vision_state_dict(TINY_VISION, str(tmp_path / "absent.pt"))


def test_a_tag_goes_through_open_clips_download_path(tmp_path, monkeypatch):
    """A tag is resolved by open_clip (its pretrained config, its download and cache) to a file,
    then read like any file. The download is replaced by the local file: nothing is fetched."""
    path = _save(_tiny_clip(seed=5).state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    asked = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, *a, **kw: asked.append(cfg) or path)
    tag = open_clip.list_pretrained_tags_by_model(TINY_VISION.model)[0]
    sd = vision_state_dict(TINY_VISION, tag)
    assert asked == [open_clip.get_pretrained_cfg(TINY_VISION.model, tag)]
    assert torch.equal(sd["tower.conv1.weight"], torch.load(path)["state_dict"]["module.visual.conv1.weight"])
