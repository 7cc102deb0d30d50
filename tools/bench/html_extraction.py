"""HTML extraction throughput: the html_extract stage, as the pipeline runs it, next to a plain
trafilatura loop and a plain resiliparse loop, on the same pages, in one run.

Pages: `--pages` realistic article pages built from real English prose, the long help texts
CPython ships in `pydoc_data.topics` (79 topics, about 465k characters): a head with a title,
meta tags, a script and a style; a header and a nav bar of links; the article (an h1, sections
with h2 headings, paragraphs with inline links, code and bold, `pre` blocks for the indented
code, 1-4 images with relative URLs and alt texts); a related-links sidebar, a comments section
and a footer. Seeded: the same pages on every run.

What is timed (wall clock, one process each, after set-up):
- ours: `HtmlExtract.process` on Arrow batches of `--batch-size` doc rows (bytes in; segments,
  title and language out), with `processes=1`: the parsing runs in the stage's one sandboxed
  child, the calling thread waits on it, as in a pipeline task. The child's CPU time is read
  from /proc and reported with the parent's.
- trafilatura: `trafilatura.extract(page_bytes, url=..., include_images=True)` per page (it
  decodes, parses with lxml, and extracts the main text as plain text).
- resiliparse: `detect_encoding` + `HTMLTree.parse_from_bytes` + `extract_plain_text(tree,
  main_content=True, alt_texts=True)` per page (C++ parser, plain text out).

The three outputs are not the same thing (ours keeps reading order with image segments; the
others return one text): the extracted character counts are reported next to the rates.

    python -m tools.bench.html_extraction [--pages 3000] [--batch-size 256] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import html as html_lib
import json
import os
import platform
import random
import re
import sys
import time
from importlib.metadata import version
from typing import Any

import pyarrow as pa
from pydoc_data.topics import topics as help_topics

from curate.contract import record_schema
from curate.documents import text_segments
from curate.stages.html_extract import HtmlExtract, HtmlExtractConfig

NAV = ["Home", "Tutorial", "Library", "Language Reference", "Setup", "HOWTOs", "FAQ", "Glossary", "Search", "About"]


def _topics() -> list[tuple[str, str]]:
    return sorted(help_topics.items())


def _blocks(text: str) -> list[tuple[str, str]]:
    """A help text as ("h2" | "p" | "pre", text) blocks: reST-style underlined titles become
    headings, indented runs become `pre`, the rest paragraphs (lines unwrapped)."""
    out: list[tuple[str, str]] = []
    for chunk in re.split(r"\n\s*\n", text):
        lines = chunk.rstrip().split("\n")
        if not chunk.strip():
            continue
        if len(lines) >= 2 and set(lines[-1].strip()) <= set("*=-^~") and lines[-1].strip():
            out.append(("h2", " ".join(line.strip() for line in lines[:-1])))
        elif all(line.startswith("   ") for line in lines if line.strip()):
            out.append(("pre", "\n".join(line[3:] for line in lines)))
        else:
            out.append(("p", " ".join(line.strip() for line in lines)))
    return out


def _inline(text: str, rng: random.Random) -> str:
    """Escape a paragraph and mark a few words up (links, code, bold)."""
    words = html_lib.escape(text).split(" ")
    for _ in range(min(3, len(words) // 12)):
        i = rng.randrange(len(words))
        kind = rng.choice(["a", "code", "b"])
        if kind == "a":
            words[i] = f'<a href="/reference/{rng.randrange(1000)}.html">{words[i]}</a>'
        else:
            words[i] = f"<{kind}>{words[i]}</{kind}>"
    return " ".join(words)


def make_pages(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`n` (url, page bytes) pairs: see the module docstring for their layout."""
    rng = random.Random(seed)
    topics = _topics()
    pages = []
    for i in range(n):
        name, text = topics[rng.randrange(len(topics))]
        blocks = _blocks(text)
        if len(blocks) > 30:  # a slice of a long topic, so pages vary in length
            start = rng.randrange(len(blocks) - 20)
            blocks = blocks[start : start + rng.randint(20, 80)]
        title = html_lib.escape(name.replace("-", " ").title())
        body: list[str] = [f"<h1>{title}</h1>"]
        image_slots = set(rng.sample(range(len(blocks) + 1), k=min(len(blocks) + 1, rng.randint(1, 4))))
        for j, (kind, content) in enumerate(blocks):
            if j in image_slots:
                body.append(f'<figure><img src="../img/{name}-{j}.jpg" alt="Figure {j} of {title}" width="640" '
                            f'height="{rng.choice([360, 480])}"><figcaption>Figure {j}</figcaption></figure>')
            if kind == "h2":
                body.append(f"<h2>{html_lib.escape(content)}</h2>")
            elif kind == "pre":
                body.append(f"<pre><code>{html_lib.escape(content)}</code></pre>")
            else:
                body.append(f"<p>{_inline(content, rng)}</p>")
        nav = "".join(f'<li><a href="/{k.lower()}/">{k}</a></li>' for k in NAV)
        related = "".join(f'<li><a href="/topics/{t}.html">{t}</a></li>' for t, _ in rng.sample(topics, 6))
        page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} &mdash; Python reference {i}</title>
<link rel="stylesheet" href="/static/site.css">
<script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}}
window.siteConfig = {json.dumps({"topics": [t for t, _ in topics[:40]], "version": "3.14", "page": i})};</script>
<style>.sidebar {{ float: right; width: 30%; }} pre {{ background: #eee; }}</style>
</head>
<body>
<header class="site-header"><a class="logo" href="/"><img src="/static/logo.svg" alt="Python docs"></a></header>
<nav class="navbar"><ul>{nav}</ul></nav>
<div id="cookie-banner">This site uses cookies. <button>Accept</button></div>
<main><article class="document">
{chr(10).join(body)}
</article></main>
<aside class="sidebar"><h3>Related topics</h3><ul>{related}</ul></aside>
<section class="comments"><h3>3 comments</h3><p>Great explanation, thanks!</p><p>What about Python 2?</p></section>
<footer class="site-footer"><p>&copy; 2001-2026 Example Foundation. <a href="/license">License</a></p></footer>
<img src="https://stats.example.com/pixel.gif?page={i}" width="1" height="1" alt="">
</body>
</html>
"""
        pages.append((f"https://docs.example.org/topics/{name}-{i}.html", page.encode("utf-8")))
    return pages


def _child_cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def bench_ours(pages: list[tuple[str, bytes]], batch_size: int) -> dict[str, Any]:
    stage = HtmlExtract(HtmlExtractConfig(processes=1))
    stage.ensure_setup()
    schema = record_schema("doc")
    batches = [pa.Table.from_pylist([{"id": f"bench:{k}", "source": "bench", "url": url, "html": page}
                                     for k, (url, page) in enumerate(pages[i : i + batch_size], start=i)],
                                    schema=schema) for i in range(0, len(pages), batch_size)]
    try:
        child_before, cpu_before = _child_cpu_s(stage.pool.pids()), time.process_time()
        start = time.perf_counter()
        outs = [stage.process(batch) for batch in batches]
        seconds = time.perf_counter() - start
        child_cpu = _child_cpu_s(stage.pool.pids()) - child_before
        parent_cpu = time.process_time() - cpu_before
    finally:
        stage.close()
    rows = [row for out in outs for row in out.to_pylist()]
    dropped = sum(1 for row in rows if row["drop_reason"])
    chars = sum(len(t) for row in rows if not row["drop_reason"] for t in text_segments("doc", row))
    images = sum(row["segments"].count('"type":"image"') for row in rows if not row["drop_reason"])
    return {"seconds": seconds, "docs_per_s": len(pages) / seconds, "dropped": dropped, "chars": chars,
            "images": images, "parent_cpu_s": round(parent_cpu, 2), "child_cpu_s": round(child_cpu, 2)}


def bench_trafilatura(pages: list[tuple[str, bytes]]) -> dict[str, Any]:
    import trafilatura  # the peer (bench extra)

    trafilatura.extract(pages[0][1], url=pages[0][0], include_images=True)  # warm-up (lazy imports)
    start, cpu = time.perf_counter(), time.process_time()
    texts = [trafilatura.extract(page, url=url, include_images=True) for url, page in pages]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "docs_per_s": len(pages) / seconds, "cpu_s": round(time.process_time() - cpu, 2),
            "empty": sum(1 for t in texts if not t), "chars": sum(len(t or "") for t in texts)}


def bench_resiliparse(pages: list[tuple[str, bytes]]) -> dict[str, Any]:
    # the peer (bench extra)
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import detect_encoding
    from resiliparse.parse.html import HTMLTree

    def one(page: bytes) -> str:
        tree = HTMLTree.parse_from_bytes(page, detect_encoding(page))
        return extract_plain_text(tree, main_content=True, alt_texts=True)

    one(pages[0][1])
    start, cpu = time.perf_counter(), time.process_time()
    texts = [one(page) for _, page in pages]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "docs_per_s": len(pages) / seconds, "cpu_s": round(time.process_time() - cpu, 2),
            "empty": sum(1 for t in texts if not t), "chars": sum(len(t) for t in texts)}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["docs_per_s"])
    return {**ordered[len(ordered) // 2], "docs_per_s_all": [round(r["docs_per_s"], 1) for r in runs]}


def run(n_pages: int, batch_size: int = 256, seed: int = 0, repeat: int = 1) -> dict[str, Any]:
    """Each extractor `repeat` times, in interleaved rounds (ours, trafilatura, resiliparse, ours,
    ...) so that a change in the machine's load hits all three; the median run of each is kept."""
    pages = make_pages(n_pages, seed)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trafilatura": [], "resiliparse": []}
    for _ in range(repeat):
        runs["ours"].append(bench_ours(pages, batch_size))
        runs["trafilatura"].append(bench_trafilatura(pages))
        runs["resiliparse"].append(bench_resiliparse(pages))
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
                   f"lxml {version('lxml')}, trafilatura {version('trafilatura')}, resiliparse {version('resiliparse')}",
        "pages": n_pages, "batch_size": batch_size, "repeat": repeat,
        "mean_page_bytes": round(sum(len(p) for _, p in pages) / n_pages),
        **{name: _median_run(r) for name, r in runs.items()},
    }
    ours = results["ours"]["docs_per_s"]
    results["ratio"] = {"ours_vs_trafilatura": round(ours / results["trafilatura"]["docs_per_s"], 2),
                        "ours_vs_resiliparse": round(ours / results["resiliparse"]["docs_per_s"], 2)}
    return results


def print_table(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']}")
    print(f"{r['pages']} pages (mean {r['mean_page_bytes']} bytes), one process each; ours: html_extract, "
          f"processes=1, batches of {r['batch_size']}; median of {r['repeat']} interleaved runs")
    print("| extractor | docs/s | seconds | CPU s | extracted chars | ratio ours/it |")
    print("|---|---:|---:|---:|---:|---:|")
    o = r["ours"]
    print(f"| ours (html_extract stage, sandboxed child) | {o['docs_per_s']:.1f} | {o['seconds']:.2f} | "
          f"{o['parent_cpu_s']} + {o['child_cpu_s']} child | {o['chars']:,} ({o['images']:,} images) | |")
    for name, key in (("trafilatura.extract", "trafilatura"), ("resiliparse extract_plain_text", "resiliparse")):
        t = r[key]
        print(f"| {name} | {t['docs_per_s']:.1f} | {t['seconds']:.2f} | {t['cpu_s']} | {t['chars']:,} | "
              f"{r['ratio']['ours_vs_' + key]:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per extractor; the median is kept")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    results = run(args.pages, args.batch_size, args.seed, args.repeat)
    print_table(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
