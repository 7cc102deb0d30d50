"""The device mesh (train/mesh.py): -1 takes what the world leaves, and a mesh that cannot fit
fails at start with the key and what was expected, through `mm1 train` too (exit 2)."""

from __future__ import annotations

import pytest

from train.mesh import ParallelDims


@pytest.mark.parametrize(("args", "expected"), [
    ((1, -1, 1, 8, None), (1, 8, 1)),
    ((2, -1, 1, 8, None), (2, 4, 1)),
    ((-1, 2, 1, 8, None), (4, 2, 1)),
    ((2, 2, 2, 4, 4), (2, 2, 2)),
    ((1, -1, 2, 4, 4), (1, 4, 2)),
])
def test_sizes_resolve(args, expected):
    dims = ParallelDims.resolve(*args)
    assert (dims.dp_replicate, dims.dp_shard, dims.ep) == expected and dims.world == args[3]
    assert dims.fsdp == (expected[1] > 1)


@pytest.mark.parametrize(("args", "message"), [
    ((2, 3, 1, 8, None), r"dp_replicate x parallel.dp_shard = 2 x 3 = 6, expected the world size 8"),
    ((-1, -1, 1, 8, None), r"both -1"),
    ((3, -1, 1, 8, None), r"parallel.dp_replicate=3 does not divide the world size 8"),
    ((1, -1, 2, 4, None), r"parallel.ep is 2, but the model is dense"),
    ((1, -1, 3, 6, 4), r"parallel.ep=3 does not divide the model's 4 experts"),
    ((2, 2, 4, 4, 8), r"parallel.ep=4 does not divide parallel.dp_shard=2"),
    ((0, -1, 1, 4, None), r"parallel.dp_replicate is 0"),
])
def test_a_mesh_that_cannot_fit_names_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.resolve(*args)


def test_mm1_train_refuses_a_mesh_for_another_world(curated, tmp_path, capsys):
    from tests.train.test_trainer import DEMO_TRAIN, _overrides
    from tools.cli import main

    args = ["train", str(DEMO_TRAIN), "--run-dir", str(tmp_path / "run")]
    for o in _overrides(curated, **{"parallel.dp_replicate": 2, "data.workers": 0}):
        args += ["--override", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot start on 1 rank(s)" in err and "parallel.dp_replicate=2 does not divide the world size 1" in err
    assert not list((tmp_path / "run").glob("step-*"))
