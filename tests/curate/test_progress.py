"""A run's progress on stderr (curate/engine/cluster.py `StepLine`): one line per step, named by
the stages it runs, ending on the step's samples done/total, its partitions, kept and dropped."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from curate.engine.driver import run_recipe
from curate.recipe import parse_recipe


def _last_states(stderr: str) -> dict[str, str]:
    """Each step's last redraw (tqdm rewrites its line after a carriage return), by label."""
    states: dict[str, str] = {}
    for part in re.split(r"[\r\n]+", stderr):
        if ": " in part and "samples" in part:
            label, _, rest = part.rpartition(": ")
            states[label.strip()] = rest
    return states


def test_each_step_shows_its_stages_samples_kept_and_dropped(tmp_path, shared_cluster, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    # 5 pairs in 3 partitions: a caption too short, and two copies of one picture
    for i, (shade, caption) in enumerate([(0, "x"), (60, "a grey square"), (60, "the same square"),
                                          (120, "a lighter square"), (180, "the lightest square")]):
        Image.fromarray(np.full((16, 16, 3), shade, np.uint8)).save(folder / f"p{i}.jpg")
        (folder / f"p{i}.txt").write_text(caption)
    recipe = parse_recipe({
        "name": "progress",
        "sources": [{"kind": "image_folder", "name": "f", "path": str(folder), "files_per_partition": 2}],
        "stages": [{"kind": "caption_length_filter", "min_chars": 3}, {"kind": "exact_dedup"}, {"kind": "image"}],
        "output": {"path": str(tmp_path / "out")},
    })
    manifest = run_recipe(recipe, progress=True, client=shared_cluster.client)
    assert manifest["counts"] == {"partitions": 3, "inputs": 5, "kept": 3, "dropped": 2}
    states = _last_states(capsys.readouterr().err)
    end = "3/3 partitions, kept {}, dropped {}]"
    # the first segment's total is not known before it has read its partitions
    assert states["segment 0: caption_length_filter"].startswith("5 samples [")
    assert states["segment 0: caption_length_filter"].endswith(end.format(4, 1))
    for label, kept in (("global 0: exact_dedup", 3), ("segment 1: image", 3), ("plan", 3), ("pack", 3)):
        assert re.match(r"100%\|.*\| 5/5 \[.* samples/s, ", states[label]), (label, states[label])
        assert states[label].endswith(end.format(kept, 5 - kept)), (label, states[label])
    assert list(states) == ["segment 0: caption_length_filter", "global 0: exact_dedup", "segment 1: image",
                            "plan", "pack"]
