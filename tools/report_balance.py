"""The report's balancing section: for each `metaclip_balance` pass of a run, each metadata list's
entry counts before and after balancing (the manifest's `global.<stage>.summary`), drawn as the
sorted counts on log-log axes with `t` as a line, and its head entries in a table.

MetaCLIP's point, visible here: before, a few head entries hold most pairs and the curve falls
steeply; after, every entry over `t` is cut to about `t` (a flat head at `t`) and the tail is as
it was.
"""

from __future__ import annotations

import html
import math
from typing import Any

BEFORE, AFTER, LIMIT = "#2f6db5", "#d9822b", "#c0392b"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def loglog_chart(curves: dict[str, list[list[int]]], colors: dict[str, str], *, t: int, title: str,
                 width: int = 460, height: int = 200) -> str:
    """Lines of [rank, count] points on log-log axes (rank right, count up) and `t` dashed."""
    points = [p for curve in curves.values() for p in curve]
    if not points:
        return ""
    pad_l, pad_r, pad_b, pad_t = 46, 10, 30, 10
    top_rank = max(max(r for r, _ in points), 10)
    top_count = max(max(c for _, c in points), t, 10)
    iw, ih = width - pad_l - pad_r, height - pad_b - pad_t

    def x(rank: float) -> float:
        return pad_l + iw * math.log10(max(rank, 1)) / math.log10(top_rank)

    def y(count: float) -> float:
        return pad_t + ih * (1 - math.log10(max(count, 1)) / math.log10(top_count))

    parts = [f'<svg class="chart loglog" role="img" aria-label="{_esc(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{pad_l}" y1="{pad_t + ih}" x2="{width - pad_r}" y2="{pad_t + ih}" stroke="#99a"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + ih}" stroke="#99a"/>']
    for decade in range(int(math.log10(top_count)) + 1):
        parts.append(f'<text class="tick" x="{pad_l - 4}" y="{y(10 ** decade) + 3:.1f}" font-size="9.5" '
                     f'text-anchor="end" fill="#556">{10 ** decade:,}</text>')
    for decade in range(int(math.log10(top_rank)) + 1):
        parts.append(f'<text class="tick" x="{x(10 ** decade):.1f}" y="{height - 14}" font-size="9.5" '
                     f'text-anchor="middle" fill="#556">{10 ** decade:,}</text>')
    parts.append(f'<text x="{width - pad_r}" y="{height - 2}" font-size="9.5" text-anchor="end" fill="#556">'
                 f'entry rank</text>')
    parts.append(f'<line class="threshold" x1="{pad_l}" y1="{y(t):.1f}" x2="{width - pad_r}" y2="{y(t):.1f}" '
                 f'stroke="{LIMIT}" stroke-dasharray="4 2"><title>t = {t:,}</title></line>')
    for name, curve in curves.items():
        if curve:
            path = " ".join(f"{x(r):.1f},{y(c):.1f}" for r, c in curve)
            parts.append(f'<polyline class="{_esc(name)}" points="{path}" fill="none" stroke="{colors[name]}" '
                         f'stroke-width="2"><title>{_esc(name)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def balance_section(global_stages: dict[str, dict[str, Any]] | None, recipe: dict[str, Any] | None) -> str:
    """The section's HTML; empty when no balancing pass ran."""
    kinds = {s.get("name") or s.get("kind"): s.get("kind") for s in (recipe or {}).get("stages", [])}
    out = []
    for stage, record in sorted((global_stages or {}).items()):
        summary = record.get("summary") or {}
        if kinds.get(stage) != "metaclip_balance" or "lists" not in summary:
            continue
        out.append(f"<h3>{_esc(stage)}: {summary['kept']:,} of {summary['rows']:,} pairs kept "
                   f"({summary['matched']:,} matched an entry)</h3><div class=charts>")
        for name, lst in summary["lists"].items():
            chart = loglog_chart({"before": lst["curve_before"], "after": lst["curve_after"]},
                                 {"before": BEFORE, "after": AFTER}, t=lst["t"], title=f"{stage} {name}")
            caption = (f"{_esc(name)} ({_esc(lst['path'])}): pairs per entry, sorted, before "
                       f"<span style='color:{BEFORE}'>&#9632;</span> and after "
                       f"<span style='color:{AFTER}'>&#9632;</span> balancing; t = {lst['t']:,}; "
                       f"{lst['entries_matched']:,} of {lst['entries']:,} entries matched, "
                       f"{lst['entries_over_t']:,} over t")
            head = "".join(f"<tr><td>{_esc(h['entry'])}</td><td class=n>{h['before']:,}</td>"
                           f"<td class=n>{h['after']:,}</td></tr>" for h in lst["head"][:10])
            out.append(f"<figure><figcaption>{caption}</figcaption>{chart}<table><tr><th>entry</th>"
                       f"<th class=n>before</th><th class=n>after</th></tr>{head}</table></figure>")
        out.append("</div>")
    return "".join(out)


__all__ = ["balance_section", "loglog_chart"]
