"""Export a trained MM1 to a self-contained folder, and load it back.

On disk (`export_model(model, out_dir)`):

- `model.safetensors`: the whole MM1 state dict (vision tower, connector, decoder) as contiguous
  CPU tensors in their training dtype. safetensors refuses tensors that share storage; the
  decoder ties embeddings by reuse in `forward`, not by sharing a Parameter, so nothing is shared
  today, and any tensor that would be (a future tied module) is written as its own copy.
- `config.json`: {"format", "version", "registry_name", "config": MM1Config.to_dict(),
  "vision_pretrained_source", "preprocess"}. The tower's weights are in the file, so the exported
  config says `vision.pretrained = None`: loading never fetches anything. The original tag is
  kept as `vision_pretrained_source` (provenance only), and the tower's preprocessing is stored
  as `preprocess` and restored on load, because a tag decides it (DFN-5B squashes; without a tag
  open_clip resizes the shortest side and crops) and dropping the tag would silently change it.
- `decoder_hf/` (with `hf_decoder=True` and a dense decoder): the decoder alone as a Llama
  checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads
  (`train.model.hf.save_hf`). An MoE decoder has no Llama-family equivalent: the folder is not
  written and the returned summary says why.

`load_exported(out_dir)` rebuilds the model from config.json on the meta device and fills it
from the safetensors file by assignment (`strict=True`; no pickles anywhere).

`export_checkpoint(checkpoint, out_dir)`: a trainer checkpoint (train/checkpoint.py; a step
folder, or a run folder for its newest complete one) to the same layout, in one process, from a
checkpoint saved by any number of ranks, FSDP-sharded or not (DCP reassembles the shards). The
trainer stores `describe(model)` (what config.json holds) in every checkpoint's state.json, so
the folder alone says which model to build; the model is built on the meta device, allocated
empty on CPU and filled from the checkpoint's model tensors only (no optimizer state is read, no
weights are fetched). Checkpoints are untrusted input: the same checks and safe reading as
resuming apply (`train.checkpoint.check_checkpoint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from train.checkpoint import CheckpointError, latest_checkpoint, load_model_weights, read_state
from train.model.config import ConnectorConfig, DecoderConfig, MM1Config, MoEConfig, VisionConfig
from train.model.hf import save_hf, save_safetensors
from train.model.mm1 import MM1

FORMAT = "mm1-export"
VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HF_DIR = "decoder_hf"


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """`cls(**data)`, refusing keys the dataclass does not have (a config from another version
    fails loudly instead of losing a field)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__}")
    return cls(**data)


def mm1_config_from_dict(data: dict[str, Any]) -> MM1Config:
    """The inverse of `MM1Config.to_dict()`: rebuilds the nested dataclasses (DecoderConfig with
    its optional MoEConfig, VisionConfig, ConnectorConfig), also from a JSON round trip."""
    data = dict(data)
    decoder = dict(data.pop("decoder"))
    moe = decoder.pop("moe", None)
    moe_cfg = None if moe is None else _build(MoEConfig, moe, "decoder.moe")
    decoder_cfg = _build(DecoderConfig, {**decoder, "moe": moe_cfg}, "decoder")
    parts: dict[str, Any] = {"decoder": decoder_cfg}
    if "vision" in data:
        parts["vision"] = _build(VisionConfig, data.pop("vision"), "vision")
    if "connector" in data:
        parts["connector"] = _build(ConnectorConfig, data.pop("connector"), "connector")
    return _build(MM1Config, {**data, **parts}, "config")


def _cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; a tensor whose storage was already taken is copied, so
    safetensors never sees shared memory."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def describe(model: MM1) -> dict[str, Any]:
    """What config.json holds (JSON-able): format and version, the registry name, the config with
    `vision.pretrained = None` (the weights travel with the tensors), the original vision source
    (provenance), and the tower's preprocessing. Works on an FSDP-wrapped MM1 too."""
    cfg = model.cfg
    source = getattr(model, "vision_pretrained_source", cfg.vision.pretrained)
    return {
        "format": FORMAT,
        "version": VERSION,
        "registry_name": cfg.name,
        "config": replace(cfg, vision=replace(cfg.vision, pretrained=None)).to_dict(),
        "vision_pretrained_source": source,
        "preprocess": _jsonable(model.vision.preprocess_cfg),
    }


def export_model(model: MM1, out_dir: Path, *, hf_decoder: bool = True) -> dict[str, Any]:
    """Write `model` to `out_dir` (created if missing; files of the same names are replaced, each
    by an atomic rename, so a crash never leaves a truncated file under its final name). Returns
    a summary: paths written (`model`, `config`, `decoder_hf` or None), `decoder_hf_skipped`
    (the reason, or None), `params` and `bytes` of the state dict, `registry_name`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    sd = _cpu_state_dict(model)

    tmp = out / (MODEL_FILE + ".tmp")
    save_safetensors(sd, tmp, metadata={"format": "pt", "mm1_name": cfg.name})
    os.replace(tmp, out / MODEL_FILE)
    config = describe(model)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)

    hf_path: Path | None = None
    skipped: str | None = None
    if not hf_decoder:
        skipped = "not asked for"
    elif cfg.decoder.moe is not None:
        skipped = "an MoE decoder has no Llama-family Hugging Face equivalent"
    else:
        hf_path = out / HF_DIR
        save_hf(model.decoder, hf_path, model_type="qwen2" if cfg.decoder.qkv_bias else "llama")
    return {
        "model": str(out / MODEL_FILE),
        "config": str(out / CONFIG_FILE),
        "decoder_hf": None if hf_path is None else str(hf_path),
        "decoder_hf_skipped": skipped,
        "params": sum(t.numel() for t in sd.values()),
        "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "registry_name": cfg.name,
    }


def _check_description(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        got = (data.get("format"), data.get("version")) if isinstance(data, dict) else (type(data).__name__, None)
        raise ValueError(f"{where} is not an {FORMAT} v{VERSION} model description: "
                         f"format={got[0]!r} version={got[1]!r}")
    return data


def read_export_config(out_dir: Path) -> dict[str, Any]:
    """config.json of an export, checked for its format and version."""
    return _check_description(json.loads((Path(out_dir) / CONFIG_FILE).read_text()), CONFIG_FILE)


def _meta_model(description: dict[str, Any]) -> MM1:
    """The MM1 a description names, on the meta device (nothing initialised or fetched), with the
    stored preprocessing and the original vision source kept as `vision_pretrained_source`."""
    cfg = mm1_config_from_dict(description["config"])
    if cfg.vision.pretrained is not None:
        raise ValueError("an export's config must not name vision weights to fetch (vision.pretrained)")
    with torch.device("meta"):
        model = MM1(cfg)
    preprocess = description.get("preprocess")
    if preprocess is not None:
        model.vision.preprocess_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()}
    model.vision_pretrained_source = description.get("vision_pretrained_source")
    return model


def load_exported(out_dir: Path) -> MM1:
    """The MM1 of an `export_model` folder, on CPU, in the stored dtypes, in train mode (as a
    freshly built module; call `.eval()` for inference). Built on the meta device (nothing is
    initialised or fetched) and filled by assignment with `strict=True`: a missing or unexpected
    tensor is an error. The vision tower's preprocessing is the one stored at export."""
    out = Path(out_dir)
    model = _meta_model(read_export_config(out))
    sd = {}
    with safe_open(str(out / MODEL_FILE), framework="pt") as f:
        for name in f.keys():
            # clone: a fresh (64-byte aligned) allocation. The tensors safetensors hands out sit
            # at the file's 8-byte offsets, and CPU kernels (oneDNN's convolutions) take other
            # code paths on misaligned memory: the same weights then gave logits that differ in
            # the last bit from the checkpoint's. One tensor at a time: peak memory stays ~1x.
            sd[name] = f.get_tensor(name).clone()
    model.load_state_dict(sd, strict=True, assign=True)
    _refuse_meta_leftovers(model)
    return model


def _refuse_meta_leftovers(model: MM1) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer would stay on meta: refuse rather than return a broken model
        raise RuntimeError(f"tensors not in the state dict stayed on the meta device: {left[:8]}")


def load_checkpoint_model(checkpoint: Path) -> tuple[MM1, dict[str, Any]]:
    """(the MM1 of a trainer checkpoint on CPU in its stored dtype, in train mode; the
    checkpoint's state: step, world size, ...). `checkpoint`: a step folder, or a run folder (its
    newest complete checkpoint). Raises CheckpointError for an unfinished or hostile folder and
    for one saved without a model description."""
    path = Path(checkpoint)
    if not (path / "COMPLETE").exists() and not path.name.startswith("step-"):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no complete checkpoint")
        path = found
    state = read_state(path)
    if state.get("model") is None:
        raise CheckpointError(f"{path.name} has no model description in its state.json (saved by a "
                              "trainer older than export support): it cannot be exported alone")
    model = _meta_model(_check_description(state["model"], f"{path.name}/state.json model"))
    model.to_empty(device="cpu")
    load_model_weights(path, model)
    _refuse_meta_leftovers(model)
    return model, {**state, "path": str(path)}


def export_checkpoint(checkpoint: Path, out_dir: Path, *, hf_decoder: bool = True,
                      dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A trainer checkpoint (step folder, or run folder: its newest complete one) written as an
    export to `out_dir` (`export_model`'s layout), optionally cast to `dtype` (e.g. bfloat16
    for serving; the checkpoint holds the fp32 master weights). Returns `export_model`'s
    summary plus the `step` and `checkpoint` path it came from."""
    model, state = load_checkpoint_model(checkpoint)
    if dtype is not None:
        model.to(dtype)
    summary = export_model(model, out_dir, hf_decoder=hf_decoder)
    return {**summary, "step": state["step"], "checkpoint": state["path"]}
