"""Whole-model pretraining from pretrained parts (random weights: mechanics only, nothing is
downloaded): the MM1 sizes train their tower unless the recipe freezes it; the decoder starts
from a bf16 Hugging Face checkpoint with fp32 master weights and fp32 AdamW states; the tower
starts from a local open_clip checkpoint named by the recipe; a dense checkpoint upcycles into
an MoE size's experts; initial weights of another shape fail at start naming the key; the
optimizer's groups keep decay off norms, biases and embeddings and apply the lr multipliers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.mesh import ParallelDims
from train.recipe import load_train_recipe, parse_train_recipe
from train.trainer import build_model, build_optimizer, model_config, param_groups, train_step

ROOT = Path(__file__).resolve().parents[2]
ONE = ParallelDims(1, 1, 1, 1)


def _recipe(**model):
    return parse_train_recipe({"name": "t", "model": {"name": "tiny", **model}, "steps": 1, "precision": "fp32",
                               "data": {"outs": ["unused"], "tokenizer": "unused", "seq_len": 32},
                               "optim": {"lr": 1e-3, "vision_lr_mult": 0.5, "connector_lr_mult": 2.0}})


def _batch(cfg, n_images: int = 1) -> dict:
    from train.model.mm1 import text_labels

    image, n = cfg.image_token_id, cfg.connector.n_tokens
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, image, (1, 32), generator=gen)
    tokens[0, 2:2 + n * n_images] = image
    doc_ids = torch.zeros_like(tokens)
    return {"tokens": tokens, "doc_ids": doc_ids, "labels": text_labels(tokens, image, doc_ids),
            "token_mask": torch.ones_like(tokens, dtype=torch.bool),
            "images": torch.randn(n_images, 3, 56, 56, generator=gen)}


@pytest.mark.parametrize("name", ["mm1-3b.yaml", "mm1-7b.yaml", "mm1-3b-moe.yaml"])
def test_mm1_recipes_train_the_tower_unless_frozen(name):
    from train.model.mm1 import MM1

    path = ROOT / "recipes" / "train" / name
    for freeze in (None, True):
        overrides = {"model.decoder_checkpoint": None, "model.vision_checkpoint": None}
        if freeze:
            overrides["model.freeze_vision"] = True
        recipe = load_train_recipe(path, overrides)
        cfg = model_config(recipe, vocab=50_000, image_token_id=49_999)
        with torch.device("meta"):
            model = MM1(cfg)
        tower = [p.requires_grad for p in model.vision.parameters()]
        assert all(tower) if not freeze else not any(tower)
        names = {g["name"] for g in param_groups(model, recipe.optim, 1e-4)}
        assert ("vision" in names) != bool(freeze) and "connector" in names


def test_param_groups_decay_and_multipliers():
    recipe = _recipe()
    model = build_model(recipe, model_config(recipe, 512, 511), ONE, torch.device("cpu"))
    groups = {g["name"]: g for g in param_groups(model, recipe.optim, 1e-3)}
    assert groups["vision"]["lr"] == 5e-4 and groups["connector"]["lr"] == 2e-3 and groups["decoder"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 0.0 for n, g in groups.items() if n.endswith("no_decay"))
    no_decay = {id(p) for n, g in groups.items() if n.endswith("no_decay") for p in g["params"]}
    named = dict(model.named_parameters())
    for key in ("decoder.tok_embeddings.weight", "vision.tower.positional_embedding", "vision.tower.class_embedding",
                "connector.pos_embed", "decoder.norm.weight", "vision.tower.ln_pre.bias"):
        assert id(named[key]) in no_decay, key
    assert id(named["decoder.layers.0.attention.wq.weight"]) not in no_decay


def _bf16_llama(path: Path, vocab: int = 512) -> dict[str, torch.Tensor]:
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    hf.save_pretrained(path)
    return {k: v.clone() for k, v in hf.state_dict().items()}


def test_a_bf16_decoder_checkpoint_trains_with_fp32_masters_and_adam_states(tmp_path):
    saved = _bf16_llama(tmp_path / "llm")
    recipe = _recipe(decoder_checkpoint=str(tmp_path / "llm"))
    cfg = model_config(recipe, 500, 511)
    model = build_model(recipe, cfg, ONE, torch.device("cpu"))
    assert model.cfg.decoder.dim == 64 and model.cfg.decoder.ffn_hidden == 96
    # the decoder holds the checkpoint's values, upcast
    assert torch.equal(model.decoder.layers[1].attention.wq.weight, saved["model.layers.1.self_attn.q_proj.weight"].float())
    optimizer = build_optimizer(model, recipe.optim, 1e-3)
    result = train_step(model, optimizer, [_batch(cfg)], dims=ONE, device=torch.device("cpu"))
    assert not result.skipped
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    states = [t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(states) == 2 * len(trainable) and all(t.dtype == torch.float32 for t in states)


def test_a_dense_checkpoint_upcycles_into_the_experts(tmp_path):
    saved = _bf16_llama(tmp_path / "llm")
    recipe = parse_train_recipe({"name": "t", "model": {"name": "tiny-moe", "decoder_checkpoint": str(tmp_path / "llm")},
                                 "steps": 1, "data": {"outs": ["u"], "tokenizer": "u", "seq_len": 32}})
    model = build_model(recipe, model_config(recipe, 500, 511), ONE, torch.device("cpu"))
    moe = model.decoder.layers[1].feed_forward
    dense = saved["model.layers.1.mlp.gate_proj.weight"].float()
    assert all(torch.equal(moe.w1[e], dense) for e in range(moe.w1.shape[0]))


def test_the_tower_starts_from_a_local_open_clip_checkpoint(tmp_path):
    import open_clip

    from train.model.registry import TINY_VISION

    torch.manual_seed(3)
    clip = open_clip.create_model(TINY_VISION.model, pretrained=None, **TINY_VISION.overrides)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    recipe = _recipe(vision_checkpoint=str(tmp_path / "clip.pt"))
    model = build_model(recipe, model_config(recipe, 512, 511), ONE, torch.device("cpu"))
    theirs = clip.visual.state_dict()
    for key, value in model.vision.tower.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    assert all(p.requires_grad for p in model.vision.parameters())


def test_initial_weights_of_another_shape_fail_naming_the_key():
    recipe = _recipe()
    cfg = model_config(recipe, 512, 511)
    from train.model.mm1 import MM1

    state = MM1(cfg).state_dict()
    state["decoder.norm.weight"] = torch.ones(65)
    del state["connector.pos_embed"]
    with pytest.raises(ValueError) as err:
        build_model(recipe, cfg, ONE, torch.device("cpu"), state=state)
    assert "decoder.norm.weight: found [65], expected [64]" in str(err.value)
    assert "missing (1): ['connector.pos_embed']" in str(err.value)


def test_the_mm1_lr_rule_counts_an_moe_by_its_active_parameters():
    """`lr: mm1` on an MoE size: N = the parameters every token trains (the decoder's active
    count from the registry, plus the tower and the connector), not the total."""
    from train.model.mm1 import MM1
    from train.model.registry import decoder_param_counts
    from train.trainer import _inactive_expert_params

    recipe = load_train_recipe(ROOT / "recipes" / "train" / "mm1-3b-moe.yaml",
                               {"model.decoder_checkpoint": None, "model.vision_checkpoint": None})
    cfg = model_config(recipe, 50_000, 49_999)
    with torch.device("meta"):
        model = MM1(cfg)
    total = sum(p.numel() for p in model.parameters())
    image_side = sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.connector.parameters())
    assert total - _inactive_expert_params(cfg) == decoder_param_counts(cfg.decoder)["active"] + image_side
    assert _inactive_expert_params(model_config(_recipe(), 512, 511)) == 0
