"""The packing benchmark at a toy size (mechanics, not the figures BENCHMARKS.md quotes): lengths
from a real output's sidecars, long samples cut into windows, the three sides and the bound."""

from __future__ import annotations

import pytest

from tools.bench.packing import bound, items, main, one_per_sequence, pack, run, windows


def test_windows_cut_long_samples_without_losing_tokens_or_images() -> None:
    for text, images in [(10_000, 3), (100, 40), (5, 0), (1, 1), (4096 - 144, 1), (4096, 0)]:
        pieces = windows(text, images, 4096, 16, 144)
        assert sum(n for n, _ in pieces) == text + 144 * images
        assert sum(k for _, k in pieces) == images
        assert all(0 < n <= 4096 and k <= 16 and n >= 144 * k for n, k in pieces)
    assert windows(10_000, 0, 4096, 16, 144) == [(4096, 0), (4096, 0), (1808, 0)]
    assert len(windows(100, 40, 4096, 16, 144)) == 3  # the image cap cuts too


def test_pairs_reach_the_image_cap_bound() -> None:
    units = [(144 + 40 + 1, 1)] * 160  # 16 per sequence at most: 10 sequences of 2960 tokens
    got = pack(items(units, 144), 4096, 16, 144, buffer=64)
    assert got["sequences"] == 10 and got["images_per_seq"] == 16
    assert got["efficiency"] == pytest.approx(bound(units, 4096, 16)) == pytest.approx(2960 / 4096)
    assert one_per_sequence(units, 4096) == pytest.approx(185 / 4096)


def test_run_on_a_curated_output(curated, capsys: pytest.CaptureFixture[str]) -> None:
    r = run(curated["out"], samples=200, seq_len=512, max_images=4, n_image_tokens=16, buffers=(4, 32), seed=1)
    assert set(r["kinds"]) == {"pair", "doc", "text"}
    for kind, x in r["kinds"].items():
        for b in (4, 32):
            assert x["one_per_sequence"] <= x["ours"][b]["efficiency"] <= x["bound"] + 1e-12
        assert x["ours"][32]["images_per_seq"] <= 4
    assert r["kinds"]["pair"]["ours"][32]["efficiency"] == pytest.approx(r["kinds"]["pair"]["bound"], abs=0.02)
    again = run(curated["out"], samples=200, seq_len=512, max_images=4, n_image_tokens=16, buffers=(4, 32), seed=1)
    assert {k: x["ours"][32]["efficiency"] for k, x in again["kinds"].items()} == \
        {k: x["ours"][32]["efficiency"] for k, x in r["kinds"].items()}  # seeded
    assert main(["--out", str(curated["out"]), "--samples", "50", "--seq-len", "512", "--image-tokens", "16",
                 "--buffers", "32"]) == 0
    out = capsys.readouterr().out
    assert "ours (buffer 32)" in out and "mixture 45/45/10" in out


def test_realistic_mixture_packs_across_kinds_at_toy_size(tmp_path) -> None:
    """--realistic at 1,200 sequences a mode (BENCHMARKS.md runs 5,000): the stated
    distributions through the loader's Mixer; `mixed` fills the room pairs leave (padding near
    the bound), `per_kind` does not, and both deliver 45/45/10 of the tokens within 1 point over
    every window of 1,000 sequences."""
    import json

    from tools.bench.packing import realistic_sample
    import random

    rng = random.Random(0)
    docs = [realistic_sample("doc", rng) for _ in range(4000)]
    assert 2.3 < sum(k for _, k in docs) / 4000 < 2.7 and max(k for _, k in docs) <= 30  # OBELICS-like
    out = tmp_path / "packing.json"
    assert main(["--realistic", "--sequences", "1200", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mixed"]["padding"] <= max(0.03, r["bound_padding"] + 0.01)
    assert r["per_kind"]["padding"] > r["mixed"]["padding"] + 0.05
    for mode in ("mixed", "per_kind"):
        assert r[mode]["max_window_deviation"] <= 0.01
        assert abs(sum(r[mode]["mixture"].values()) - 1) < 1e-9
