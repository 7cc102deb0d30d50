"""`mm1 demo` runs end to end, and again over its own earlier output (what `make demo` twice does)."""

from __future__ import annotations

from curate.contract import read_sidecars
from tools.demo import run_demo


def _content(root):
    """(id, image sha256, caption) of every kept sample. Not the tar bytes: the URL list names
    the demo server's port, which differs between runs, and the URLs are in KEY.json."""
    table = read_sidecars(root / "curated", "pair", columns=["id", "image_sha256", "caption"])
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names)))


def test_demo_twice(tmp_path, capsys):
    first = run_demo(tmp_path)
    content = _content(tmp_path)
    second = run_demo(tmp_path)
    out = capsys.readouterr().out
    assert "verify: OK" in out and "53 inputs -> 26 kept, 27 dropped" in out
    assert first["counts"] == second["counts"]
    assert _content(tmp_path) == content and len(content) == 26
