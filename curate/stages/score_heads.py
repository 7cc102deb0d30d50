"""Score head files: a safetensors file whose metadata declares what its tensors are (the task,
the embedding model and width it expects, its layers' activations, its output), read without
loading a pickle or importing torch (`read_head`, at recipe load), and its forward pass as one
chain of matmuls over a batch (`head_forward`). The stages using them: curate/stages/image_scores.py;
the files are written by tools/convert_heads.py.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

HEAD_FORMAT = "mm1-score-head"  # metadata `format` of a head file
TASKS = ("aesthetic", "nsfw", "watermark")
ACTIVATIONS = ("none", "relu")
OUTPUTS = ("identity", "sigmoid", "softmax")
_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one


@dataclass(frozen=True)
class HeadSpec:
    """What a head file declares. `widths` are the layers' widths read from the tensors, input
    first (`layers.<i>.weight`, out x in, in order); `activations` sit between them."""

    path: str
    task: str
    head: str
    embedding_model: str  # open_clip name (mlp) or timm architecture (timm)
    embedding_pretrained: str | None  # open_clip tag or None (random weights); mlp only
    embedding_dim: int
    input_normalized: bool  # L2-normalise the embedding first
    activations: tuple[str, ...]
    output: str
    output_index: int  # softmax: the class whose probability is the score
    widths: tuple[int, ...]
    standardized: bool  # `input.mean` / `input.variance` tensors: (x - mean) / (sqrt(var) + 1e-10)
    image_size: int | None = None  # timm: the squashed input size
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""  # where the weights came from; "RANDOM weights ..." for test and demo heads


def _not_safetensors(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is {why}, not a safetensors head file: pickled weights are never loaded; "
                      "convert the published weights once with `python -m tools.convert_heads`")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) of a safetensors file, read from its header alone (no
    tensor data, no safetensors import). ValueError naming the path for anything else: a zip (what
    torch.save writes), a bare pickle, a truncated or garbled header."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    size = p.stat().st_size
    with p.open("rb") as f:
        start = f.read(8)
        n = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
        raw = f.read(n) if 2 <= n <= min(size - 8, _MAX_HEADER) else b""
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        shapes = {k: [int(d) for d in v["shape"]] for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        dtypes = {v["dtype"] for v in header.values()}
    except (ValueError, KeyError, TypeError, AttributeError):
        if start.startswith(b"PK\x03\x04"):
            raise _not_safetensors(p, "a zip archive (torch.save's .pt/.pth format, a pickle inside)") from None
        if start[:1] == b"\x80":
            raise _not_safetensors(p, "a pickle") from None
        raise _not_safetensors(p, "a file without a safetensors header") from None
    if 8 + n + end > size:
        raise ValueError(f"{p}: truncated ({size} bytes; its header describes {8 + n + end})")
    if not dtypes <= _DTYPES:
        raise ValueError(f"{p}: tensors of dtype {sorted(dtypes - _DTYPES)}; a head holds floats")
    return {str(k): str(v) for k, v in metadata.items()}, shapes


def _numbers(meta: dict[str, str], key: str, n: int, path: str, cast: type = float) -> tuple[Any, ...]:
    try:
        values = tuple(cast(v) for v in meta[key].split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{path}: metadata {key}={meta[key]!r} is not {n} comma-separated {cast.__name__}(s)")
    return values


def read_head(path: str | Path, task: str) -> HeadSpec:
    """The head file at `path`, checked from its header: a safetensors file of `task` (TASKS)
    with complete metadata, whose layers chain (each layer's input width is the previous output
    width), take `embedding_dim` inputs and give one output (two or more for a softmax).
    ValueError naming the path and the metadata key at fault."""
    meta, shapes = read_safetensors_header(path)
    p = str(path)
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{p}: metadata format is {meta.get('format')!r}, not {HEAD_FORMAT!r} (write head "
                         "files with `python -m tools.convert_heads`)")
    if meta.get("task") != task:
        raise ValueError(f"{p}: metadata task is {meta.get('task')!r}: a head for {task} was expected")
    head = meta.get("head")
    if head != ("timm" if task == "watermark" else "mlp"):
        raise ValueError(f"{p}: metadata head is {head!r}; a {task} head is "
                         f"{'a timm image model' if task == 'watermark' else 'an mlp over CLIP embeddings'}")
    need = ["embedding_model", "embedding_dim", "activations", "output"]
    need += ["embedding_pretrained", "input_normalized"] if head == "mlp" else ["image_size", "mean", "std"]
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f"{p}: metadata keys {missing} are missing")
    (dim,) = _numbers(meta, "embedding_dim", 1, p, int)
    widths: list[int] = []
    i = 0
    while f"layers.{i}.weight" in shapes:
        w, b = shapes[f"layers.{i}.weight"], shapes.get(f"layers.{i}.bias")
        if len(w) != 2 or b != [w[0]] or (widths and w[1] != widths[-1]):
            raise ValueError(f"{p}: layers.{i} is {w} with bias {b}: not a linear layer taking "
                             f"{widths[-1] if widths else dim} inputs")
        widths = widths or [w[1]]
        widths.append(w[0])
        i += 1
    if not widths:
        raise ValueError(f"{p}: no layers.0.weight tensor")
    if widths[0] != dim:
        raise ValueError(f"{p}: the first layer takes {widths[0]} inputs, but metadata embedding_dim is {dim} "
                         f"(the width of {meta['embedding_model']}'s embeddings)")
    activations = tuple(a.strip() for a in meta["activations"].split(",")) if meta["activations"] else ()
    if len(activations) != len(widths) - 2 or not set(activations) <= set(ACTIVATIONS):
        raise ValueError(f"{p}: metadata activations={meta['activations']!r}: one of {ACTIVATIONS} per gap "
                         f"between its {len(widths) - 1} layers")
    output = meta["output"]
    (index,) = _numbers({"output_index": "0", **meta}, "output_index", 1, p, int)
    if output not in OUTPUTS or (output == "softmax") != (widths[-1] > 1) or not 0 <= index < widths[-1]:
        raise ValueError(f"{p}: metadata output={output!r} (output_index {index}) does not fit a last layer "
                         f"of {widths[-1]} outputs (one of {OUTPUTS}; softmax for two or more)")
    standardized = "input.mean" in shapes
    if standardized and not shapes["input.mean"] == shapes.get("input.variance") == [dim]:
        raise ValueError(f"{p}: input.mean / input.variance must both be [{dim}]")
    spec = dict(path=p, task=task, head=head, embedding_model=meta["embedding_model"],
                embedding_pretrained=meta.get("embedding_pretrained") or None, embedding_dim=dim,
                input_normalized=meta.get("input_normalized") == "true", activations=activations,
                output=output, output_index=index, widths=tuple(widths), standardized=standardized,
                source=meta.get("source", ""))
    if head == "timm":
        if not any(k.startswith("backbone.") for k in shapes):
            raise ValueError(f"{p}: a timm head file holds its backbone's backbone.* tensors; there are none")
        spec.update(image_size=_numbers(meta, "image_size", 1, p, int)[0], mean=_numbers(meta, "mean", 3, p),
                    std=_numbers(meta, "std", 3, p))
    return HeadSpec(**spec)


def open_clip_embed_dim(model: str, overrides: dict[str, Any] | None = None) -> int | None:
    """The embedding width of an open_clip model: `embed_dim` of the overrides, else of the
    config file open_clip ships for the name (read without importing open_clip); None when
    unknown here (a hub or local-dir model)."""
    if overrides and "embed_dim" in overrides:
        return int(overrides["embed_dim"])
    spec = find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        config = Path(folder, "model_configs", f"{model}.json")
        if config.is_file():
            return int(json.loads(config.read_text())["embed_dim"])
    return None


def head_forward(x: Any, spec: HeadSpec, params: dict[str, Any]) -> Any:
    """The score of each row of `x` (a float32 tensor, rows x embedding_dim): the head's layers as
    one chain of matmuls over the whole batch, then its output transform (a 1-D tensor)."""
    import torch  # keeps torch out of curate/ (clip extra); callers hold tensors already

    if spec.input_normalized:
        x = torch.nn.functional.normalize(x, dim=-1)
    if spec.standardized:  # the NSFW detector's Keras Normalization layer
        x = (x - params["input.mean"]) / (params["input.variance"].sqrt() + 1e-10)
    for i, act in enumerate((*spec.activations, "none")):
        x = torch.addmm(params[f"layers.{i}.bias"], x, params[f"layers.{i}.weight"].T)
        if act == "relu":
            x = torch.relu(x)
    if spec.output == "softmax":
        return torch.softmax(x, dim=-1)[:, spec.output_index]
    return torch.sigmoid(x[:, 0]) if spec.output == "sigmoid" else x[:, 0]


def load_tensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file  # optional (safety extra); no pickle is ever read

    return {k: v.float() for k, v in load_file(path).items()}


__all__ = ["ACTIVATIONS", "HEAD_FORMAT", "OUTPUTS", "TASKS", "HeadSpec", "head_forward", "load_tensors",
           "open_clip_embed_dim", "read_head", "read_safetensors_header"]
