"""`mm1 demo` runs end to end, and again over its own earlier output (what `make demo` twice does)."""

from __future__ import annotations

import hashlib

from tools.demo import run_demo


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "curated" / "pairs").iterdir())}


def test_demo_twice(tmp_path, capsys):
    first = run_demo(tmp_path)
    shards = _digests(tmp_path)
    second = run_demo(tmp_path)
    out = capsys.readouterr().out
    assert "verify: OK" in out and "39 inputs -> 30 kept, 9 dropped" in out
    assert first["counts"] == second["counts"]
    assert _digests(tmp_path) == shards
