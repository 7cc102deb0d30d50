"""`mm1 export` / `export_checkpoint`: a trainer checkpoint of the tiny MM1 (trained a few steps
on the demo's curated output; random init, so mechanics only, nothing about quality) becomes an
export folder in one process. The exported tensors equal the checkpoint's as torch's own
`dcp_to_torch_save` reads them, bit for bit; the exported model generates greedily after a real
image (scikit-image's astronaut, through the preprocessing stored with the model) and gives the
same logits as the model read straight from the checkpoint; its decoder_hf/ folder loads in
transformers with our text logits; unfinished, empty and description-less folders are refused
with a message. The FSDP-sharded case (a checkpoint written by 2 ranks) is in test_trainer.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tools.cli import main
from train.checkpoint import CheckpointError
from train.export import export_checkpoint, load_checkpoint_model, load_exported
from train.generate import greedy_generate, prompt_with_image
from train.recipe import load_train_recipe
from train.trainer import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(curated, tmp_path_factory) -> Path:
    out, tokenizer = curated
    recipe = load_train_recipe(ROOT / "recipes" / "train" / "demo.yaml", {
        "data.outs": [str(out)], "data.tokenizer": str(tokenizer), "data.workers": 0, "steps": 4,
        "checkpoint": {"every": 2, "keep": 2}})
    run = tmp_path_factory.mktemp("export") / "run"
    assert train(recipe, run)["step"] == 4
    return run


def checkpoint_tensors(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model entries of a DCP checkpoint, flattened by torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp / "flat.pt"
    dcp_to_torch_save(step_dir, flat)
    return {k: v for k, v in torch.load(flat, weights_only=True)["model"].items() if torch.is_tensor(v)}


def _astronaut(model) -> torch.Tensor:
    from skimage import data

    return model.vision.preprocess(Image.fromarray(data.astronaut())).unsqueeze(0)


def test_a_run_folder_exports_its_newest_checkpoint_exactly(run_dir, tmp_path):
    summary = export_checkpoint(run_dir, tmp_path / "export")
    assert summary["step"] == 4 and Path(summary["checkpoint"]).name == "step-00000004"
    exported = load_exported(tmp_path / "export")
    reference = checkpoint_tensors(run_dir / "step-00000004", tmp_path)
    ours = exported.state_dict()
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["registry_name"] == "tiny" and config["config"]["vision"]["pretrained"] is None
    assert exported.vision.preprocess_cfg == load_checkpoint_model(run_dir)[0].vision.preprocess_cfg


def test_the_export_generates_after_an_image_like_the_checkpoint(run_dir, tmp_path):
    """Greedy decoding after the astronaut: as many tokens as asked (no eos in 6 steps is allowed
    too), never the placeholder, the same ids twice, and the same logits as the model read from
    the checkpoint directly, which differ from the step-2 checkpoint's (the weights moved)."""
    export_checkpoint(run_dir, tmp_path / "export")
    exported = load_exported(tmp_path / "export").eval()
    direct = load_checkpoint_model(run_dir / "step-00000004")[0].eval()
    earlier = load_checkpoint_model(run_dir / "step-00000002")[0].eval()
    image = _astronaut(exported)
    assert image.shape[-1] == exported.vision.image_size
    prompt = prompt_with_image([5, 6, 7], 1, exported)
    first = greedy_generate(exported, prompt, image, max_new_tokens=6)
    assert 1 <= len(first) <= 6 and exported.image_token_id not in first
    assert greedy_generate(exported, prompt, image, max_new_tokens=6) == first
    with torch.no_grad():
        logits = exported(prompt, image).logits
        assert torch.equal(logits, direct(prompt, image).logits)
        assert not torch.equal(logits, earlier(prompt, image).logits)


def test_the_exported_hf_decoder_matches_in_transformers(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    summary = export_checkpoint(run_dir, tmp_path / "export")
    exported = load_exported(tmp_path / "export").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(summary["decoder_hf"], attn_implementation="eager").eval()
    tokens = torch.randint(0, exported.image_token_id, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, exported(tokens).logits, atol=1e-5, rtol=1e-5)


def test_mm1_export_casts_to_bf16_and_skips_hf(run_dir, tmp_path, capsys):
    from safetensors import safe_open

    assert main(["export", str(run_dir / "step-00000002"), str(tmp_path / "bf16"), "--dtype", "bf16", "--no-hf"]) == 0
    assert "step 2" in capsys.readouterr().out
    assert not (tmp_path / "bf16" / "decoder_hf").exists()
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert {p.dtype for p in load_exported(tmp_path / "bf16").parameters()} == {torch.bfloat16}


def test_what_cannot_be_exported_is_refused_with_a_message(run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err

    unfinished = tmp_path / "run" / "step-00000004"
    shutil.copytree(run_dir / "step-00000004", unfinished)
    (unfinished / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        export_checkpoint(unfinished, tmp_path / "out")

    old = tmp_path / "old" / "step-00000004"
    shutil.copytree(run_dir / "step-00000004", old)
    state = json.loads((old / "state.json").read_text())
    del state["model"]
    (old / "state.json").write_text(json.dumps(state))
    marker = json.loads((old / "COMPLETE").read_text())
    marker["files"]["state.json"] = (old / "state.json").stat().st_size
    (old / "COMPLETE").write_text(json.dumps(marker))
    assert main(["export", str(old.parent), str(tmp_path / "out")]) == 2
    assert "no model description" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
