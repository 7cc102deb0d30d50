"""`mm1 demo` runs end to end over an earlier demo's output (what `make demo` twice does).

The earlier demo is the session's (tests/conftest.py `demo_trained`: the demo inputs curated,
the tiny MM1 trained 40 steps on them and exported, all under one root as `mm1 demo` leaves it);
`run_demo` runs again over a copy of that root: it rebuilds the inputs, curates from scratch
over the earlier shards, trains afresh (never resuming the earlier run) and replaces the export."""

from __future__ import annotations

import re
import shutil

from curate.contract import read_sidecars
from tools.demo.run import run_demo
from train.export import load_exported


def _content(root):
    """(id, image sha256 or text size, caption or token count) of every kept sample of each kind.
    Not the tar bytes: the URL list and the WARC name the demo server's port, which differs
    between runs, and the URLs are in KEY.json."""
    out = {}
    # a doc's id holds its WARC byte offset, which moves with the port's digits in the page URLs
    for kind, columns in (("pair", ["id", "image_sha256", "caption"]), ("doc", ["text_chars", "n_images"]),
                          ("text", ["id", "text_chars", "token_count"])):
        table = read_sidecars(root / "curated", kind, columns=columns)
        out[kind] = sorted(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    return out


def test_demo_twice(demo_trained, shared_cluster, tmp_path, capsys):
    """The second run curates on the session's cluster (the LocalCluster a run starts for itself
    is every other `run_recipe(recipe)` test's, and `make demo`'s)."""
    first, _, first_printed = demo_trained
    root = tmp_path / "demo"
    shutil.copytree(first.root, root)  # the earlier demo's inputs, shards, checkpoints and export
    content = _content(root)
    second = run_demo(root, client=shared_cluster.client)
    out = capsys.readouterr().out
    assert "verify: OK" in out and "89 inputs -> 44 kept (doc 8, pair 26, text 10), 45 dropped" in out
    trained = re.findall(r"for (\d+) steps on the curated shards: loss (\d+\.\d+) -> (\d+\.\d+)",
                         first_printed + out)
    assert len(trained) == 2  # each demo run ends by training the tiny MM1 on what it curated
    for steps, start, end in trained:  # random init: the loss of the mixture falls by a fifth or more
        assert int(steps) == 40 and float(end) < 0.8 * float(start)
    assert out.count("report:") == 1 and (root / "curated" / "report.html").is_file()
    assert "export:" in first_printed and out.count("export:") == 1
    assert (root / "export" / "decoder_hf" / "config.json").is_file()
    assert load_exported(root / "export").cfg.name == "tiny"  # the second run's export replaced the first
    assert first.manifest["counts"] == second["counts"]
    assert _content(root) == content
    assert {kind: len(rows) for kind, rows in content.items()} == {"pair": 26, "doc": 8, "text": 10}
