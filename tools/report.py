"""`mm1 report OUT [OUT_B]`: one self-contained static HTML file about a curation output (or two,
side by side): what came in and what each stage dropped, the distributions of what was kept,
the mixture the trainer will see, and a sample viewer. It opens with no network: styles, charts
(inline SVG) and thumbnails (data: URIs) are in the file, and its Content-Security-Policy forbids
any other source.

What it reads, so that it stays fast on large outputs:
- `mm1 stats`' numbers (`tools.stats.compute_stats`: the manifest, sidecar columns and the
  ledger streamed in batches): every number the page shows that `mm1 stats` also prints is that
  number (the page marks them `data-stat="<path in the stats dict>"`), per-stage seconds and rows
  included (the manifest's `stages`; no such section for an output written before it existed);
- a second pass over the ledger's small columns: drops per kind and stage (the funnel: every
  stage of the recipe that sees the kind, in order, 0 where it dropped nothing), a few examples
  per drop code, duplicate group sizes (from the duplicate drops' details, which name the kept
  id), and the scores of rows a score rule dropped (the ledger has no score columns: the
  `<column>_low` details of `score_filter` and `score_top_fraction` lead with the row's score;
  rows other stages dropped after scoring have no recorded score and are not in the histograms);
- sidecar columns: the kept rows' scores (histograms of kept and dropped), languages;
- tars only for the sampled samples, by the offsets their sidecar rows record: thumbnails are
  decoded (pixel cap on the header first) and re-encoded small, never embedded as they are.

Sampling: `samples` kept samples per kind, drawn with a seeded generator over the manifest's
shard counts (only the chosen shards' sidecars are opened); withdrawn samples are skipped.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curate.contract import (
    KINDS, META_PREFIX, Manifest, inside, is_url, iter_ledger, location, read_range, read_schema, read_table,
)
from curate.stages import STAGES
from tools.report_html import Run, render
from tools.stats import compute_stats

DEFAULT_WEIGHTS = {"pair": 0.45, "doc": 0.45, "text": 0.10}  # MM1's mixture
THUMB = 160  # px, the longer side of a thumbnail
MAX_THUMB_PIXELS = 50_000_000
EXAMPLES_PER_CODE = 5
SCORE_BINS = 40
_DUP_OF = re.compile(r"\b(?:as|of)\s+(\S+?)(?=[\s,;()]|$)")
_SCORE_DETAIL = re.compile(r"([a-z][a-z0-9_]*) (-?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf))\b")


# ---------------------------------------------------------------------------------------------
# the ledger pass: funnel, examples, duplicate groups


def _stage_order(manifest: Manifest) -> list[str]:
    stages = [s.get("name") or s["kind"] for s in (manifest.recipe or {}).get("stages", [])]
    return ["source", *stages, "pack"]


def _stages_of(manifest: Manifest, kind: str) -> list[str]:
    """The recipe's stages that see records of `kind`, in recipe order (a kind the registry does
    not know: every stage)."""
    out = []
    for s in (manifest.recipe or {}).get("stages", []):
        stage = STAGES.get(s["kind"])
        if stage is None or kind in stage.kinds:
            out.append(s.get("name") or s["kind"])
    return out


def funnel_rows(inputs: int, drops: Counter, stages: list[str], order: list[str]) -> list[dict[str, Any]]:
    """What remains after each stage: every one of `stages` in order (0 where it dropped nothing),
    `source` first and `pack` last when they dropped something, and any other stage that dropped
    rows (an older recipe's) in `order`."""
    names = [s for s in ("source", *stages, "pack") if s in stages or drops.get(s)]
    rank = {s: i for i, s in enumerate(order)}
    names += sorted((s for s in drops if s not in names), key=lambda s: (rank.get(s, len(rank)), s))
    rows, remaining = [{"stage": "inputs", "dropped": 0, "remaining": inputs}], inputs
    for stage in names:
        remaining -= drops.get(stage, 0)
        rows.append({"stage": stage, "dropped": drops.get(stage, 0), "remaining": remaining})
    return rows


def dropped_score(reason: str | None, detail: str | None) -> tuple[str, float] | None:
    """(column, score) of a row a score rule dropped, read from its drop detail: `score_filter`
    and `score_top_fraction` lead it with `<column> <score>` (drop code `<column>_low`)."""
    if not reason or not reason.endswith("_low") or not detail:
        return None
    column = reason[: -len("_low")]
    m = _SCORE_DETAIL.match(detail)
    if not m or m.group(1) != column:
        return None
    return column, float(m.group(2))


def _ledger_pass(out: Path, manifest: Manifest) -> tuple[dict, dict, dict, dict]:
    inputs: Counter = Counter()
    drops: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, list[dict[str, Any]]] = {}
    kept_of: dict[str, Counter] = defaultdict(Counter)  # stage -> kept id -> duplicates pointing at it
    dropped_scores: dict[str, list[float]] = defaultdict(list)  # "kind/column" -> scores
    for batch in iter_ledger(out, columns=["id", "kind", "url", "outcome", "stage", "drop_reason", "drop_detail"]):
        t = pa.Table.from_batches([batch])
        inputs.update(t["kind"].to_pylist())
        dropped = t.filter(pc.equal(t["outcome"], "dropped")).to_pylist()
        for r in dropped:
            drops[r["kind"]][r["stage"]] += 1
            code = f"{r['stage']}/{r['drop_reason']}"
            seen = examples.setdefault(code, [])
            if len(seen) < EXAMPLES_PER_CODE:
                seen.append({k: r[k] for k in ("id", "kind", "url", "drop_detail")})
            if r["drop_reason"] == "duplicate" and r["drop_detail"]:
                m = _DUP_OF.search(r["drop_detail"])
                if m:
                    kept_of[r["stage"]][m.group(1)] += 1
            score = dropped_score(r["drop_reason"], r["drop_detail"])
            if score:
                dropped_scores[f"{r['kind']}/{score[0]}"].append(score[1])
    order = _stage_order(manifest)
    funnel = {kind: funnel_rows(inputs[kind], drops[kind], _stages_of(manifest, kind), order) for kind in sorted(inputs)}
    groups = {stage: dict(sorted(Counter(n + 1 for n in ids.values()).items())) for stage, ids in sorted(kept_of.items())}
    return funnel, examples, groups, dropped_scores


# ---------------------------------------------------------------------------------------------
# sidecar columns: scores (with the recipe's thresholds), languages


def _thresholds(manifest: Manifest, kind: str) -> dict[str, list[dict[str, Any]]]:
    """score column -> the cuts the recipe made on it, for `kind`'s histograms: a score_filter's
    min_score and max_score, a score_top_fraction's cutoff (from the manifest's summary of that
    pass). Pairs only: a doc's column aggregates its images' scores, which the cuts apply to one
    by one (and score_top_fraction ranks pairs only)."""
    cuts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if kind != "pair":
        return cuts
    for s in (manifest.recipe or {}).get("stages", []):
        name = s.get("name") or s["kind"]
        for bound, sign in (("min_score", "≥"), ("max_score", "≤")):
            if s["kind"] == "score_filter" and s.get(bound) is not None:
                cuts[s.get("column", "clip_score")].append({"value": float(s[bound]),
                                                            "label": f"{name} {sign} {s[bound]}"})
        if s["kind"] == "score_top_fraction":
            summary = (manifest.global_stages or {}).get(name, {}).get("summary", {})
            if summary.get("cutoff_score") is not None:
                cuts[s.get("column", "clip_score")].append({
                    "value": float(summary["cutoff_score"]),
                    "label": f"{name}: top {s.get('fraction')} (cutoff {summary['cutoff_score']:.4g})"})
    return cuts


def _columns(out: Path, manifest: Manifest, kind: str) -> tuple[dict[str, list[np.ndarray]], Counter]:
    floats: dict[str, list[np.ndarray]] = defaultdict(list)
    langs: Counter = Counter()
    withdrawn = manifest.withdrawn_keys(kind)
    for shard in manifest.shards(kind):
        path = inside(out, shard.sidecar)
        schema = read_schema(path)
        # a source's own float columns (meta_*) are not our scores
        names = [f.name for f in schema if pa.types.is_floating(f.type) and not f.name.startswith(META_PREFIX)]
        wanted = names + (["language"] if "language" in schema.names else [])
        if not wanted:
            continue
        t = read_table(path, columns=wanted + ["key"])
        gone = withdrawn.get(shard.name)
        if gone:
            t = t.filter(pc.invert(pc.is_in(t["key"], pa.array(sorted(gone), pa.string()))))
        for n in names:
            floats[n].append(t[n].drop_null().to_numpy())
        if "language" in wanted:
            langs.update(v or "unknown" for v in t["language"].to_pylist())
    return floats, langs


def score_histograms(floats: dict[str, list[np.ndarray]], dropped: dict[str, list[float]],
                     cuts: dict[str, list]) -> dict[str, dict[str, Any]]:
    """Per score column: kept and dropped counts over the same bins (the range of both and of the
    cuts). Dropped scores are those the ledger records (see `dropped_score`)."""
    out = {}
    for name in sorted(set(floats) | set(dropped)):
        parts = floats.get(name, [])
        kept = np.concatenate(parts) if parts else np.empty(0)
        gone = np.asarray(dropped.get(name, []), dtype=np.float64)
        gone = gone[np.isfinite(gone)]
        both = np.concatenate([kept, gone])
        if not len(both):
            continue
        lo, hi = float(both.min()), float(both.max())
        for c in cuts.get(name, []):
            lo, hi = min(lo, c["value"]), max(hi, c["value"])
        if hi <= lo:
            hi = lo + 1e-6
        edges = np.histogram_bin_edges(both, bins=SCORE_BINS, range=(lo, hi))
        out[name] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in np.histogram(kept, bins=edges)[0]],
                     "dropped": [int(c) for c in np.histogram(gone, bins=edges)[0]], "n": int(len(kept)),
                     "n_dropped": int(len(gone)), "thresholds": cuts.get(name, [])}
    return out


# ---------------------------------------------------------------------------------------------
# the mixture


def mixture(stats: dict[str, Any], *, seq_len: int, image_tokens: int, max_images: int,
            weights: dict[str, float]) -> list[dict[str, Any]]:
    """Per kind: tokens a pass yields (the sidecars' text tokens, an end token per sample, and
    `image_tokens` per image), the sequences they fill at best (the packing bound: max of
    tokens / seq_len and images / max_images), their natural share, the target weight, and how
    many passes over each kind training takes when the scarcest kind (relative to its weight)
    is seen once."""
    rows = []
    for kind in KINDS:
        k = stats["kinds"].get(kind)
        if not k or not k["samples"]:
            continue
        samples = k["samples"]
        text = (k.get("token_count") or {}).get("sum") or 0
        if kind == "pair":
            images = samples
        elif kind == "doc":
            images = (k.get("n_images") or {}).get("sum") or 0
        else:
            images = 0
        tokens = text + samples + images * image_tokens
        sequences = max(math.ceil(tokens / seq_len), math.ceil(images / max_images) if images else 0, 1)
        rows.append({"kind": kind, "samples": samples, "text_tokens": text, "images": images, "tokens": tokens,
                     "sequences": sequences, "weight": weights.get(kind, 0.0)})
    total = sum(r["sequences"] for r in rows)
    weighted = [r for r in rows if r["weight"] > 0]
    limit = min((r["sequences"] / r["weight"] for r in weighted), default=0.0)
    for r in rows:
        r["natural_share"] = r["sequences"] / total if total else 0.0
        r["passes"] = r["weight"] * limit / r["sequences"] if r["weight"] > 0 else 0.0
    return rows


# ---------------------------------------------------------------------------------------------
# samples, read by offset


def _member(tar: Path, members: list[dict[str, Any]], name_end: str) -> bytes | None:
    for m in members:
        if m["name"].endswith(name_end):
            return read_range(tar, int(m["offset"]), int(m["offset"]) + int(m["size"]))
    return None


def thumbnail(data: bytes | None) -> str | None:
    """A small JPEG data: URI of image bytes, or None when they do not decode (or are too big)."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_THUMB_PIXELS:
                return None
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a sample the viewer cannot show is shown without its image
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _text(data: bytes | None, limit: int) -> str:
    text = (data or b"").decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + " …"


def sample_kept(out: Path, manifest: Manifest, kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    shards = manifest.shards(kind)
    counts = np.array([int(s.count) for s in shards], dtype=np.int64)
    if not counts.sum() or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(int(counts.sum()), size=min(n, int(counts.sum())), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    withdrawn = manifest.withdrawn_keys(kind)
    out_rows: list[dict[str, Any]] = []
    for s_idx in np.unique(np.searchsorted(starts, picks, side="right") - 1):
        shard = shards[int(s_idx)]
        rows_here = [int(p - starts[s_idx]) for p in picks if starts[s_idx] <= p < starts[s_idx] + counts[s_idx]]
        path = inside(out, shard.sidecar)
        names = read_schema(path).names
        cols = [c for c in ("key", "id", "url", "members", "caption", "caption_synthetic", "caption_vecap",
                            "vecap_fallback", "language", "clip_score", "token_count", "n_images", "title")
                if c in names]
        table = read_table(path, columns=cols)
        tar = inside(out, shard.name)
        for i in rows_here:
            r = {c: table[c][i].as_py() for c in cols}
            if r["key"] in withdrawn.get(shard.name, set()):
                continue
            members = r.pop("members") or []
            if kind == "pair":
                r["thumb"] = thumbnail(next((_member(tar, members, f".{e}") for e in ("jpg", "png", "webp")
                                             if any(m["name"].endswith(f".{e}") for m in members)), None))
            elif kind == "doc":
                meta = json.loads(_member(tar, members, ".json") or b"{}")
                segs = []
                for seg in meta.get("segments", [])[:40]:
                    if seg.get("type") == "image":
                        data = next((_member(tar, members, f".{seg['image']}.{e}") for e in ("jpg", "png", "webp")
                                     if any(m["name"].endswith(f".{seg['image']}.{e}") for m in members)), None)
                        segs.append({"type": "image", "thumb": thumbnail(data), "alt": seg.get("alt") or "",
                                     "caption_vecap": seg.get("caption_vecap")})
                    else:
                        segs.append({"type": "text", "text": _text((seg.get("text") or "").encode(), 600)})
                r["segments"] = segs
            else:
                r["text"] = _text(_member(tar, members, ".txt"), 1200)
            r["shard"] = shard.name
            out_rows.append(r)
    return out_rows


# ---------------------------------------------------------------------------------------------


def collect(out: str | Path, *, samples: int = 12, seed: int = 0, seq_len: int = 4096, image_tokens: int = 144,
            max_images: int = 16, weights: dict[str, float] | None = None) -> Run:
    out = location(out)
    manifest = Manifest.read(out)
    stats = compute_stats(out)
    order = _stage_order(manifest)
    funnel, examples, groups, dropped_scores = _ledger_pass(out, manifest)
    scores, languages = {}, {}
    for kind in KINDS:
        if kind not in manifest.kinds:
            continue
        floats, langs = _columns(out, manifest, kind)
        dropped = {key.split("/", 1)[1]: v for key, v in dropped_scores.items() if key.startswith(f"{kind}/")}
        for name, h in score_histograms(floats, dropped, _thresholds(manifest, kind)).items():
            scores[f"{kind}/{name}"] = h
        if langs:
            languages[kind] = dict(langs.most_common())
    run = Run(out=out, stats=stats, manifest=manifest, stage_order=order, funnel=funnel, examples=examples,
              dup_groups=groups, languages=languages, scores=scores,
              mixture=mixture(stats, seq_len=seq_len, image_tokens=image_tokens, max_images=max_images,
                              weights=weights or DEFAULT_WEIGHTS))
    for kind in KINDS:
        if kind in manifest.kinds:
            run.samples[kind] = sample_kept(out, manifest, kind, samples, seed)
    return run


def build_report(outs: list[str | Path], path: str | Path | None = None, **options: Any) -> Path:
    """Write the report of one output (or two, compared) and return its path (default:
    `OUT/report.html`, or `OUT_A/report-vs-<OUT_B name>.html`)."""
    if not 1 <= len(outs) <= 2:
        raise ValueError("a report shows one output, or two side by side")
    runs = [collect(o, **options) for o in outs]
    if path is None:
        first = location(outs[0])
        path = first / ("report.html" if len(outs) == 1 else f"report-vs-{location(outs[1]).name}.html")
    path = location(path)
    html = render(runs)
    if is_url(path):  # one upload: the object appears whole
        path.write_text(html, encoding="utf-8")
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
