"""The demo's documents and texts: a WARC crawl of web pages that embed the demo's images (served
on loopback), a text corpus, an eval set, and the tokenizer of the token counts.

The prose is real: CPython ships the text of its own reference documentation as help topics
(`pydoc_data.topics`), and the pages and texts are built from its prose paragraphs (code
samples and tables left out). The pages wrap that prose the way the web does: a navigation bar,
a cookie notice repeated on every page, a footer, and images by relative URL, which the
extraction resolves against the page's URL (`http://news.demo.test:PORT/...`, a name the demo
recipe's resolver maps to 127.0.0.1).

Among them, the inputs web data is full of, each with the outcome the demo expects:
the site's logo at the end of every article (removed from all of them as an image in too many
places), a page copied under another URL and a near copy of another (MinHash `duplicate`), a 404 and an
image in the crawl (`http_404`, `not_html`), a French page (`lang_mismatch`), a page whose only
image is a dead link (`too_few_images`), a stub (`too_few_words`), keyword spam
(`gopher_repetition`), a page that quotes an eval item (`eval_overlap`), binary bytes labelled
text/html (`not_html`) and a crawl cut short mid-record (`read_error`); in the text corpus, a
repeated text, a stub, a malformed line, a French text and a leaked eval item.

The tokenizer is a small byte-level BPE trained here on the same prose with the `tokenizers`
library (DESIGN.md: the demo trains its own), written as `tokenizer/tokenizer.json`.
"""

from __future__ import annotations

import html
import io
import json
import pydoc_data.topics
import re
import shutil
from pathlib import Path
from typing import Any

from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tools.demo.data import DemoImages, encode, fit

DOC_HOST = "news.demo.test"  # the pages' host: mapped to 127.0.0.1 by the demo recipe
LOGO = "logo.jpg"  # the site's logo, at the end of every article: doc_image_dedup's to remove
TOKENIZER_VOCAB = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|image|>", "<|pad|>"]

# (topic, images on the page as (file under img/, alt text)); the files are tools/demo/web.py's
PAGES: list[tuple[str, list[tuple[str, str]]]] = [
    ("assignment", [("astronaut_crop.jpg", "An astronaut in an orange suit")]),
    ("attribute-access", [("rocket_web.jpg", "A rocket on its launch pad")]),
    ("customization", [("chelsea_web.png", "A tabby cat"), ("coins_web.jpg", "Old coins in rows")]),
    ("debugger", [("colorwheel_web.jpg", "A colour wheel")]),
    ("execmodel", [("horse_web.jpg", "A horse drawn in black")]),
    ("import", [("rocket_web.jpg", "The rocket again, in a second article")]),
    ("formatstrings", [("coins_web.jpg", "Coins")]),
    ("string-methods", [("astronaut_crop.jpg", "The astronaut"), ("chelsea_web.png", "The cat")]),
]
# No two topics share a paragraph (some help topics quote others: specialnames holds
# customization, compound holds with and try), except where a copy is meant.
TEXT_TOPICS = ["types", "typesseq", "calls", "binary", "comparisons", "del", "identifiers", "objects",
               "strings", "try"]
COOKIE_NOTICE = ("This site uses cookies to remember your preferences and to measure how the pages "
                 "are read. By continuing to browse you accept their use.")
FRENCH = ("Le module de la bibliothèque standard permet de lire et d'écrire des fichiers dans de "
          "nombreux formats. Chaque fonction renvoie un objet dont les méthodes sont décrites dans "
          "la suite de ce chapitre, avec des exemples complets et des remarques sur les cas limites.")
EVAL_ITEMS = [
    "Which statement binds a name to an object and may also modify attributes or items of mutable "
    "objects in the Python reference?",
    "What is the name of the planet that astronauts aboard the international space station orbit "
    "every ninety minutes or so?",
]


def prose(topic: str) -> list[str]:
    """The prose paragraphs of a help topic: whitespace collapsed, code and tables left out."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", pydoc_data.topics.topics[topic])]
    return [p for p in paragraphs
            if len(p.split()) >= 25 and p.endswith(".") and not re.search(r"[{}<>=\[\]*#@]|::", p)]


def page_html(title: str, paragraphs: list[str], images: list[tuple[str, str]], lang: str = "en") -> bytes:
    """A web page around `paragraphs`: navigation, cookie notice and footer (boilerplate the
    extraction removes or the paragraph dedup drops), images by relative URL after the first
    paragraph and at the end."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for i, paragraph in enumerate(paragraphs):
        body.append(f"<p>{esc(paragraph)}</p>")
        if i == 0 and images:
            src, alt = images[0]
            body.append(f'<figure><img src="../img/{esc(src)}" alt="{esc(alt)}"></figure>')
    for src, alt in images[1:]:
        body.append(f'<p><img src="/img/{esc(src)}" alt="{esc(alt)}"></p>')
    body.append(f'<p class="credit"><img src="/img/{LOGO}" alt="Demo News"> Demo News</p>')
    page = f"""<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8"><title>{esc(title)} - Demo News</title>
<script>var tracker = "not content";</script><style>p {{ margin: 1em; }}</style></head>
<body>
<nav class="menu"><a href="/">Home</a> | <a href="/topics">Topics</a> | <a href="/about">About</a></nav>
<div class="cookie-banner"><p>{esc(COOKIE_NOTICE)}</p></div>
<article>
{chr(10).join(body)}
<p>{esc(COOKIE_NOTICE)}</p>
</article>
<footer>Copyright Demo News. All rights reserved. <a href="/privacy">Privacy</a></footer>
</body></html>
"""
    return page.encode("utf-8")


def _http_headers(status: int, content_type: str) -> Any:
    reason = {200: "OK", 404: "Not Found"}.get(status, "Status")
    return StatusAndHeaders(f"{status} {reason}", [("Content-Type", content_type)], protocol="HTTP/1.1")


def write_warc(path: Path, responses: list[tuple[str, int, str, bytes]], cut_tail: bytes | None = None) -> None:
    """A gzipped WARC of `responses` (uri, status, content type, body), with a warcinfo record
    first; `cut_tail` appends the first bytes of one more record, as a crawl killed mid-write
    leaves it. Dates are fixed, so the file is the same on every build."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        fixed = {"WARC-Date": "2026-01-01T00:00:00Z"}
        info = writer.create_warcinfo_record(path.name, {"software": "mm1-pipeline demo"})
        info.rec_headers.replace_header("WARC-Date", fixed["WARC-Date"])
        info.rec_headers.replace_header("WARC-Record-ID", "<urn:uuid:00000000-0000-0000-0000-000000000000>")
        writer.write_record(info)
        for n, (uri, status, ctype, body) in enumerate(responses, 1):
            record = writer.create_warc_record(uri, "response", payload=io.BytesIO(body),
                                               http_headers=_http_headers(status, ctype))
            record.rec_headers.replace_header("WARC-Date", fixed["WARC-Date"])
            record.rec_headers.replace_header("WARC-Record-ID", f"<urn:uuid:00000000-0000-0000-0000-{n:012d}>")
            writer.write_record(record)
        if cut_tail:
            fh.write(cut_tail)


def _truncated_record(uri: str) -> bytes:
    """The first bytes of a gzipped WARC record, cut mid-stream."""
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    body = page_html("A page the crawler never finished", prose("with"), [])
    writer.write_record(writer.create_warc_record(uri, "response", payload=io.BytesIO(body),
                                                  http_headers=_http_headers(200, "text/html")))
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _write_logo(path: Path) -> None:
    """The site's logo, served beside the demo's images: scikit-image's own logo, 160 px."""
    logo = DemoImages().get("logo")
    if logo is None:
        return  # not bundled: the pages' logo is then a dead link, removed as such
    flat = Image.new("RGB", logo.size, (255, 255, 255))
    flat.paste(logo, mask=logo.getchannel("A") if logo.mode == "RGBA" else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(fit(160)(flat), "jpg"))


def train_tokenizer(texts: list[str], path: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A byte-level BPE trained on `texts`, saved as `path` (a tokenizer.json)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def _texts(root: Path) -> dict[str, Any]:
    """The text corpus (jsonl) and what becomes of each line."""
    rows: list[str] = []
    expected: dict[str, int] = {}

    def bad(line: str, reason: str) -> None:
        rows.append(line)
        expected[reason] = expected.get(reason, 0) + 1

    for topic in TEXT_TOPICS:
        rows.append(json.dumps({"text": "\n\n".join(prose(topic)[:6]), "topic": topic}))
    bad(json.dumps({"text": "\n\n".join(prose(TEXT_TOPICS[0])[:6]), "topic": "copy"}), "duplicate")
    bad(json.dumps({"text": "Too short to teach anything.", "topic": "stub"}), "too_few_words")
    bad('{"text": "a line cut in the middle', "malformed_row")
    bad(json.dumps({"text": FRENCH + "\n\n" + FRENCH.replace("module", "paquet"), "topic": "fr"}), "lang_mismatch")
    leaked = prose("numeric-types")[0] + " " + EVAL_ITEMS[1] + " " + prose("numeric-types")[1]
    bad(json.dumps({"text": leaked, "topic": "leak"}), "eval_overlap")
    path = root / "texts" / "corpus.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"path": str(path), "expected_inputs": len(rows), "expected_kept": len(TEXT_TOPICS),
            "expected_drops": expected}


def build_doc_inputs(root: Path, base: str) -> dict[str, Any]:
    """(Re)create the WARC, the text corpus, the eval set and the tokenizer under `root`, for
    the image server at `base` (http://127.0.0.1:PORT). Returns per source the expected inputs,
    kept count and drop reasons, as tools/demo/data.py does for the pairs."""
    root = Path(root)
    for sub in ("warc", "texts", "eval", "tokenizer"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
    port = base.rsplit(":", 1)[1]
    site = f"http://{DOC_HOST}:{port}"
    _write_logo(root / "www" / LOGO)
    responses: list[tuple[str, int, str, bytes]] = []
    for topic, images in PAGES:
        responses.append((f"{site}/articles/{topic}.html", 200, "text/html; charset=utf-8",
                          page_html(topic.replace("-", " ").title(), prose(topic)[:5], images)))
    expected: dict[str, int] = {}

    def bad(uri: str, status: int, ctype: str, body: bytes, reason: str) -> None:
        responses.append((uri, status, ctype, body))
        expected[reason] = expected.get(reason, 0) + 1

    first_topic, first_images = PAGES[0]
    bad(f"{site}/mirror/{first_topic}.html", 200, "text/html",
        page_html(first_topic.replace("-", " ").title(), prose(first_topic)[:5], first_images), "duplicate")
    near = [p.replace(" the ", " a ", 1) for p in prose(PAGES[1][0])[:5]]
    bad(f"{site}/syndicated/{PAGES[1][0]}.html", 200, "text/html",
        page_html("Attribute Access (syndicated)", near, PAGES[1][1]), "duplicate")
    bad(f"{site}/articles/removed.html", 404, "text/html", b"<html><body>Not found</body></html>", "http_404")
    bad(f"{site}/img/astronaut_crop.jpg", 200, "image/jpeg", b"\xff\xd8\xff\xe0 a crawled image", "not_html")
    bad(f"{site}/fr/article.html", 200, "text/html",
        page_html("Un article", [FRENCH, FRENCH.replace("fichiers", "documents")], [("horse_web.jpg", "Un cheval")],
                  lang="fr"), "lang_mismatch")
    bad(f"{site}/articles/dead-image.html", 200, "text/html",
        page_html("Context Managers", prose("context-managers")[:3], [("taken_down.jpg", "A deleted photo")]),
        "too_few_images")
    bad(f"{site}/articles/stub.html", 200, "text/html",
        page_html("Stub", ["Coming soon."], [("rocket_web.jpg", "A rocket")]), "too_few_words")
    spam = " ".join(["cheap rocket tickets best price buy now"] * 60) + "."
    bad(f"{site}/offers/tickets.html", 200, "text/html",
        page_html("Offers", [spam, spam], [("rocket_web.jpg", "Tickets")]), "gopher_repetition")
    leaked = [prose("with")[0], EVAL_ITEMS[0] + " The answer follows in the next section of this guide.",
              prose("with")[1]]
    bad(f"{site}/quiz/answers.html", 200, "text/html", page_html("Quiz answers", leaked,
        [("horse_web.jpg", "A horse")]), "eval_overlap")
    bad(f"{site}/downloads/tool.html", 200, "text/html", bytes(range(256)) * 64, "not_html")
    warc = root / "warc" / "crawl.warc.gz"
    write_warc(warc, responses, cut_tail=_truncated_record(f"{site}/articles/unfinished.html"))
    expected["read_error"] = 1

    texts = _texts(root)
    eval_path = root / "eval" / "eval_texts.jsonl"
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    eval_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in EVAL_ITEMS), encoding="utf-8")
    corpus = [" ".join(prose(t)) for t, _ in PAGES] + [" ".join(prose(t)) for t in TEXT_TOPICS]
    tokenizer = train_tokenizer(corpus, root / "tokenizer" / "tokenizer.json")
    return {
        "sources": {
            "crawl": {"path": str(warc), "expected_inputs": len(responses) + 1, "expected_kept": len(PAGES),
                      "expected_drops": expected},
            "corpus": texts,
        },
        "eval_texts": str(eval_path),
        "tokenizer": str(tokenizer),
        "doc_host": DOC_HOST,
    }
