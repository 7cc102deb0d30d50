"""`mm1 stats OUT`: exact statistics of a finished curation output, without opening a tar.

Everything comes from the manifest, the parquet sidecars (read one shard at a time, only the
columns needed) and the ledger (streamed in record batches). Numbers are exact, never sampled:
distributions keep a value -> count table, so memory grows with the number of *distinct* values
(image sizes, caption lengths, domains, sources), not with the number of samples.

Percentiles use the nearest-rank definition: pN is the smallest value v such that at least
ceil(N/100 * n) of the n values are <= v (p0 is the minimum). Every histogram bucket is half-open,
[lo, hi). The returned dict is JSON-serialisable (plain ints, floats, strings, None) so the
HTML report can reuse it as is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.contract import (
    IMAGE_EXTENSIONS, KINDS, META_PREFIX, Manifest, ShardEntry, inside, iter_ledger, location, read_schema, read_table,
)

PERCENTILES = (5, 25, 50, 75, 95)
TOP_DOMAINS = 20
TOP_FETCH_DOMAINS = 20  # rows of the printed Domains table (DNS and connections); the manifest keeps 100

# Fixed histogram edges: bucket i holds edges[i-1] <= v < edges[i].
PIXEL_EDGES = (64, 128, 256, 512, 1024, 2048, 4096)
ASPECT_EDGES = (0.5, 0.75, 1.0, 1.34, 2.0)
BYTES_EDGES = (10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000)
CHAR_EDGES = (10, 20, 50, 100, 200, 500, 1000)
WORD_EDGES = (2, 5, 10, 20, 50, 100)
TEXT_EDGES = (100, 1_000, 10_000, 100_000)
COUNT_EDGES = (1, 2, 4, 8, 16, 32)
TOKEN_EDGES = (16, 64, 256, 1024, 4096, 16384)
ATTEMPT_EDGES = (2, 3, 4, 6)
SCORE_EDGES = (0.0, 0.1, 0.2, 0.25, 0.28, 0.3, 0.35, 0.4, 0.5)  # CLIP/DFN cosine, language confidence

_DOC_IMAGE = r"^[^.]+\.\d+\.(?P<ext>" + "|".join(IMAGE_EXTENSIONS) + ")$"
_LEDGER_COLUMNS = ["id", "kind", "source", "domain", "outcome", "stage", "drop_reason", "drop_detail", "attempts"]


class Counts:
    """An exact multiset of numbers: sorted distinct values and their counts."""

    def __init__(self) -> None:
        self.values = np.empty(0)
        self.counts = np.empty(0, dtype=np.int64)

    def add(self, values: pa.Array | pa.ChunkedArray | np.ndarray) -> None:
        if not isinstance(values, np.ndarray):
            values = values.drop_null().to_numpy()
        if len(values) == 0:
            return
        v, c = np.unique(values, return_counts=True)
        dtype = np.result_type(self.values.dtype, v.dtype) if len(self.values) else v.dtype
        merged, inverse = np.unique(np.concatenate([self.values.astype(dtype), v.astype(dtype)]), return_inverse=True)
        counts = np.zeros(len(merged), dtype=np.int64)
        np.add.at(counts, inverse, np.concatenate([self.counts, c]))
        self.values, self.counts = merged, counts

    def summary(self, edges: tuple[float, ...]) -> dict[str, Any]:
        """count, sum, mean, min, p5..p95, max and a histogram over `edges`."""
        n = int(self.counts.sum())
        out: dict[str, Any] = {"count": n}
        if n == 0:
            out.update({"sum": 0, "mean": None, "min": None, **{f"p{p}": None for p in PERCENTILES}, "max": None})
        else:
            total = (self.values * self.counts).sum()
            cum = np.cumsum(self.counts)
            out["sum"] = _py(total)
            out["mean"] = float(total) / n
            out["min"] = _py(self.values[0])
            for p in PERCENTILES:
                rank = max(1, math.ceil(p * n / 100))
                out[f"p{p}"] = _py(self.values[int(np.searchsorted(cum, rank))])
            out["max"] = _py(self.values[-1])
        bucket = np.searchsorted(np.asarray(edges, dtype=float), self.values.astype(float), side="right")
        per_bucket = np.bincount(bucket, weights=self.counts, minlength=len(edges) + 1) if n else np.zeros(len(edges) + 1)
        out["histogram"] = [{"bucket": label, "count": int(c)} for label, c in zip(_labels(edges), per_bucket)]
        return out

    def value_counts(self) -> dict[str, int]:
        return {str(_py(v)): int(c) for v, c in zip(self.values, self.counts)}


def _py(v: Any) -> int | float:
    """numpy scalar -> plain int (when integral dtype) or float, for JSON."""
    return int(v) if np.issubdtype(np.asarray(v).dtype, np.integer) else float(v)


def _labels(edges: tuple[float, ...]) -> list[str]:
    labels = [f"<{edges[0]:g}"]
    labels += [f"[{lo:g},{hi:g})" for lo, hi in zip(edges, edges[1:])]
    return labels + [f">={edges[-1]:g}"]


def _rate(kept: int, inputs: int) -> float | None:
    return kept / inputs if inputs else None


def _group_count(table: pa.Table, keys: list[str], **first: str) -> list[dict[str, Any]]:
    """Rows of `keys` + count (+ the first value of other columns, in row order)."""
    aggs: list[Any] = [([], "count_all")]
    aggs += [(col, "first", pc.ScalarAggregateOptions(skip_nulls=False)) for col in first.values()]
    rows = table.group_by(keys, use_threads=False).aggregate(aggs).to_pylist()
    for row in rows:
        for name, col in first.items():
            row[name] = row.pop(f"{col}_first")
    return rows


# ---------------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------------


def _image_member_sizes(members: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Sizes and extensions of the image members (KEY.N.ext) of doc samples."""
    flat = pc.list_flatten(members)
    names = pc.struct_field(flat, "name")
    ext = pc.struct_field(pc.extract_regex(names, _DOC_IMAGE), "ext")
    mask = pc.is_valid(ext)
    return pc.struct_field(flat, "size").filter(mask).to_numpy(), ext.filter(mask).to_pylist()


def _read_sidecar(path: Path, columns: list[str], withdrawn: set[str] | None) -> pa.Table:
    """A sidecar's columns, without the samples a retry round withdrew (KindEntry.withdrawn_keys)."""
    if not withdrawn:
        return read_table(path, columns=columns)
    t = read_table(path, columns=[*columns, "key"])
    return t.filter(pc.invert(pc.is_in(t["key"], pa.array(sorted(withdrawn), pa.string())))).select(columns)


def _kind_stats(out: Path, kind: str, shards: tuple[ShardEntry, ...],
                withdrawn: dict[str, set[str]] | None = None) -> dict[str, Any]:
    acc: dict[str, Counts] = {}
    formats: dict[str, int] = {}

    def add(name: str, values: Any) -> None:
        acc.setdefault(name, Counts()).add(values)

    withdrawn = withdrawn or {}
    scores: dict[str, Counts] = {}
    captions: dict[str, dict[str, int]] = {}
    tokenizers: set[str] = set()
    for shard in shards:
        path = inside(out, shard.sidecar)
        gone = withdrawn.get(shard.name)
        schema = read_schema(path)
        # a source's own float columns (meta_*: a URL list's similarity, punsafe...) are not our scores
        floats = [f.name for f in schema if pa.types.is_floating(f.type) and not f.name.startswith(META_PREFIX)]
        if "token_count" in schema.names:  # a recipe with a tokenizer: what the trainer will pack
            t = _read_sidecar(path, ["token_count", "tokenizer"], gone)
            add("token_count", t["token_count"])
            tokenizers.update(v for v in t["tokenizer"].unique().to_pylist() if v)
        if floats:
            t = _read_sidecar(path, floats, gone)
            for name in floats:
                scores.setdefault(name, Counts()).add(t[name])
        if kind == "pair":
            t = _read_sidecar(path, ["width", "height", "image_nbytes", "image_format", "caption", "caption_chars"], gone)
            add("width", t["width"])
            add("height", t["height"])
            valid = pc.and_(pc.is_valid(t["width"]), pc.greater(t["height"], 0))
            w = pc.cast(t["width"].filter(valid), pa.float64())
            add("aspect_ratio", pc.divide(w, pc.cast(t["height"].filter(valid), pa.float64())))
            add("image_bytes", t["image_nbytes"])
            add("caption_chars", t["caption_chars"])
            add("caption_words", pc.count_substring_regex(pc.fill_null(t["caption"], ""), r"\S+"))
            for row in _group_count(t.select(["image_format"]), ["image_format"]):
                formats[str(row["image_format"])] = formats.get(str(row["image_format"]), 0) + row["count_all"]
            if "txt_source" in schema.names:  # the recaptioning stage ran (curate/stages/recaption.py)
                t = _read_sidecar(path, ["caption_synthetic", "vecap_fallback", "txt_source"], gone)
                synthetic = t["caption_synthetic"].filter(pc.is_valid(t["caption_synthetic"]))
                add("synthetic_words", pc.count_substring_regex(synthetic, r"\S+"))
                for col in ("vecap_fallback", "txt_source"):
                    for row in _group_count(t.select([col]), [col]):
                        slot = captions.setdefault(col, {})
                        slot[str(row[col])] = slot.get(str(row[col]), 0) + row["count_all"]
        elif kind == "doc":
            t = _read_sidecar(path, ["text_chars", "n_images", "n_segments", "segments_dropped", "members"], gone)
            for col in ("text_chars", "n_images", "n_segments", "segments_dropped"):
                add(col, t[col])
            sizes, exts = _image_member_sizes(t["members"])
            add("image_bytes", sizes)
            for ext in exts:
                formats[ext] = formats.get(ext, 0) + 1
        else:
            add("text_chars", _read_sidecar(path, ["text_chars"], gone)["text_chars"])

    edges = {
        "width": PIXEL_EDGES, "height": PIXEL_EDGES, "aspect_ratio": ASPECT_EDGES, "image_bytes": BYTES_EDGES,
        "caption_chars": CHAR_EDGES, "caption_words": WORD_EDGES, "text_chars": TEXT_EDGES,
        "n_images": COUNT_EDGES, "n_segments": COUNT_EDGES, "segments_dropped": COUNT_EDGES,
        "token_count": TOKEN_EDGES, "synthetic_words": WORD_EDGES,
    }
    names = {
        "pair": ["width", "height", "aspect_ratio", "image_bytes", "caption_chars", "caption_words"],
        "doc": ["text_chars", "n_images", "n_segments", "segments_dropped", "image_bytes"],
        "text": ["text_chars"],
    }[kind]
    if "token_count" in acc:
        names = [*names, "token_count"]
    if "synthetic_words" in acc:
        names = [*names, "synthetic_words"]
    result: dict[str, Any] = {name: acc.get(name, Counts()).summary(edges[name]) for name in names}
    if tokenizers:
        result["tokenizers"] = sorted(tokenizers)
    # every float column a stage added (CLIP/DFN scores, language confidence): its distribution
    result["scores"] = {name: c.summary(SCORE_EDGES) for name, c in sorted(scores.items())}
    if captions:  # "None" counts the pairs without: no fallback (a kept fusion), no caption
        result["recaption"] = {col: dict(sorted(v.items())) for col, v in sorted(captions.items())}
    if kind != "text":
        result["image_formats"] = dict(sorted(formats.items(), key=lambda kv: (-kv[1], kv[0])))
    return result


# ---------------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------------


def _ledger_stats(out: Path) -> dict[str, Any]:
    by_source: dict[str, list[int]] = {}
    by_kind: dict[str, list[int]] = {}
    by_domain: dict[str | None, list[int]] = {}
    drops: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    attempts = Counts()
    for batch in iter_ledger(out, columns=_LEDGER_COLUMNS):
        t = pa.Table.from_batches([batch])
        attempts.add(t["attempts"])
        for keys, table in (("source", by_source), ("kind", by_kind), ("domain", by_domain)):
            for row in _group_count(t.select([keys, "outcome"]), [keys, "outcome"]):
                slot = table.setdefault(row[keys], [0, 0, 0])
                slot[{"kept": 0, "dropped": 1}.get(row["outcome"], 2)] += row["count_all"]
        dropped = t.filter(pc.equal(t["outcome"], "dropped"))
        for row in _group_count(dropped, ["stage", "drop_reason"], example_id="id", example_detail="drop_detail"):
            seen = drops.setdefault((row["stage"], row["drop_reason"]), {
                "stage": row["stage"], "reason": row["drop_reason"], "count": 0,
                "example_id": row["example_id"], "example_detail": row["example_detail"],
            })
            seen["count"] += row["count_all"]

    def outcome(kept: int, dropped: int, other: int) -> dict[str, Any]:
        inputs = kept + dropped + other
        return {"inputs": inputs, "kept": kept, "dropped": dropped, "keep_rate": _rate(kept, inputs)}

    totals = [sum(v[i] for v in by_kind.values()) for i in range(3)]
    n_dropped = totals[1]
    ranked = sorted(drops.values(), key=lambda d: (-d["count"], str(d["stage"]), str(d["reason"])))
    for d in ranked:
        d["share_of_dropped"] = d["count"] / n_dropped if n_dropped else None
    by_stage: dict[str, dict[str, int]] = {}
    for d in ranked:
        by_stage.setdefault(str(d["stage"]), {})[str(d["reason"])] = d["count"]
    domains = [{"domain": k, **outcome(*v)} for k, v in by_domain.items()]
    return {
        "outcomes": {
            **outcome(*totals),
            "by_kind": {k: outcome(*by_kind[k]) for k in sorted(by_kind)},
            "by_source": {k: outcome(*by_source[k]) for k in sorted(by_source)},
        },
        "drops": {"ranked": ranked, "by_stage": by_stage},
        "attempts": {**attempts.summary(ATTEMPT_EDGES), "values": attempts.value_counts()},
        "domains": {
            "distinct": sum(1 for k in by_domain if k is not None),
            "without_url": outcome(*by_domain[None]) if None in by_domain else outcome(0, 0, 0),
            "top_kept": sorted(domains, key=lambda d: (-d["kept"], d["domain"] or ""))[:TOP_DOMAINS],
            "top_dropped": sorted(domains, key=lambda d: (-d["dropped"], d["domain"] or ""))[:TOP_DOMAINS],
        },
    }


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def compute_stats(out: str | Path) -> dict[str, Any]:
    """Exact statistics of the output at `out` (see the module docstring for definitions).

    Shard counts and tar bytes come from the manifest (verify checks they match the files);
    sample distributions from the sidecars; outcomes, drops, attempts and domains from the ledger.
    Null domains (inputs without a URL, e.g. local files) are reported as `domain: None` and
    under `domains.without_url`.
    """
    out = location(out)
    manifest = Manifest.read(out)
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        entry = manifest.kinds.get(kind)
        if entry is None:
            continue
        shards = entry.shards
        withdrawn = entry.withdrawn_keys()
        kinds[kind] = {
            "shards": len(shards),
            # samples of the output: the tars' samples less those a retry round withdrew
            "samples": sum(int(s.count) for s in shards) - sum(len(k) for k in withdrawn.values()),
            "withdrawn": sum(len(k) for k in withdrawn.values()),
            "tar_bytes": sum(int(s.bytes) for s in shards),
            "per_shard": [{"name": s.name, "samples": int(s.count) - len(withdrawn.get(s.name, ())),
                           "tar_bytes": int(s.bytes)} for s in shards],
            **_kind_stats(out, kind, shards, withdrawn),
        }
    return {
        "out": str(out),
        "name": manifest.name,
        "recipe_hash": manifest.recipe_hash,
        "code_version": manifest.code_version,
        "totals": {
            "shards": sum(k["shards"] for k in kinds.values()),
            "samples": sum(k["samples"] for k in kinds.values()),
            "tar_bytes": sum(k["tar_bytes"] for k in kinds.values()),
        },
        "kinds": kinds,
        "stages": _stage_times(manifest.stages),
        "fetch_domains": _fetch_domains(manifest.stages),
        **_ledger_stats(out),
    }


def _stage_times(stages: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The manifest's per-stage seconds in recipe order, with rows/s (rows in over wall seconds);
    none for an output written before the manifest recorded them."""
    rows = [{"stage": name, **{k: t.get(k) for k in ("pass", "wall_s", "cpu_s", "rows_in", "rows_out")},
             "rows_per_s": t["rows_in"] / t["wall_s"] if t.get("wall_s") else None,
             "counts": t.get("counts") or {}}  # what the stage counted (faces blurred, addresses replaced)
            for name, t in (stages or {}).items()]
    return sorted(rows, key=lambda r: (stages or {})[r["stage"]].get("order", 0))


def _fetch_domains(stages: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Per stage that recorded them (download: curate/web/netstats.py), its per-domain DNS and
    connection numbers: `rows` ranked as the manifest ranks them (by requests, then DNS
    resolutions, then name; "(other)" last; the manifest's JSON keeps no order), each with
    its DNS cache hit rate (cached / (lookups + cached)) and mean lookup ms (dns_ms / lookups),
    and their `total`."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in (stages or {}).items():
        table = entry.get("domains")
        if not table:
            continue
        rows = [_domain_row(domain, dict(zip(table["columns"], values))) for domain, values in table["rows"].items()]
        rows.sort(key=lambda r: (r["domain"] == "(other)", -r.get("requests", 0),
                                 -(r.get("dns_lookups", 0) + r.get("dns_cached", 0)), r["domain"]))
        total = {c: sum(r[c] for r in rows) for c in table["columns"]}
        out[name] = {"rows": rows, "total": _domain_row("(total)", total)}
    return out


def _domain_row(domain: str, values: dict[str, Any]) -> dict[str, Any]:
    lookups, cached = values.get("dns_lookups", 0), values.get("dns_cached", 0)
    return {"domain": domain, **values,
            "dns_hit_rate": cached / (lookups + cached) if lookups + cached else None,
            "dns_mean_ms": values.get("dns_ms", 0) / lookups if lookups else None}


# the Domains table: (heading, key, width) per column
_DOMAIN_COLUMNS = (("requests", "requests", 9), ("bytes", "bytes", 14), ("lookups", "dns_lookups", 8),
                   ("cached", "dns_cached", 8), ("hit rate", "dns_hit_rate", 8), ("dns err", "dns_errors", 8),
                   ("dns t/o", "dns_timeouts", 8), ("mean ms", "dns_mean_ms", 8), ("opened", "opened", 8),
                   ("reused", "reused", 8), ("conn err", "conn_failures", 8))


def _domain_lines(name: str, d: dict[str, Any], top: int) -> list[str]:
    """The Domains table of one stage: its `top` domains by requests, "(other)", the total."""
    named = [r for r in d["rows"] if r["domain"] != "(other)"]
    other = [r for r in d["rows"] if r["domain"] == "(other)"]
    shown = named[:top]
    lines = [f"Domains ({name}: DNS and connections; {len(shown)} of the {len(named)} the manifest names, "
             "by requests)",
             f"  {'domain':<32}" + "".join(f" {h:>{w}}" for h, _, w in _DOMAIN_COLUMNS)]
    for r in [*shown, *other, d["total"]]:
        cells = [_domain_cell(k, r.get(k, 0)) for _, k, _ in _DOMAIN_COLUMNS]
        lines.append(f"  {r['domain'][:32]:<32}" + "".join(f" {c:>{w}}" for c, (_, _, w) in zip(cells, _DOMAIN_COLUMNS)))
    if len(named) > top:
        lines.append(f"  ({len(named) - top:,} more domains not shown: --top-domains N)")
    return lines


def _domain_cell(key: str, v: Any) -> str:
    if key == "dns_hit_rate":
        return _pct(v)
    if key == "dns_mean_ms":
        return "-" if v is None else f"{v:,.1f}"
    return _num(v)


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.3f}"
    return f"{int(v):,}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _dist_lines(name: str, d: dict[str, Any]) -> list[str]:
    cols = ["min", *(f"p{p}" for p in PERCENTILES), "max"]
    head = f"  {name:<18} n={d['count']:,} mean={_num(d['mean'])}  " + "  ".join(f"{c}={_num(d[c])}" for c in cols)
    hist = "  ".join(f"{h['bucket']}:{h['count']:,}" for h in d["histogram"] if h["count"])
    return [head, f"  {'':<18} {hist}"] if hist else [head]


def format_stats(stats: dict[str, Any], top_domains: int = TOP_FETCH_DOMAINS) -> str:
    """A plain-text report of `compute_stats`'s result, for the terminal; the Domains table (DNS
    and connections) shows `top_domains` domains."""
    lines = [f"output {stats['out']}  (recipe {stats['name']}, hash {stats['recipe_hash']})", ""]
    t = stats["totals"]
    lines.append(f"shards {t['shards']:,}  samples {t['samples']:,}  tar bytes {t['tar_bytes']:,}")
    for kind, k in stats["kinds"].items():
        lines.append(f"  {kind:<5} {k['shards']:,} shards  {k['samples']:,} samples  {k['tar_bytes']:,} bytes")
        for s in k["per_shard"]:
            lines.append(f"        {s['name']:<20} {s['samples']:>10,} samples {s['tar_bytes']:>15,} bytes")
    o = stats["outcomes"]
    lines += ["", f"inputs {o['inputs']:,}  kept {o['kept']:,}  dropped {o['dropped']:,}  keep rate {_pct(o['keep_rate'])}"]
    for label, group in (("kind", o["by_kind"]), ("source", o["by_source"])):
        for name, g in group.items():
            lines.append(f"  {label + ' ' + str(name):<32} inputs {g['inputs']:>10,}  kept {g['kept']:>10,}  "
                         f"dropped {g['dropped']:>10,}  keep {_pct(g['keep_rate'])}")
    lines += ["", "drop reasons (ranked)"]
    for d in stats["drops"]["ranked"]:
        detail = (d["example_detail"] or "")[:80]
        lines.append(f"  {d['count']:>10,} {_pct(d['share_of_dropped']):>7}  {d['stage']}/{d['reason']}"
                     f"  e.g. {d['example_id']}: {detail}")
    if stats.get("stages"):
        lines += ["", f"stage times  {'':<24} {'wall s':>10} {'CPU s':>10} {'rows in':>10} {'rows out':>10} "
                      f"{'rows/s':>10}"]
        for s in stats["stages"]:
            rate = "-" if s["rows_per_s"] is None else f"{s['rows_per_s']:,.1f}"
            counted = ", ".join(f"{k} {v:,}" for k, v in s.get("counts", {}).items())
            lines.append(f"  {s['stage'] + (' (global)' if s['pass'] == 'global' else ''):<35} "
                         f"{s['wall_s']:>10,.3f} {s['cpu_s']:>10,.3f} {s['rows_in']:>10,} {s['rows_out']:>10,} "
                         f"{rate:>10}" + (f"  counted: {counted}" if counted else ""))
    for name, d in (stats.get("fetch_domains") or {}).items():
        lines += ["", *_domain_lines(name, d, top_domains)]
    lines += ["", "attempts"] + _dist_lines("attempts", stats["attempts"])
    for kind, k in stats["kinds"].items():
        lines += ["", f"{kind} samples"]
        for name, d in k.items():
            if isinstance(d, dict) and "histogram" in d:
                lines += _dist_lines(name, d)
        for name, d in k.get("scores", {}).items():
            lines += _dist_lines(name, d)
        for col, title in (("txt_source", "KEY.txt holds"), ("vecap_fallback", "vecap fallback")):
            if col in k.get("recaption", {}):
                lines.append(f"  {title:<18} " + "  ".join(f"{v}:{n:,}" for v, n in k["recaption"][col].items()))
        if k.get("image_formats"):
            lines.append("  image formats      " + "  ".join(f"{f}:{n:,}" for f, n in k["image_formats"].items()))
        if k.get("tokenizers"):
            lines.append(f"  tokens             {k['token_count']['sum']:,} with {', '.join(k['tokenizers'])}")
    dom = stats["domains"]
    lines += ["", f"domains {dom['distinct']:,} distinct; without url: {dom['without_url']['inputs']:,} inputs"]
    for title, key in (("top by kept", "top_kept"), ("top by dropped", "top_dropped")):
        lines.append(f"  {title}")
        for d in dom[key]:
            lines.append(f"    {d['domain'] or '(no url)':<32} kept {d['kept']:>10,}  dropped {d['dropped']:>10,}")
    return "\n".join(lines) + "\n"
