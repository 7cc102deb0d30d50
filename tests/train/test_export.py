"""Export, reload and greedy generation (train/export.py, train/generate.py) on the tiny MM1
configs (random weights: mechanics only, nothing about quality).

- an export loads back to the same logits, bit for bit, dense and MoE, float32 and bf16;
- its `decoder_hf/` folder loads in transformers with our decoder's text logits (atol 1e-5, as
  tests/train/model/test_hf.py: the same math in another operation order);
- greedy generation is deterministic, never emits the image placeholder even when it is the
  argmax, stops at eos, and respects its length bounds;
- a few dozen AdamW steps on two (image, caption) pairs make generation after each image give its
  own caption: the first caption token can only come from the image (image-conditioned decoding).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from train.export import export_model, load_exported, mm1_config_from_dict
from train.generate import greedy_generate, prompt_with_image
from train.model.mm1 import MM1, text_labels
from train.model.registry import REGISTRY, get_config

TOL = dict(atol=1e-5, rtol=1e-5)


def _tiny(name: str = "tiny", seed: int = 0, **decoder_changes) -> MM1:
    cfg = get_config(name)
    if decoder_changes:
        cfg = replace(cfg, decoder=replace(cfg.decoder, **decoder_changes))
    torch.manual_seed(seed)
    return MM1(cfg).eval()


def _inputs(model: MM1, n_text: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Text, an image run, text; and the image."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, model.image_token_id, (n_text,), generator=g)
    run = torch.full((model.n_image_tokens,), model.image_token_id)
    tokens = torch.cat([text[: n_text // 2], run, text[n_text // 2:]]).unsqueeze(0)
    side = model.vision.image_size
    return tokens, torch.randn(1, 3, side, side, generator=g)


@pytest.fixture(scope="module")
def tiny() -> MM1:
    return _tiny()


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_export_then_load_gives_identical_logits(name: str, tmp_path: Path) -> None:
    model = _tiny(name)
    summary = export_model(model, tmp_path)
    loaded = load_exported(tmp_path).eval()

    assert loaded.cfg == replace(model.cfg, vision=replace(model.cfg.vision, pretrained=None))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["registry_name"] == name and meta["vision_pretrained_source"] is None
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    if name == "tiny-moe":
        assert summary["decoder_hf"] is None and "MoE" in summary["decoder_hf_skipped"]
        assert not (tmp_path / "decoder_hf").exists()
    else:
        assert (tmp_path / "decoder_hf" / "config.json").is_file() and summary["decoder_hf_skipped"] is None
    # every file gets the mode any file the user writes gets (safetensors alone makes it 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(f.stat().st_mode & 0o777) for f in tmp_path.rglob("*") if f.is_file()} == {oct(0o666 & ~umask)}

    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # requires_grad survives the assignment: a frozen part stays frozen
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    tokens, images = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, images).logits, model(tokens, images).logits)


def test_export_keeps_dtype_and_preprocessing(tmp_path: Path) -> None:
    """bf16 weights stay bf16; the tower's preprocessing (which a pretrained tag decides, and
    which the exported config no longer names) comes back as exported."""
    model = _tiny().to(torch.bfloat16)
    model.vision.preprocess_cfg = {**model.vision.preprocess_cfg, "resize_mode": "squash"}  # as DFN-5B's tag
    export_model(model, tmp_path, hf_decoder=False)
    assert not (tmp_path / "decoder_hf").exists()
    loaded = load_exported(tmp_path)
    assert loaded.vision.preprocess_cfg == model.vision.preprocess_cfg
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_decoder_folder_matches_in_transformers(tied: bool, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = _tiny(tie_embeddings=tied)
    with torch.no_grad():  # a wider init than 0.02, so the logits are not all near zero
        model.decoder.init_weights(std=0.1)
    export_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "decoder_hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, model.image_token_id, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens).logits  # text only: MM1 with no images is its decoder
        theirs = hf(tokens).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, **TOL)


def test_config_dicts_round_trip_through_json() -> None:
    for cfg in REGISTRY.values():
        assert mm1_config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    bad = get_config("tiny").to_dict()
    bad["decoder"]["n_layerz"] = 3
    with pytest.raises(ValueError, match="n_layerz"):
        mm1_config_from_dict(bad)


def test_load_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an mm1-export"):
        load_exported(tmp_path)


def test_prompt_with_image_is_the_pair_layout(tiny: MM1) -> None:
    prompt = prompt_with_image([7, 8], 2, tiny)
    assert prompt.dtype == torch.long
    assert prompt.tolist() == [[tiny.image_token_id] * (2 * tiny.n_image_tokens) + [7, 8]]
    with pytest.raises(ValueError):
        prompt_with_image([tiny.image_token_id], 1, tiny)


def test_greedy_is_deterministic_and_bounded(tiny: MM1) -> None:
    tokens, images = _inputs(tiny)
    tiny.train()
    first = greedy_generate(tiny, tokens, images, max_new_tokens=6)
    assert tiny.training  # the mode is put back
    tiny.eval()
    assert first == greedy_generate(tiny, tokens, images, max_new_tokens=6)
    assert len(first) == 6 and all(0 <= t < tiny.cfg.decoder.vocab_size for t in first)
    assert greedy_generate(tiny, tokens, images, max_new_tokens=0) == []
    # text only
    assert len(greedy_generate(tiny, tokens[:, :3], None, max_new_tokens=3)) == 3
    # the decoder's max_seq_len bounds the whole sequence
    room = 2
    long = torch.randint(0, tiny.image_token_id, (1, tiny.cfg.decoder.max_seq_len - room))
    assert len(greedy_generate(tiny, long, None, max_new_tokens=10)) == room


def test_greedy_stops_at_eos(tiny: MM1) -> None:
    tokens, images = _inputs(tiny)
    free = greedy_generate(tiny, tokens, images, max_new_tokens=8)
    eos = free[3]
    stopped = greedy_generate(tiny, tokens, images, max_new_tokens=8, eos_id=eos)
    assert stopped == free[: free.index(eos) + 1] and stopped[-1] == eos


def test_greedy_never_emits_the_image_placeholder(tiny: MM1) -> None:
    """Push the placeholder's logit to the top with a forward hook: the model's argmax is the
    image id, generation still never picks it."""
    tokens, images = _inputs(tiny)

    def favour_image(module, inputs, output):
        output = output.clone()
        output[..., tiny.image_token_id] += 1e3
        return output

    handle = tiny.decoder.output.register_forward_hook(favour_image)
    try:
        with torch.no_grad():
            assert int(tiny(tokens, images).logits[0, -1].argmax()) == tiny.image_token_id
        out = greedy_generate(tiny, tokens, images, max_new_tokens=5)
    finally:
        handle.remove()
    assert len(out) == 5 and tiny.image_token_id not in out


def test_memorised_captions_follow_their_images() -> None:
    """Two (image, caption) pairs in the data path's layout ([image run] caption [eos]), 60 full-
    batch AdamW steps from random init: greedy decoding after each image alone gives that image's
    caption and eos. The captions start with different tokens, so the first one must be read from
    the image. (Converged on every seed tried, in about a second on one CPU thread.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend on a shared machine
    try:
        _memorise_and_generate()
    finally:
        torch.set_num_threads(threads)


def _memorise_and_generate() -> None:
    model = _tiny(seed=0).train()
    g = torch.Generator().manual_seed(100)
    eos = 1
    captions = [torch.randint(2, model.image_token_id, (8,), generator=g).tolist() for _ in range(2)]
    captions[1][0] = captions[0][0] + 1
    side = model.vision.image_size
    images = torch.randn(2, 3, side, side, generator=g)
    tokens = torch.cat([prompt_with_image(c + [eos], 1, model) for c in captions])
    labels = text_labels(tokens, model.image_token_id)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = model(tokens, images, labels=labels)
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.2 * losses[0]

    for i, caption in enumerate(captions):
        got = greedy_generate(model, prompt_with_image([], 1, model), images[i:i + 1], max_new_tokens=12, eos_id=eos)
        assert got == caption + [eos]
