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

`export_checkpoint(checkpoint_dir, out_dir)` (a trainer checkpoint -> this layout) belongs here
once train/checkpoint.py exists; it is not written yet.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from train.model.config import ConnectorConfig, DecoderConfig, MM1Config, MoEConfig, VisionConfig
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


def export_model(model: MM1, out_dir: Path, *, hf_decoder: bool = True) -> dict[str, Any]:
    """Write `model` to `out_dir` (created if missing; files of the same names are replaced, each
    by an atomic rename, so a crash never leaves a truncated file under its final name). Returns
    a summary: paths written (`model`, `config`, `decoder_hf` or None), `decoder_hf_skipped`
    (the reason, or None), `params` and `bytes` of the state dict, `registry_name`."""
    from dataclasses import replace

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    exported_cfg = replace(cfg, vision=replace(cfg.vision, pretrained=None))
    sd = _cpu_state_dict(model)

    tmp = out / (MODEL_FILE + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "mm1_name": cfg.name})
    os.replace(tmp, out / MODEL_FILE)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "registry_name": cfg.name,
        "config": exported_cfg.to_dict(),
        "vision_pretrained_source": cfg.vision.pretrained,
        "preprocess": _jsonable(model.vision.preprocess_cfg),
    }
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
        from train.model.hf import save_hf

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


def read_export_config(out_dir: Path) -> dict[str, Any]:
    """config.json of an export, checked for its format and version."""
    data = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"{CONFIG_FILE} is not an {FORMAT} v{VERSION} export: "
                         f"format={data.get('format')!r} version={data.get('version')!r}")
    return data


def load_exported(out_dir: Path) -> MM1:
    """The MM1 of an `export_model` folder, on CPU, in the stored dtypes, in train mode (as a
    freshly built module; call `.eval()` for inference). Built on the meta device (nothing is
    initialised or fetched) and filled by assignment with `strict=True`: a missing or unexpected
    tensor is an error. The vision tower's preprocessing is the one stored at export."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    data = read_export_config(out)
    cfg = mm1_config_from_dict(data["config"])
    if cfg.vision.pretrained is not None:
        raise ValueError("an export's config must not name vision weights to fetch (vision.pretrained)")
    sd = load_file(str(out / MODEL_FILE))
    with torch.device("meta"):
        model = MM1(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer would stay on meta: refuse rather than return a broken model
        raise RuntimeError(f"tensors not in the state dict stayed on the meta device: {left[:8]}")
    preprocess = data.get("preprocess")
    if preprocess is not None:
        model.vision.preprocess_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()}
    return model
