"""The Hugging Face adapter (train/model/hf.py) against transformers itself: tiny Llama, Mistral
and Qwen2 models with random weights (mechanics only: nothing is downloaded, no real checkpoint is
used) give the same logits through our Decoder, and our exports load back losslessly, in our code
and in transformers.

Tolerance: float32, atol = rtol = 1e-5 on logits of magnitude ~3 (measured differences ~2e-6:
the same math in a different operation order).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers  # the reference implementation (the dev extra installs it)
from safetensors.torch import load_file

from train.model.config import DecoderConfig, MoEConfig
from train.model.decoder import Decoder
from train.model.hf import (
    decoder_config_from_hf,
    from_hf_state_dict,
    hf_config_from_decoder,
    load_hf_decoder,
    read_hf_decoder,
    save_hf,
    to_hf_state_dict,
)


TOL = dict(atol=1e-5, rtol=1e-5)
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=500_000.0,
    rms_norm_eps=1e-5,
)
CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama_tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),  # q/k/v biases
}


def tiny_hf_model(name: str, **overrides):
    """A random-weight HF causal LM. Every tensor, norms and biases included, is drawn at random
    (HF's own init leaves norms at 1 and biases at 0, which would hide a swapped or dropped one)."""
    config_cls, extra = CASES[name]
    config = config_cls(**{**TINY, **extra, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0 if "norm" in pname else 0.0, 0.1)
    return model


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out.logits


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_hf_decoder_matches_transformers(name: str, tokens: torch.Tensor, tmp_path: Path) -> None:
    hf = tiny_hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf_decoder(tmp_path).eval()
    assert ours.cfg.tie_embeddings == (name == "llama_tied")
    assert ours.cfg.qkv_bias == (name == "qwen2")
    assert ours.cfg.rope_theta == TINY["rope_theta"] and ours.cfg.norm_eps == TINY["rms_norm_eps"]
    torch.testing.assert_close(logits_of(ours, tokens), logits_of(hf, tokens), **TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_hf_round_trip_is_lossless(name: str, tokens: torch.Tensor, tmp_path: Path) -> None:
    tiny_hf_model(name).save_pretrained(tmp_path / "src")
    ours = load_hf_decoder(tmp_path / "src").eval()
    model_type = {"llama_tied": "llama"}.get(name, name)
    save_hf(ours, tmp_path / "export", model_type=model_type)

    again = load_hf_decoder(tmp_path / "export")
    assert again.cfg == ours.cfg
    theirs, mine = again.state_dict(), ours.state_dict()
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert type(hf).__name__ == hf_config_from_decoder(ours.cfg, model_type)["architectures"][0]
    assert hf.dtype == torch.float32
    torch.testing.assert_close(logits_of(hf, tokens), logits_of(ours, tokens), **TOL)


def test_export_of_a_decoder_trained_here(tokens: torch.Tensor, tmp_path: Path) -> None:
    """A decoder born in this repo (not from HF) exports as a Llama transformers runs the same."""
    cfg = DecoderConfig(vocab_size=128, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_hidden=80, max_seq_len=32)
    torch.manual_seed(0)
    ours = Decoder(cfg).eval()
    ours.init_weights(std=0.1)
    save_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits_of(hf, tokens), logits_of(ours, tokens), **TOL)


def test_sharded_safetensors_and_bin_checkpoints(tokens: torch.Tensor, tmp_path: Path) -> None:
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    expected = logits_of(hf, tokens)
    torch.testing.assert_close(logits_of(load_hf_decoder(tmp_path / "sharded"), tokens), expected, **TOL)

    # An old-style checkpoint: pytorch_model.bin (read with weights_only=True) holding a stale
    # rotary inv_freq buffer, which is ignored.
    (tmp_path / "bin").mkdir()
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "bin" / "config.json")
    loaded = load_hf_decoder(tmp_path / "bin", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    torch.testing.assert_close(logits_of(load_hf_decoder(tmp_path / "bin"), tokens), expected, **TOL)


def test_mistral_sliding_window_caps_the_sequence_length(tmp_path: Path) -> None:
    """Up to the window, windowed attention is plain causal attention: same logits at exactly the
    window's length, and a longer sequence is refused rather than computed differently."""
    hf = tiny_hf_model("mistral", sliding_window=8)
    hf.save_pretrained(tmp_path)
    ours = load_hf_decoder(tmp_path)
    assert ours.cfg.max_seq_len == 8
    tokens = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(logits_of(ours, tokens), logits_of(hf, tokens), **TOL)
    with pytest.raises(ValueError, match="max_seq_len"):
        ours(torch.randint(0, 128, (1, 9)))


def test_both_config_formats_read_the_same() -> None:
    v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "rope_theta": 1e6, "rope_scaling": None}
    v5 = {k: v for k, v in v4.items() if not k.startswith("rope")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert decoder_config_from_hf(v4) == decoder_config_from_hf(v5)
    cfg = decoder_config_from_hf(v4)
    assert cfg.kv_heads == 2 and cfg.rope_theta == 1e6 and cfg.hidden == 16
    assert decoder_config_from_hf(hf_config_from_decoder(cfg)) == cfg


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "gpt2"}, "not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling 'yarn'"),
        ({"head_dim": 8}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_what_cannot_be_reproduced_is_refused(change: dict, words: str) -> None:
    hf = hf_config_from_decoder(DecoderConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, ffn_hidden=16)) | change
    with pytest.raises(ValueError, match=words):
        decoder_config_from_hf(hf)


def test_state_dict_mismatches_and_moe_are_refused() -> None:
    cfg = DecoderConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, ffn_hidden=16)
    hf_sd = to_hf_state_dict(Decoder(cfg))
    with pytest.raises(ValueError, match=r"missing \(1\): \['model.layers.0.self_attn.q_proj.weight'\]"):
        from_hf_state_dict(cfg, {k: v for k, v in hf_sd.items() if "q_proj" not in k})
    with pytest.raises(ValueError, match=r"unexpected \(1\): \['model.layers.1.mlp.up_proj.weight'\]"):
        from_hf_state_dict(cfg, hf_sd | {"model.layers.1.mlp.up_proj.weight": torch.zeros(16, 8)})
    with pytest.raises(ValueError, match=r"model.norm.weight: found \[4\], expected \[8\]"):
        from_hf_state_dict(cfg, hf_sd | {"model.norm.weight": torch.zeros(4)})
    moe = DecoderConfig(vocab_size=16, dim=8, n_layers=2, n_heads=2, ffn_hidden=16, moe=MoEConfig(n_experts=4))
    with pytest.raises(ValueError, match="MoE"):
        hf_config_from_decoder(moe)
    with pytest.raises(ValueError, match="qkv_bias"):
        hf_config_from_decoder(cfg, model_type="qwen2")


def test_a_bf16_checkpoint_is_read_as_fp32(tokens: torch.Tensor, tmp_path: Path) -> None:
    """Master weights and optimizer states are fp32: a bf16 checkpoint (most are) is upcast, every
    value kept exactly (bf16 -> fp32 is lossless)."""
    hf = tiny_hf_model("qwen2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}

    cfg, sd = read_hf_decoder(tmp_path)
    assert cfg == decoder_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    expected = from_hf_state_dict(cfg, stored)
    assert sd.keys() == expected.keys()
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], expected[k].float()) for k in sd)
    decoder = load_hf_decoder(tmp_path)
    assert all(p.dtype == torch.float32 for p in decoder.parameters())
    assert all(torch.equal(sd[k], v) for k, v in decoder.state_dict().items())
    # the fp32 decoder computes what transformers computes from the same checkpoint read as fp32
    # (a fresh load: `hf` itself carries its RoPE inv_freq buffer rounded to bf16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    torch.testing.assert_close(logits_of(decoder.eval(), tokens), logits_of(reference, tokens), **TOL)
    assert load_hf_decoder(tmp_path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16


def test_a_checkpoint_that_does_not_fit_its_config_names_the_tensor(tmp_path: Path) -> None:
    tiny_hf_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 80}))
    for read in (read_hf_decoder, load_hf_decoder):
        with pytest.raises(ValueError) as err:
            read(tmp_path)
        msg = str(err.value)
        assert str(tmp_path) in msg and "FFN 80" in msg
        assert "model.layers.0.mlp.gate_proj.weight: found [96, 64], expected [80, 64]" in msg
        assert "model.layers.0.mlp.down_proj.weight: found [64, 96], expected [64, 80]" in msg

    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing \(9\): \['model.layers.2."):
        read_hf_decoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: llama checkpoint uses") + ".*hidden_act"):
        read_hf_decoder(tmp_path)
