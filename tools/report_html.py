"""The HTML of `mm1 report`: `render` turns `Run`s (what the page shows of one output, which
tools/report.py collects) into one page, no script, inline CSS and SVG, thumbnails as data: URIs,
and a Content-Security-Policy that allows nothing else, so the page can make no network request
whatever a caption or a URL in the data says. Every string from the data is escaped.

A number that `mm1 stats` also reports is rendered as `<span data-stat="PATH" data-value="V">`,
PATH being its place in `compute_stats`' dict (`outcomes.kept`, `kinds.pair.width.p50`,
`drops.ranked.0.count`, ...) and V its exact value, so a test can hold the page against the stats.
With two runs, each column carries `data-run="0"` or `"1"`.
"""

from __future__ import annotations

import difflib
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.contract import Manifest
from tools.report_balance import balance_section

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'; base-uri 'none'; form-action 'none'"
COLORS = ("#2f6db5", "#d9822b")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .sub{color:#b8c0cc;font-size:12px}nav{padding:6px 24px;background:#e9ecf1;position:sticky;top:0}
nav a{margin-right:14px;color:#2f6db5;text-decoration:none}main{padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:16px 0;padding:12px 16px}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:14px;margin:14px 0 6px;color:#404a5c}
table{border-collapse:collapse;margin:4px 0 10px}td,th{padding:3px 10px;border-bottom:1px solid #eceef2;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dde1e7;border-radius:6px;padding:8px 12px;min-width:120px;background:#fafbfc}
.card b{display:block;font-size:18px}.cols{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.charts{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0}figcaption{font-size:12px;color:#556}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
.sample{border:1px solid #dde1e7;border-radius:6px;padding:8px;background:#fcfcfd;font-size:12.5px}
.sample img{max-width:100%;display:block;margin:0 auto 6px}.cap{margin:3px 0}.cap i{color:#667;font-style:normal;font-weight:600}
.doc p{margin:4px 0}.doc .img{display:flex;gap:8px;align-items:flex-start}.doc .img img{max-width:120px}
.muted{color:#778}.bad{color:#a33}details{margin:3px 0}summary{cursor:pointer}code{font-size:12px}
.delta-up{color:#1a7f37}.delta-down{color:#a33}
.recipe-diff .added{color:#1a7f37}.recipe-diff .removed{color:#a33}
"""


@dataclass
class Run:
    """Everything one output's report shows."""

    out: Path
    stats: dict[str, Any]  # tools.stats.compute_stats
    manifest: Manifest
    stage_order: list[str]
    funnel: dict[str, list[dict[str, Any]]]  # kind -> [{stage, dropped, remaining}]
    examples: dict[str, list[dict[str, Any]]]  # "stage/reason" -> ledger rows
    dup_groups: dict[str, dict[int, int]]  # stage -> {group size: groups}
    languages: dict[str, dict[str, int]]  # kind -> {language: samples}
    scores: dict[str, dict[str, Any]]  # "kind/column" -> {edges, counts, thresholds}
    mixture: list[dict[str, Any]]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return esc(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def stat(path: str, value: Any, text: str | None = None) -> str:
    """A number `mm1 stats` also reports, marked with its place in the stats dict."""
    return (f'<span data-stat="{esc(path)}" data-value="{esc(json.dumps(value))}">'
            f"{text if text is not None else fmt(value)}</span>")


# ---------------------------------------------------------------------------------------------
# SVG charts


LABEL_CHAR_PX = 6.2  # a generous width of one character of the 9.5-10 px labels (digits, sans-serif)


def clip(label: str, px: float) -> str:
    """`label` cut to fit `px` (with an ellipsis); the full text stays in the element's title."""
    room = max(int(px / LABEL_CHAR_PX), 1)
    return label if len(label) <= room else label[: max(room - 1, 1)] + "…"


def bar_chart(labels: list[str], values: list[float], *, title: str, width: int = 420, height: int = 150,
              color: str = COLORS[0]) -> str:
    """Vertical bars, one per label (a histogram's buckets): a label under every `step`-th bar,
    `step` chosen so that labels never overlap; each bar's tooltip names its bucket."""
    n = max(len(labels), 1)
    top = max(values or [0]) or 1
    pad_l, pad_b, pad_t = 34, 34, 8
    w = (width - pad_l - 6) / n
    longest = max((len(label) for label in labels), default=1)
    step = max(1, math.ceil((min(longest, 14) * LABEL_CHAR_PX + 6) / w))
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    ih = height - pad_b - pad_t
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + ih}" x2="{width - 4}" y2="{pad_t + ih}" stroke="#99a"/>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" font-size="10" text-anchor="end" fill="#556">{fmt(top)}</text>')
    for i, (label, v) in enumerate(zip(labels, values)):
        h = ih * (v / top)
        x = pad_l + i * w
        parts.append(f'<rect x="{x + 1:.1f}" y="{pad_t + ih - h:.1f}" width="{max(w - 2, 1):.1f}" height="{h:.1f}" '
                     f'fill="{color}"><title>{esc(label)}: {fmt(v)}</title></rect>')
        if i % step == 0:
            parts.append(f'<text class="tick" x="{x + w / 2:.1f}" y="{height - pad_b + 12}" font-size="9.5" '
                         f'text-anchor="middle" fill="#445"><title>{esc(label)}</title>'
                         f'{esc(clip(label, step * w - 6))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def hbar_chart(labels: list[str], values: list[float], *, title: str, width: int = 420, gutter: int = 130,
               color: str = COLORS[0], value_text: Any = None) -> str:
    """Horizontal bars, one row per category (stage names, languages): the label left of its bar,
    cut to the gutter (the full name in its tooltip), the value at the bar's end."""
    row, pad_t = 16, 4
    height = pad_t * 2 + row * max(len(labels), 1)
    top = max(values or [0]) or 1
    iw = width - gutter - 60
    show = value_text or fmt
    parts = [f'<svg class="chart hbar" role="img" aria-label="{esc(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{gutter}" y1="{pad_t}" x2="{gutter}" y2="{height - pad_t}" stroke="#99a"/>']
    for i, (label, v) in enumerate(zip(labels, values)):
        y = pad_t + i * row
        bw = iw * (v / top)
        parts.append(f'<text class="tick" x="{gutter - 4}" y="{y + 12}" font-size="10" text-anchor="end" fill="#445">'
                     f'<title>{esc(label)}</title>{esc(clip(label, gutter - 8))}</text>'
                     f'<rect x="{gutter}" y="{y + 2}" width="{max(bw, 0.5):.1f}" height="{row - 4}" fill="{color}">'
                     f'<title>{esc(label)}: {show(v)}</title></rect>'
                     f'<text x="{gutter + bw + 4:.1f}" y="{y + 12}" font-size="10" fill="#556">{show(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(edges: list[float], counts: list[int], *, title: str, thresholds: list[dict[str, Any]],
                    dropped: list[int] | None = None, width: int = 460, height: int = 170) -> str:
    """A numeric histogram with the recipe's cuts drawn as vertical lines; `dropped` counts over
    the same bins are stacked on the kept ones (class `dropped`)."""
    pad_l, pad_r, pad_b, pad_t = 34, 8, 30, 8
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    dropped = dropped or [0] * len(counts)
    top = max((c + d for c, d in zip(counts, dropped)), default=0) or 1
    ih, iw = height - pad_b - pad_t, width - pad_l - pad_r

    def x(v: float) -> float:
        return pad_l + iw * (v - lo) / span

    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{pad_l}" y1="{pad_t + ih}" x2="{width - pad_r}" y2="{pad_t + ih}" stroke="#99a"/>',
             f'<text x="{pad_l - 4}" y="{pad_t + 8}" font-size="10" text-anchor="end" fill="#556">{top:,}</text>']
    for a, b, c, d in zip(edges, edges[1:], counts, dropped):
        h, hd = ih * c / top, ih * d / top
        bw = max(x(b) - x(a) - 0.5, 0.5)
        parts.append(f'<rect class="kept" x="{x(a):.1f}" y="{pad_t + ih - h:.1f}" width="{bw:.1f}" '
                     f'height="{h:.1f}" fill="{COLORS[0]}"><title>[{a:.4g}, {b:.4g}): {c:,} kept</title></rect>')
        if d:
            parts.append(f'<rect class="dropped" x="{x(a):.1f}" y="{pad_t + ih - h - hd:.1f}" width="{bw:.1f}" '
                         f'height="{hd:.1f}" fill="{COLORS[1]}"><title>[{a:.4g}, {b:.4g}): {d:,} dropped</title></rect>')
    for v, anchor in ((lo, "start"), ((lo + hi) / 2, "middle"), (hi, "end")):
        parts.append(f'<text class="tick" x="{x(v):.1f}" y="{height - 12}" font-size="10" text-anchor="{anchor}" '
                     f'fill="#445">{v:.3g}</text>')
    for t in thresholds:
        parts.append(f'<line class="threshold" x1="{x(t["value"]):.1f}" y1="{pad_t}" x2="{x(t["value"]):.1f}" '
                     f'y2="{pad_t + ih}" stroke="#c0392b" stroke-width="2" stroke-dasharray="4 2">'
                     f'<title>{esc(t["label"])}</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def figure(chart: str, caption: str) -> str:
    return f"<figure><figcaption>{caption}</figcaption>{chart}</figure>"


# ---------------------------------------------------------------------------------------------
# sections of one run


def overview(run: Run) -> str:
    s, o = run.stats, run.stats["outcomes"]
    cards = [("inputs", stat("outcomes.inputs", o["inputs"])), ("kept", stat("outcomes.kept", o["kept"])),
             ("dropped", stat("outcomes.dropped", o["dropped"])),
             ("keep rate", stat("outcomes.keep_rate", o["keep_rate"], pct(o["keep_rate"]))),
             ("shards", stat("totals.shards", s["totals"]["shards"])),
             ("tar bytes", stat("totals.tar_bytes", s["totals"]["tar_bytes"]))]
    for kind, k in s["kinds"].items():
        cards.append((f"{kind} samples", stat(f"kinds.{kind}.samples", k["samples"])))
    body = "".join(f'<div class="card"><span class="muted">{esc(t)}</span><b>{v}</b></div>' for t, v in cards)
    return f'<div class="cards">{body}</div>'


def funnel(run: Run) -> str:
    o = run.stats["outcomes"]
    out = ["<h3>Inputs per source and kind</h3><table><tr><th></th><th class=n>inputs</th><th class=n>kept</th>"
           "<th class=n>dropped</th><th class=n>keep rate</th></tr>"]
    for group in ("by_kind", "by_source"):
        for name, g in o[group].items():
            p = f"outcomes.{group}.{name}"
            out.append(f"<tr><td>{esc(group[3:])} <b>{esc(name)}</b></td><td class=n>{stat(p + '.inputs', g['inputs'])}</td>"
                       f"<td class=n>{stat(p + '.kept', g['kept'])}</td><td class=n>{stat(p + '.dropped', g['dropped'])}</td>"
                       f"<td class=n>{stat(p + '.keep_rate', g['keep_rate'], pct(g['keep_rate']))}</td></tr>")
    out.append("</table><h3>Kept and dropped, stage by stage</h3><div class=charts>")
    for kind, rows in run.funnel.items():
        table = [f"<table><tr><th>{esc(kind)}: stage</th><th class=n>dropped</th><th class=n>remaining</th></tr>"]
        for r in rows:
            table.append(f"<tr><td>{esc(r['stage'])}</td><td class=n>{fmt(r['dropped'])}</td>"
                         f"<td class=n>{fmt(r['remaining'])}</td></tr>")
        table.append("</table>")
        out.append(figure(hbar_chart([r["stage"] for r in rows], [r["remaining"] for r in rows],
                                     title=f"{kind} remaining after each stage", width=360), "".join(table)))
    out.append("</div><h3>Drop codes, ranked</h3><table><tr><th>stage / code</th><th class=n>count</th>"
               "<th class=n>share of dropped</th><th>examples</th></tr>")
    for i, d in enumerate(run.stats["drops"]["ranked"]):
        code = f"{d['stage']}/{d['reason']}"
        ex = "".join(f"<li><code>{esc(e['id'])}</code> {esc(e['url'] or '')} <span class=muted>{esc(e['drop_detail'])}</span></li>"
                     for e in run.examples.get(code, []))
        out.append(f"<tr><td>{esc(code)}</td><td class=n>{stat(f'drops.ranked.{i}.count', d['count'])}</td>"
                   f"<td class=n>{pct(d['share_of_dropped'])}</td><td><details><summary>{esc(d['example_id'])}</summary>"
                   f"<ul>{ex}</ul></details></td></tr>")
    out.append("</table>")
    return "".join(out)


def stage_times(run: Run) -> str:
    """Each stage's wall seconds (a bar per stage, recipe order) and its CPU seconds, rows in and
    out and rows/s (`mm1 stats`' `stages`); nothing for an output whose manifest records none."""
    rows = run.stats.get("stages") or []
    if not rows:
        return ""
    labels = [r["stage"] + (" (global)" if r["pass"] == "global" else "") for r in rows]
    out = [figure(hbar_chart(labels, [r["wall_s"] for r in rows], title="wall seconds per stage", width=520,
                             gutter=170, value_text=lambda v: f"{v:,.2f} s"),
                  "wall seconds per stage (row stages: summed over partitions; global passes: on the driver)"),
           "<table><tr><th>stage</th><th>pass</th><th class=n>wall s</th><th class=n>CPU s</th>"
           "<th class=n>rows in</th><th class=n>rows out</th><th class=n>rows/s</th><th>counted</th></tr>"]
    for i, r in enumerate(rows):
        p = f"stages.{i}"
        rate = "-" if r["rows_per_s"] is None else stat(p + ".rows_per_s", r["rows_per_s"])
        out.append(f"<tr><td>{esc(r['stage'])}</td><td>{esc(r['pass'])}</td>"
                   f"<td class=n>{stat(p + '.wall_s', r['wall_s'])}</td><td class=n>{stat(p + '.cpu_s', r['cpu_s'])}</td>"
                   f"<td class=n>{stat(p + '.rows_in', r['rows_in'])}</td>"
                   f"<td class=n>{stat(p + '.rows_out', r['rows_out'])}</td><td class=n>{rate}</td>"
                   f"<td>{esc(', '.join(f'{k} {v:,}' for k, v in r.get('counts', {}).items()))}</td></tr>")
    out.append("</table>")
    return "".join(out)


def domains(run: Run) -> str:
    dom = run.stats["domains"]
    seen: dict[str, dict[str, Any]] = {}
    for d in dom["top_kept"] + dom["top_dropped"]:
        seen.setdefault(str(d["domain"]), d)
    rows = sorted(seen.values(), key=lambda d: (-d["inputs"], str(d["domain"])))
    out = [f"<p>{stat('domains.distinct', dom['distinct'])} distinct domains; inputs without a URL: "
           f"{stat('domains.without_url.inputs', dom['without_url']['inputs'])}.</p>",
           "<table><tr><th>domain</th><th class=n>inputs</th><th class=n>kept</th><th class=n>dropped</th>"
           "<th class=n>success</th><th></th></tr>"]
    for d in rows:
        rate = d["keep_rate"] or 0.0
        out.append(f"<tr><td>{esc(d['domain'] or '(no url)')}</td><td class=n>{fmt(d['inputs'])}</td>"
                   f"<td class=n>{fmt(d['kept'])}</td><td class=n>{fmt(d['dropped'])}</td><td class=n>{pct(d['keep_rate'])}</td>"
                   f'<td><svg width="120" height="10"><rect width="120" height="10" fill="#eceef2"/>'
                   f'<rect width="{120 * rate:.1f}" height="10" fill="{COLORS[0]}"/></svg></td></tr>')
    out.append("</table>")
    return "".join(out) + fetch_domains(run)


_FETCH_COLUMNS = (("requests", "requests"), ("bytes", "bytes"), ("DNS lookups", "dns_lookups"),
                  ("cached", "dns_cached"), ("DNS errors", "dns_errors"), ("DNS timeouts", "dns_timeouts"),
                  ("opened", "opened"), ("reused", "reused"), ("conn. errors", "conn_failures"))


def fetch_domains(run: Run) -> str:
    """Each download stage's DNS and connections per domain (`mm1 stats`' Domains table, its
    first 20 domains, "(other)" and the total); nothing for an output that recorded none."""
    out = []
    for name, d in (run.stats.get("fetch_domains") or {}).items():
        head = "".join(f"<th class=n>{h}</th>" for h, _ in _FETCH_COLUMNS)
        out.append(f"<p>DNS and connections of {esc(name)}, by requests:</p><table><tr><th>domain</th>{head}"
                   "<th class=n>DNS hit rate</th><th class=n>mean DNS ms</th></tr>")
        rows = [(f"fetch_domains.{name}.rows.{i}", r) for i, r in enumerate(d["rows"])
                if i < 20 or r["domain"] == "(other)"] + [(f"fetch_domains.{name}.total", d["total"])]
        for path, r in rows:
            cells = "".join(f"<td class=n>{stat(f'{path}.{k}', r[k])}</td>" for _, k in _FETCH_COLUMNS)
            mean = "-" if r["dns_mean_ms"] is None else f"{r['dns_mean_ms']:,.1f}"
            out.append(f"<tr><td>{esc(r['domain'])}</td>{cells}<td class=n>{pct(r['dns_hit_rate'])}</td>"
                       f"<td class=n>{mean}</td></tr>")
        out.append("</table>")
    return "".join(out)


_DISTS = {"pair": ["width", "height", "aspect_ratio", "image_bytes", "caption_words", "token_count", "synthetic_words"],
          "doc": ["n_images", "n_segments", "text_chars", "token_count", "segments_dropped", "image_bytes"],
          "text": ["text_chars", "token_count"]}


def distributions(run: Run) -> str:
    out = []
    for kind, k in run.stats["kinds"].items():
        charts = []
        for name in _DISTS.get(kind, []):
            d = k.get(name)
            if not d or not d.get("count"):
                continue
            p = f"kinds.{kind}.{name}"
            caption = (f"<b>{esc(name)}</b> n={stat(p + '.count', d['count'])} mean={stat(p + '.mean', d['mean'])} "
                       f"p50={stat(p + '.p50', d['p50'])} max={stat(p + '.max', d['max'])}")
            charts.append(figure(bar_chart([h["bucket"] for h in d["histogram"]], [h["count"] for h in d["histogram"]],
                                           title=f"{kind} {name}"), caption))
        for key, h in run.scores.items():
            skind, name = key.split("/", 1)
            if skind != kind:
                continue
            cuts = "; ".join(esc(t["label"]) for t in h["thresholds"]) or "no cut on this score"
            chart = histogram_chart(h["edges"], h["counts"], title=f"{kind} {name}", thresholds=h["thresholds"],
                                    dropped=h["dropped"])
            gone = (f', <span style="color:{COLORS[1]}">dropped</span> n={fmt(h["n_dropped"])}'
                    if h["thresholds"] or h["n_dropped"] else "")  # no rule on the column: nothing it dropped
            charts.append(figure(chart, f'<b>{esc(name)}</b> <span style="color:{COLORS[0]}">kept</span> '
                                        f"n={fmt(h['n'])}{gone}, red: {cuts}"))
        if kind in run.languages:
            langs = list(run.languages[kind].items())[:12]
            charts.append(figure(hbar_chart([a for a, _ in langs], [b for _, b in langs], title=f"{kind} languages"),
                                 f"<b>languages</b> ({esc(kind)})"))
        recap = k.get("recaption")
        if recap:
            for col, counts in recap.items():
                charts.append(figure(hbar_chart(list(counts), list(counts.values()), title=f"{kind} {col}"),
                                     f"<b>{esc(col)}</b>"))
        out.append(f"<h3>{esc(kind)}</h3><div class=charts>{''.join(charts)}</div>")
    if run.dup_groups:
        charts = [figure(bar_chart([str(s) for s in g], list(g.values()), title=f"{stage} group sizes"),
                         f"<b>{esc(stage)}</b>: duplicate groups by size (kept + dropped copies)")
                  for stage, g in run.dup_groups.items()]
        out.append(f"<h3>Duplicate group sizes</h3><div class=charts>{''.join(charts)}</div>")
    return "".join(out)


def mixture_section(run: Run) -> str:
    """The mixture against its target weights: only for an output holding more than one kind."""
    rows = run.mixture
    if sum(1 for r in rows if r["samples"]) < 2:
        return ""
    out = ["<p>What one pass over this output gives the trainer's packer (text tokens from the sidecars, "
           "an end token per sample, image tokens per image; sequences at the packing bound), against "
           "the mixture weights. <i>passes</i>: passes over each kind while the scarcest kind, relative to "
           "its weight, is seen once.</p><table><tr><th>kind</th><th class=n>samples</th><th class=n>images</th>"
           "<th class=n>tokens</th><th class=n>sequences</th><th class=n>natural share</th><th class=n>target</th>"
           "<th class=n>passes</th></tr>"]
    for r in rows:
        samples = stat(f"kinds.{r['kind']}.samples", r["samples"])
        out.append(f"<tr><td>{esc(r['kind'])}</td><td class=n>{samples}</td>"
                   f"<td class=n>{fmt(r['images'])}</td><td class=n>{fmt(r['tokens'])}</td><td class=n>{fmt(r['sequences'])}</td>"
                   f"<td class=n>{pct(r['natural_share'])}</td><td class=n>{pct(r['weight'])}</td>"
                   f"<td class=n>{r['passes']:.2f}</td></tr>")
    out.append("</table>")
    labels = [f"{r['kind']} natural" for r in rows] + [f"{r['kind']} target" for r in rows]
    out.append(figure(hbar_chart(labels, [r["natural_share"] for r in rows] + [r["weight"] for r in rows],
                                 title="mixture: natural share vs target", width=520, value_text=pct),
                      "sequence shares: natural vs target"))
    return "".join(out)


def _caption(label: str, text: Any) -> str:
    return f'<div class="cap"><i>{esc(label)}</i> {esc(text) if text else "<span class=muted>—</span>"}</div>'


def samples_section(run: Run) -> str:
    out = []
    for kind, items in run.samples.items():
        cards = []
        for r in items:
            head = f'<div class="muted"><code>{esc(r["key"])}</code> {esc(r["id"])}</div>'
            if kind == "pair":
                img = f'<img alt="" src="{esc(r["thumb"])}">' if r.get("thumb") else '<div class="bad">no image</div>'
                body = img + _caption("alt-text", r.get("caption"))
                if "caption_synthetic" in r:
                    body += _caption("synthetic", r.get("caption_synthetic")) + _caption("VeCap", r.get("caption_vecap"))
            elif kind == "doc":
                segs = []
                for seg in r["segments"]:
                    if seg["type"] == "image":
                        img = f'<img alt="" src="{esc(seg["thumb"])}">' if seg.get("thumb") else '<span class=bad>no image</span>'
                        segs.append(f'<div class="img">{img}<span class="muted">{esc(seg["alt"])}</span></div>')
                    else:
                        segs.append(f"<p>{esc(seg['text'])}</p>")
                body = f'<div class="doc"><b>{esc(r.get("title") or "")}</b>{"".join(segs)}</div>'
            else:
                body = f"<p>{esc(r['text'])}</p>"
            cards.append(f'<div class="sample">{head}{body}</div>')
        out.append(f"<h3>{esc(kind)}: {len(items)} random kept samples</h3><div class=grid>{''.join(cards)}</div>")
    out.append("<h3>Dropped samples, by code</h3>")
    for code, examples in sorted(run.examples.items()):
        items = "".join(f"<li><code>{esc(e['id'])}</code> <span class=muted>{esc(e['kind'])}</span> "
                        f"{esc(e['url'] or '')}<br><span class=bad>{esc(e['drop_detail'])}</span></li>" for e in examples)
        out.append(f"<details><summary>{esc(code)} ({len(examples)} shown)</summary><ul>{items}</ul></details>")
    return "".join(out)


def balancing(run: Run) -> str:
    """MetaCLIP balancing passes: entry counts before and after (tools/report_balance.py)."""
    return balance_section(run.manifest.global_stages, run.manifest.recipe)


SECTIONS = (("overview", "Overview", overview), ("funnel", "Funnel", funnel), ("stages", "Stage times", stage_times),
            ("domains", "Domains", domains), ("balancing", "Balancing", balancing),
            ("distributions", "Distributions", distributions), ("mixture", "Mixture", mixture_section),
            ("samples", "Samples", samples_section))


# ---------------------------------------------------------------------------------------------
# comparison and the page


def changes(a: Run, b: Run) -> str:
    rows = [("inputs", a.stats["outcomes"]["inputs"], b.stats["outcomes"]["inputs"]),
            ("kept", a.stats["outcomes"]["kept"], b.stats["outcomes"]["kept"]),
            ("dropped", a.stats["outcomes"]["dropped"], b.stats["outcomes"]["dropped"])]
    for kind in sorted(set(a.stats["kinds"]) | set(b.stats["kinds"])):
        rows.append((f"{kind} samples", a.stats["kinds"].get(kind, {}).get("samples", 0),
                     b.stats["kinds"].get(kind, {}).get("samples", 0)))
    codes = {f"{d['stage']}/{d['reason']}": d["count"] for d in a.stats["drops"]["ranked"]}
    codes_b = {f"{d['stage']}/{d['reason']}": d["count"] for d in b.stats["drops"]["ranked"]}
    for code in sorted(set(codes) | set(codes_b)):
        rows.append((code, codes.get(code, 0), codes_b.get(code, 0)))
    for key in sorted(set(a.scores) | set(b.scores)):
        ta = [t["value"] for t in a.scores.get(key, {}).get("thresholds", [])]
        tb = [t["value"] for t in b.scores.get(key, {}).get("thresholds", [])]
        if ta or tb:
            rows.append((f"{key} cut", ", ".join(f"{v:.4g}" for v in ta) or "-", ", ".join(f"{v:.4g}" for v in tb) or "-"))
    out = ["<table><tr><th></th><th class=n>A</th><th class=n>B</th><th class=n>B − A</th></tr>"]
    for name, va, vb in rows:
        delta = ""
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va != vb:
            cls = "delta-up" if vb > va else "delta-down"
            delta = f'<span class="{cls}">{vb - va:+,}</span>'
        out.append(f"<tr><td>{esc(name)}</td><td class=n>{fmt(va)}</td><td class=n>{fmt(vb)}</td><td class=n>{delta}</td></tr>")
    out.append("</table>")
    recipe_a, recipe_b = a.manifest.recipe or {}, b.manifest.recipe or {}
    if recipe_a != recipe_b:
        diff = recipe_changes(recipe_a, recipe_b)
        items = "".join(f'<li class="{esc(d["status"])}"><code>{esc(d["where"])}</code> {esc(d["what"])}</li>' for d in diff)
        out.append(f"<details open><summary>recipe differences ({len(diff)})</summary>"
                   f'<ul class="recipe-diff">{items}</ul></details>')
    return "".join(out)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to the leaves of a JSON value (list items by position)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out or {prefix: value}


def option_changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted option, value in a, value in b) for every option that differs (None: absent)."""
    fa, fb = _flat(a), _flat(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb), key=str) if fa.get(k) != fb.get(k)]


def align_stages(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[str, dict | None, dict | None]]:
    """The two lists of stages (or sources) matched by identity, kind and name, in order (the
    longest common subsequence): ("same" | "changed", sa, sb) for a matched pair, ("removed", sa,
    None) and ("added", None, sb) for the others. Inserting a stage leaves the later ones matched."""
    ident = [[(s.get("kind"), s.get("name") or s.get("kind")) for s in side] for side in (a, b)]
    out: list[tuple[str, dict | None, dict | None]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, *ident, autojunk=False).get_opcodes():
        if op == "equal":
            out += [("same" if a[i] == b[j] else "changed", a[i], b[j]) for i, j in zip(range(i1, i2), range(j1, j2))]
            continue
        out += [("removed", a[i], None) for i in range(i1, i2)]
        out += [("added", None, b[j]) for j in range(j1, j2)]
    return out


def recipe_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, str]]:
    """What differs between two recipes, each entry {status, where, what}: stages and sources
    aligned by kind and name (`align_stages`), a matched one's changed options listed; any other
    setting by its dotted path."""
    out = []
    for part in ("sources", "stages"):
        for status, sa, sb in align_stages(a.get(part) or [], b.get(part) or []):
            if status == "same":
                continue
            s = sa if sb is None else sb
            where = f"{part[:-1]} {s.get('name') or s.get('kind')}" + (f" ({s.get('kind')})" if s.get("name") else "")
            if status == "changed":
                what = "; ".join(f"{k}: {json.dumps(va)} → {json.dumps(vb)}" for k, va, vb in option_changes(sa, sb))
            else:
                what = f"{status}: " + json.dumps({k: v for k, v in s.items() if k != "kind" and v is not None},
                                                  sort_keys=True)
            out.append({"status": status, "where": where, "what": what})
    rest_a = {k: v for k, v in a.items() if k not in ("sources", "stages")}
    rest_b = {k: v for k, v in b.items() if k not in ("sources", "stages")}
    for k, va, vb in option_changes(rest_a, rest_b):
        out.append({"status": "changed", "where": k, "what": f"{json.dumps(va)} → {json.dumps(vb)}"})
    return out


def render(runs: list[Run]) -> str:
    title = " vs ".join(esc(r.stats.get("name") or r.out.name) for r in runs)
    sub = " | ".join(f"{esc(r.out)} (recipe {esc(r.stats.get('recipe_hash'))}, code {esc(r.stats.get('code_version'))})"
                     for r in runs)
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name, _ in SECTIONS)
    body = []
    if len(runs) == 2:
        body.append(f'<section id="changes"><h2>What changed (A → B)</h2>{changes(*runs)}</section>')
        nav = '<a href="#changes">Changes</a>' + nav
    for sid, name, fn in SECTIONS:
        parts = [fn(r) for r in runs]
        if not any(parts):  # a section with nothing to show (the mixture of a one-kind output)
            nav = nav.replace(f'<a href="#{sid}">{esc(name)}</a>', "")
            continue
        if len(runs) == 1:
            body.append(f'<section id="{sid}" data-run="0"><h2>{esc(name)}</h2>{parts[0]}</section>')
        else:
            cols = "".join(f'<div data-run="{i}"><h3>{"AB"[i]}: {esc(r.out.name)}</h3>{part}</div>'
                           for i, (r, part) in enumerate(zip(runs, parts)))
            body.append(f'<section id="{sid}"><h2>{esc(name)}</h2><div class="cols">{cols}</div></section>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>mm1 report: {title}</title><style>{CSS}</style></head><body>"
            f"<header><h1>mm1 report: {title}</h1><div class=sub>{sub}</div></header>"
            f"<nav>{nav}</nav><main>{''.join(body)}</main></body></html>\n")


__all__ = ["Run", "align_stages", "recipe_changes", "render"]
