"""tools/convert_heads.py: the published weights become head files that compute what the published
modules compute. The published files cannot be downloaded here, so each test builds a state dict
with the published key names and shapes (RANDOM values: the conversion's mechanics, not a score's
quality) and saves it as the repositories did (torch.save); the watermark backbone is timm's tiny
`test_efficientnet` in place of EfficientNet-B3 (same key layout, smaller)."""

from __future__ import annotations

import argparse
import io
from collections import OrderedDict

import pyarrow as pa
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata
from torchvision import transforms as T

from curate.contract import record_schema
from curate.stages.base import build_stage
from curate.stages.image_scores import WatermarkScore
from curate.stages.score_heads import head_forward, read_head
from tools.convert_heads import main

torch.manual_seed(0)  # the random stand-in values; only their shapes and names are the published ones


def _linear(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(out, inp) / inp ** 0.5, torch.randn(out) * 0.1


def _state(names_and_shapes: list[tuple[str, int, int]]) -> OrderedDict:
    state = OrderedDict()
    for name, out, inp in names_and_shapes:
        state[f"{name}.weight"], state[f"{name}.bias"] = _linear(out, inp)
    return state


def _convert(tmp_path, task: str, state: dict, *flags: str):
    src, out = tmp_path / f"{task}.pth", tmp_path / f"{task}.safetensors"
    torch.save(state, src)
    assert main([task, str(src), str(out), *flags]) == 0
    return read_head(out, task), load_file(out)


def test_aesthetic_and_nsfw_heads_compute_the_published_modules(tmp_path, capsys):
    """sac+logos+ava1-l14-linearMSE.pth (an nn.Sequential without activations) and the NSFW
    detector's ViT-L/14 PyTorch port (Normalization, Linear/ReLU, sigmoid): same outputs."""
    x = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    aesthetic = _state([("layers.0", 1024, 768), ("layers.2", 128, 1024), ("layers.4", 64, 128),
                        ("layers.6", 16, 64), ("layers.7", 1, 16)])
    spec, tensors = _convert(tmp_path, "aesthetic", aesthetic)
    assert (spec.embedding_model, spec.embedding_pretrained, spec.widths) == ("ViT-L-14", "openai",
                                                                               (768, 1024, 128, 64, 16, 1))
    assert "aesthetic head over ViT-L-14" in capsys.readouterr().out
    mlp = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    mlp.load_state_dict({k[len("layers."):]: v for k, v in aesthetic.items()})
    with torch.no_grad():
        assert torch.allclose(head_forward(x, spec, tensors), mlp(x)[:, 0], atol=1e-5)

    nsfw = _state([("linear_1", 64, 768), ("linear_2", 512, 64), ("linear_3", 256, 512), ("linear_4", 1, 256)])
    nsfw["norm.mean"], nsfw["norm.variance"] = torch.randn(768) * 0.01, torch.rand(768) * 2e-3 + 1e-4
    spec, tensors = _convert(tmp_path, "nsfw", nsfw)
    assert (spec.embedding_model, spec.activations, spec.output) == ("ViT-L-14", ("relu",) * 3, "sigmoid")
    h = (x - nsfw["norm.mean"]) / (nsfw["norm.variance"].sqrt() + 1e-10)
    for i in range(1, 5):
        h = h @ nsfw[f"linear_{i}.weight"].T + nsfw[f"linear_{i}.bias"]
        h = torch.relu(h) if i < 4 else torch.sigmoid(h)
    assert torch.allclose(head_forward(x, spec, tensors), h[:, 0], atol=1e-5)

    # the ViT-H/14 head's nn.Sequential layout (hidden widths shrunk): ReLU between all but the last two
    h14 = _state([("layers.0", 32, 1024), ("layers.3", 16, 32), ("layers.6", 8, 16), ("layers.7", 1, 8)])
    spec, _ = _convert(tmp_path, "nsfw", h14)
    assert (spec.embedding_model, spec.embedding_pretrained, spec.activations, spec.output) == (
        "ViT-H-14", "laion2b_s32b_b79k", ("relu", "relu", "none"), "identity")


def test_watermark_model_scores_class_0_as_the_published_inference(tmp_path):
    """LAION-5B-WatermarkDetection's model (timm, classifier Sequential(Linear, ReLU, Dropout, Linear,
    ReLU, Linear), 256 x 256 squashed ImageNet-normalised input): the stage's score is its softmax
    class 0, the column its inference writes as 'P Watermark'."""
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    width = backbone.num_features
    backbone.classifier = torch.nn.Sequential(torch.nn.Linear(width, 625), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                              torch.nn.Linear(625, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    spec, _ = _convert(tmp_path, "watermark", backbone.state_dict(), "--timm-model", "test_efficientnet")
    assert (spec.widths, spec.output, spec.output_index, spec.image_size) == ((width, 625, 256, 2), "softmax", 0, 256)

    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(buf, format="PNG")
    table = pa.Table.from_pylist([{"id": "c", "source": "t", "image": buf.getvalue(), "caption": "x"}],
                                 schema=record_schema("pair"))
    got = build_stage(WatermarkScore.Config(weights=str(tmp_path / "watermark.safetensors"))).process(table)
    published = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406],
                                                                             [0.229, 0.224, 0.225])])
    with torch.no_grad():
        want = torch.softmax(backbone.eval()(published(Image.fromarray(skdata.coffee()))[None]), dim=1)[0, 0]
    assert got.column("watermark_score").to_pylist()[0] == pytest.approx(float(want), abs=1e-4)


def test_refuses_pickled_objects_and_unknown_layouts(tmp_path, capsys):
    """torch.load(weights_only=True): a pickle holding anything but tensors and containers is
    refused, so no code from a downloaded file runs; a layout the task does not know is named."""
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "object.pth")
    assert main(["aesthetic", str(tmp_path / "object.pth"), str(tmp_path / "o.safetensors")]) == 2
    assert "Weights only load failed" in capsys.readouterr().err
    torch.save(_state([("fc", 1, 768)]), tmp_path / "other.pth")
    assert main(["aesthetic", str(tmp_path / "other.pth"), str(tmp_path / "o.safetensors")]) == 2
    assert "no tensors like 'layers" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
