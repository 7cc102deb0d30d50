"""Convert LAION's published score weights, once, into the head files the score stages read
(curate/stages/image_scores.py: a safetensors file whose metadata says what its tensors are).

    python -m tools.convert_heads aesthetic sac+logos+ava1-l14-linearMSE.pth aesthetic.safetensors
    python -m tools.convert_heads nsfw clip_ViT-L-14_openai_binary_nsfw_head.pth nsfw.safetensors
    python -m tools.convert_heads watermark watermark_model_v1.pt watermark.safetensors

The published layouts (read from their repositories):
- aesthetic (christophschuhmann/improved-aesthetic-predictor): `layers.{0,2,4,6,7}` of an
  nn.Sequential, Linear 768-1024-128-64-16-1 with Dropouts and no activation between, over the
  L2-normalised OpenAI ViT-L/14 image embedding; a regression (identity output).
- nsfw (LAION-AI/CLIP-based-NSFW-Detector, the PyTorch ports of its Keras models): `norm.mean`,
  `norm.variance` (a standardisation of the normalised embedding) and `linear_1..N`, ReLU between,
  a sigmoid out (1 = NSFW); ViT-L/14 768-64-512-256-1, ViT-B/32 512-32-32-1. Its ViT-H/14 head is
  an nn.Sequential (`layers.*`, ReLU between all but the last two Linears, identity out).
- watermark (LAION-AI/LAION-5B-WatermarkDetection): a whole timm `efficientnet_b3a` (now timm's
  `efficientnet_b3`) whose `classifier` is Linear 1536-625, ReLU, Dropout, Linear 625-256, ReLU,
  Linear 256-2 over 256 x 256 squashed ImageNet-normalised images; softmax, class 0 is "watermark"
  (its inference writes out[:, 0] as 'P Watermark').

Sources are read with torch.load(weights_only=True): tensors and containers only, no code runs.
`write_random_head` writes a head of the published shapes with RANDOM weights, for tests and the
demo: it checks mechanics, never quality, and its metadata `source` says so.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path
from typing import Any

from curate.stages.score_heads import HEAD_FORMAT, TASKS, read_head

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WATERMARK_TIMM, WATERMARK_SIZE = "efficientnet_b3", 256
# the published NSFW heads by input width: clip_{MODEL}_{DATA}_binary_nsfw_head.pth
NSFW_MODELS = {512: ("ViT-B-32", "openai"), 768: ("ViT-L-14", "openai"), 1024: ("ViT-H-14", "laion2b_s32b_b79k")}
# published hidden widths, for random heads
RANDOM_WIDTHS = {"aesthetic": (1024, 128, 64, 16, 1), "nsfw": (64, 512, 256, 1), "watermark": (625, 256, 2)}


def _linears(state: dict[str, Any], pattern: str) -> list[tuple[Any, Any]]:
    """(weight, bias) of the Linear layers whose keys match `pattern` (one group: the index), in
    index order."""
    found = sorted((int(m.group(1)), k) for k in state if (m := re.fullmatch(pattern, k)))
    layers = [(state[k], state[k[: -len("weight")] + "bias"]) for _, k in found]
    if not layers:
        raise ValueError(f"no tensors like {pattern!r} (keys: {sorted(state)[:8]}...)")
    return layers


def _metadata(task: str, head: str, model: str, dim: int, activations: list[str], output: str,
              source: str, **extra: Any) -> dict[str, str]:
    meta = {"format": HEAD_FORMAT, "task": task, "head": head, "embedding_model": model,
            "embedding_dim": str(dim), "activations": ",".join(activations), "output": output, "source": source}
    meta.update({k: ("" if v is None else str(v)) for k, v in extra.items()})
    return meta


def _mlp_tensors(layers: list[tuple[Any, Any]]) -> dict[str, Any]:
    out = {}
    for i, (w, b) in enumerate(layers):
        out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = w, b
    return out


def convert_state(task: str, state: dict[str, Any], source: str, embedding_model: str | None = None,
                  embedding_pretrained: str | None = None, timm_model: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a head file from a published state dict (module docstring)."""
    if task == "aesthetic":
        layers = _linears(state, r"layers\.(\d+)\.weight")
        tensors = _mlp_tensors(layers)
        model, pretrained = embedding_model or "ViT-L-14", embedding_pretrained or "openai"
        activations, output = ["none"] * (len(layers) - 1), "identity"
    elif task == "nsfw" and "norm.mean" in state:
        layers = _linears(state, r"linear_(\d+)\.weight")
        tensors = {**_mlp_tensors(layers), "input.mean": state["norm.mean"], "input.variance": state["norm.variance"]}
        model, pretrained = NSFW_MODELS.get(layers[0][0].shape[1], (None, None))
        activations, output = ["relu"] * (len(layers) - 1), "sigmoid"
    elif task == "nsfw":
        layers = _linears(state, r"layers\.(\d+)\.weight")
        tensors = _mlp_tensors(layers)
        model, pretrained = NSFW_MODELS.get(layers[0][0].shape[1], (None, None))
        activations, output = ["relu"] * (len(layers) - 2) + ["none"], "identity"
    elif task == "watermark":
        layers = _linears(state, r"classifier\.(\d+)\.weight")
        tensors = {**_mlp_tensors(layers), **{f"backbone.{k}": v for k, v in state.items()
                                              if not k.startswith("classifier.")}}
        meta = _metadata(task, "timm", timm_model or WATERMARK_TIMM, layers[0][0].shape[1],
                         ["relu"] * (len(layers) - 1), "softmax", source, output_index=0,
                         image_size=WATERMARK_SIZE, mean=",".join(map(str, IMAGENET_MEAN)),
                         std=",".join(map(str, IMAGENET_STD)))
        return tensors, meta
    else:
        raise ValueError(f"task {task!r}: one of {TASKS}")
    model, pretrained = embedding_model or model, embedding_pretrained or pretrained
    if model is None:
        raise ValueError(f"no published {task} head takes {layers[0][0].shape[1]} inputs: name its "
                         "--embedding-model and --embedding-pretrained")
    meta = _metadata(task, "mlp", model, layers[0][0].shape[1], activations, output, source,
                     embedding_pretrained=pretrained, input_normalized="true")
    return tensors, meta


def write_head(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """Write a head file (float32 tensors) and read it back as the stages do (ValueError if the
    result is not a valid head)."""
    from safetensors.torch import save_file  # optional (safety extra); only writing heads needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    read_head(path, metadata["task"])
    return path


def _check_backbone(tensors: dict[str, Any], timm_model: str) -> None:
    """The backbone tensors load, strictly, into the timm architecture the metadata names."""
    import timm  # heavy, optional (clip extra): only converting a watermark model needs it

    model = timm.create_model(timm_model, pretrained=False, num_classes=0)
    model.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})


def convert(task: str, src: str | Path, out: str | Path, embedding_model: str | None = None,
            embedding_pretrained: str | None = None, timm_model: str | None = None) -> Path:
    """Convert the published weights file `src` (a .pth/.pt state dict) into the head file `out`."""
    import torch  # heavy, optional (clip extra): reading the published checkpoints needs it

    state = torch.load(src, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    tensors, meta = convert_state(task, state, f"converted from {Path(src).name}", embedding_model,
                                  embedding_pretrained, timm_model)
    if meta["head"] == "timm":
        _check_backbone(tensors, meta["embedding_model"])
    return write_head(out, tensors, meta)


def write_random_head(path: str | Path, kind: str, embedding_model: str, embedding_pretrained: str | None,
                      embedding_dim: int | None, seed: int = 0, image_size: int = 64) -> Path:
    """A head file of `kind` (TASKS) with the published layer widths and RANDOM weights drawn from
    `seed` (the same bytes for a seed): mechanics only, never a quality signal. For `watermark`,
    `embedding_model` is a timm architecture (a tiny one in tests: `test_efficientnet`), built with
    random weights into the file; `embedding_dim` is then its feature width (None: read from it)."""
    # heavy, optional (clip extra): random tensors and a timm backbone
    import timm
    import torch

    gen = torch.Generator().manual_seed(seed)
    backbone: dict[str, Any] = {}
    if kind == "watermark":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(embedding_model, pretrained=False, num_classes=0)
        backbone = {f"backbone.{k}": v for k, v in model.state_dict().items()}
        embedding_dim = embedding_dim or model.num_features
    widths = (int(embedding_dim), *RANDOM_WIDTHS[kind])
    layers = [(torch.randn(o, i, generator=gen) / i ** 0.5, torch.randn(o, generator=gen) * 0.1)
              for i, o in zip(widths, widths[1:])]
    state = {f"layers.{j}.weight": w for j, (w, _) in enumerate(layers)}
    state.update({f"layers.{j}.bias": b for j, (_, b) in enumerate(layers)})
    source = f"RANDOM weights (seed {seed}): mechanics only, not a trained head"
    if kind == "watermark":
        tensors = {**state, **backbone}
        meta = _metadata(kind, "timm", embedding_model, widths[0], ["relu"] * (len(layers) - 1), "softmax",
                         source, output_index=0, image_size=image_size, mean=",".join(map(str, IMAGENET_MEAN)),
                         std=",".join(map(str, IMAGENET_STD)))
        return write_head(path, tensors, meta)
    tensors = dict(state)
    if kind == "nsfw":
        # about the spread of a normalised embedding's entries (1 / dim), as the Keras layer learnt
        tensors["input.mean"] = torch.randn(widths[0], generator=gen) * 0.1 / widths[0] ** 0.5
        tensors["input.variance"] = (torch.rand(widths[0], generator=gen) * 0.5 + 0.75) / widths[0]
    activations = ["none"] * (len(layers) - 1) if kind == "aesthetic" else ["relu"] * (len(layers) - 1)
    meta = _metadata(kind, "mlp", embedding_model, widths[0], activations,
                     "identity" if kind == "aesthetic" else "sigmoid", source,
                     embedding_pretrained=embedding_pretrained, input_normalized="true")
    return write_head(path, tensors, meta)


def write_demo_heads(folder: str | Path, embedding_model: str = "ViT-B-32", embedding_dim: int = 64,
                     seed: int = 0) -> dict[str, Path]:
    """The demo's three head files under `folder` (aesthetic.safetensors, nsfw.safetensors,
    watermark.safetensors), RANDOM weights: heads over the demo clip_score's tiny random
    `embedding_model` (pretrained null, `embedding_dim` wide) and a tiny timm watermark model."""
    folder = Path(folder)
    heads = {kind: write_random_head(folder / f"{kind}.safetensors", kind, embedding_model, None, embedding_dim, seed)
             for kind in ("aesthetic", "nsfw")}
    heads["watermark"] = write_random_head(folder / "watermark.safetensors", "watermark", "test_efficientnet",
                                           None, None, seed)
    return heads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_heads", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("src", help="the published weights (.pth/.pt), read with torch.load(weights_only=True)")
    parser.add_argument("out", help="the head file to write (.safetensors)")
    parser.add_argument("--embedding-model", help="open_clip name of the embeddings a head reads (default: "
                        "the published head's: ViT-L-14, or by input width for NSFW heads)")
    parser.add_argument("--embedding-pretrained", help="open_clip tag of those weights (default: the published)")
    parser.add_argument("--timm-model", help=f"watermark: the timm architecture (default {WATERMARK_TIMM})")
    args = parser.parse_args(argv)
    try:
        out = convert(args.task, args.src, args.out, args.embedding_model, args.embedding_pretrained,
                      args.timm_model)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
        print(f"convert_heads: {args.src}: {exc}", file=sys.stderr)
        return 2
    spec = read_head(out, args.task)
    print(f"wrote {out}: {spec.task} head over {spec.embedding_model} ({spec.embedding_pretrained}), layers {'-'.join(map(str, spec.widths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
