"""Hugging Face causal LMs of the Llama family <-> our `Decoder`: start MM1's decoder from a
pretrained checkpoint on local disk, and export a trained decoder that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Supported: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (whose q/k/v projections
carry biases: `DecoderConfig.qkv_bias`). Anything this decoder cannot reproduce exactly is refused
with a ValueError naming the field, rather than loaded approximately: RoPE scaling (Llama 3.1+'s
"llama3", YaRN...), a head_dim other than hidden_size / num_attention_heads, biases on o_proj or
the MLP, activations other than SiLU, and MoE decoders on export. Mistral's sliding window is
honoured by capping `max_seq_len` at the window: up to that length, windowed and full causal
attention are the same thing.

No RoPE permutation is needed in either direction. Meta's original Llama weights rotate
interleaved pairs of dimensions and Hugging Face's conversion script permutes the q/k rows so that
its "rotate half" RoPE applies; our attention applies rotate-half RoPE exactly as Hugging Face does,
so tensors move across unchanged and the mapping is a pure renaming.

Nothing here touches the network or needs `transformers`: a checkpoint is a folder with
config.json and model.safetensors (or sharded safetensors, or pytorch_model*.bin read with
`weights_only=True`). Weights are read as fp32 whatever the checkpoint stores (most are bf16):
training keeps fp32 master weights and optimizer states. `read_hf_decoder` returns the config and
state dict without building a module, for one rank to read and broadcast; a checkpoint whose
tensors do not fit its own config is refused naming the tensor and both shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from train.model.attention import Backend
from train.model.config import DecoderConfig
from train.model.fit import misfit_message
from train.model.decoder import Decoder

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Stored by old checkpoints, recomputed by everyone: never a weight.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope(hf: Mapping[str, Any]) -> tuple[float, str]:
    """(theta, rope type) from either config format: transformers 5's `rope_parameters` or 4's
    top-level `rope_theta` plus `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def decoder_config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face config.json (as a dict). Raises ValueError for a model
    type or feature the decoder does not reproduce exactly."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    theta, rope_type = _rope(hf)
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    problems = []
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r}")
    if hf.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        problems.append(f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r}")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias")
    if model_type != "qwen2" and hf.get("attention_bias"):
        problems.append("attention_bias (Llama's also biases o_proj)")
    if problems:
        raise ValueError(f"{model_type} checkpoint uses what the decoder cannot reproduce: {', '.join(problems)}")

    max_seq_len = hf.get("max_position_embeddings", DecoderConfig.max_seq_len)
    windowed = hf.get("use_sliding_window", True) if model_type == "qwen2" else True
    if windowed and hf.get("sliding_window"):
        max_seq_len = min(max_seq_len, hf["sliding_window"])
    return DecoderConfig(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        max_seq_len=max_seq_len,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
    )


def hf_config_from_decoder(
    cfg: DecoderConfig, model_type: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """A config.json dict for `cfg` (model_type: "llama", "mistral" or "qwen2"; default "qwen2"
    when the decoder has q/k/v biases, else "llama"). Written in transformers 4's format, which 5
    reads too."""
    model_type = model_type or ("qwen2" if cfg.qkv_bias else "llama")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    if cfg.moe is not None:
        raise ValueError("an MoE decoder has no Llama-family Hugging Face equivalent")
    if cfg.qkv_bias != (model_type == "qwen2"):
        raise ValueError(f"qkv_bias={cfg.qkv_bias} does not fit model_type {model_type!r} (only qwen2 has them)")
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        hf.update(sliding_window=None)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return hf


def _key_map(cfg: DecoderConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face's, for every tensor of a dense decoder."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    }
    if cfg.qkv_bias:
        per_layer |= {f"attention.w{p}.bias": f"self_attn.{p}_proj.bias" for p in "qkv"}
    for i in range(cfg.n_layers):
        names |= {f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in per_layer.items()}
    return names


def from_hf_state_dict(cfg: DecoderConfig, sd: Mapping[str, Tensor], *, origin: str = "checkpoint") -> dict[str, Tensor]:
    """Our state dict from a Hugging Face one (same tensors, renamed). A tied checkpoint's
    lm_head.weight, if stored, is dropped. A tensor missing, unexpected or of another shape than
    `cfg` gives it raises ValueError naming `origin`, the keys and the shapes found and expected."""
    if cfg.moe is not None:
        raise ValueError("Hugging Face Llama-family checkpoints hold dense decoders; cfg has moe set")
    names = _key_map(cfg)
    shapes = _shapes(cfg)
    missing = [theirs for theirs in names.values() if theirs not in sd]
    known = set(names.values()) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unexpected = [k for k in sd if k not in known and not k.endswith(_IGNORED_SUFFIXES)]
    wrong = [f"{theirs}: found {list(sd[theirs].shape)}, expected {list(shapes[ours])}"
             for ours, theirs in names.items() if theirs in sd and sd[theirs].shape != shapes[ours]]
    message = misfit_message(f"{origin} does not fit its config ({cfg.n_layers} layers, dim {cfg.dim}, "
                             f"{cfg.n_heads}/{cfg.kv_heads} heads, FFN {cfg.hidden}, vocab {cfg.vocab_size}):",
                             wrong=wrong, missing=missing, unexpected=unexpected)
    if message:
        raise ValueError(message)
    return {ours: sd[theirs] for ours, theirs in names.items()}


def _shapes(cfg: DecoderConfig) -> dict[str, torch.Size]:
    """Our parameter name -> its shape, from a decoder built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Decoder(cfg).state_dict().items()}


def to_hf_state_dict(decoder: Decoder) -> dict[str, Tensor]:
    """Hugging Face's state dict for a dense decoder (tensors detached and contiguous; with tied
    embeddings, no lm_head.weight: transformers ties it on load)."""
    if decoder.cfg.moe is not None:
        raise ValueError("an MoE decoder has no Llama-family Hugging Face equivalent")
    ours = decoder.state_dict()
    return {theirs: ours[name].detach().contiguous() for name, theirs in _key_map(decoder.cfg).items()}


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint folder: model.safetensors, sharded safetensors (with its index),
    or pytorch_model*.bin (read with weights_only=True: a checkpoint is untrusted input)."""
    layouts = [("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")]
    for single, index in layouts:
        if (folder / single).is_file():
            files = [folder / single]
        elif (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        else:
            continue
        tensors: dict[str, Tensor] = {}
        for file in files:
            if file.suffix == ".safetensors":
                tensors.update(load_file(str(file)))
            else:
                tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        return tensors
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (single or sharded) in {folder}")


def read_hf_decoder(path: str | Path, dtype: torch.dtype | None = torch.float32) -> tuple[DecoderConfig, dict[str, Tensor]]:
    """The DecoderConfig of a local Hugging Face checkpoint folder and its weights as our
    decoder's state dict, fp32 on CPU whatever the checkpoint stores (master weights and optimizer
    states are fp32; `dtype=None`: as stored, for a caller that casts a part at a time), no module
    built: for one rank to read and broadcast. ValueError, naming the folder, for a config the
    decoder cannot reproduce or tensors that do not fit it."""
    return _read(Path(path), dtype)


def _read(folder: Path, dtype: torch.dtype | None) -> tuple[DecoderConfig, dict[str, Tensor]]:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        cfg = decoder_config_from_hf(json.loads((folder / "config.json").read_text()))
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None
    sd = from_hf_state_dict(cfg, _read_tensors(folder), origin=str(folder))
    # one tensor at a time, so the stored copy of each is released as it is converted
    return cfg, {k: _cast(sd.pop(k), dtype) for k in list(sd)}


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return (t.to(dtype) if t.is_floating_point() and dtype is not None else t).contiguous()


def load_hf_decoder(
    path: str | Path, *, dtype: torch.dtype = torch.float32, attn_backend: Backend = "auto"
) -> Decoder:
    """A Decoder holding a local Hugging Face checkpoint's weights, on CPU, in `dtype` whatever
    the checkpoint stores (fp32 by default: a bf16 checkpoint is upcast, as training's master
    weights must be). Built on the meta device and filled by assignment, so the weights are held
    in memory once. Errors as `read_hf_decoder`."""
    cfg, sd = _read(Path(path), dtype)
    with torch.device("meta"):
        decoder = Decoder(cfg, attn_backend=attn_backend)
    decoder.load_state_dict(sd, strict=True, assign=True)
    return decoder


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, then the file's mode set to what `open()` gives any file the user
    writes (0o666 less the umask): save_file creates it 0600, readable by its owner only."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_hf(decoder: Decoder, path: str | Path, *, model_type: str | None = None) -> None:
    """Write config.json and model.safetensors into folder `path`, loadable by
    `transformers.AutoModelForCausalLM.from_pretrained(path)` and by `load_hf_decoder`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.cpu() for k, v in to_hf_state_dict(decoder).items()}
    dtype = next(iter(sd.values())).dtype
    config = hf_config_from_decoder(decoder.cfg, model_type, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors(sd, folder / "model.safetensors", metadata={"format": "pt"})
