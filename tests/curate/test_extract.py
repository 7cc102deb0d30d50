"""HTML -> segments: known pages give exact segment lists; decoding, URL and boilerplate rules
one by one; hostile markup (entities, deep nesting) parsed without expansion or blow-up."""

from __future__ import annotations

import pytest

from curate.html_segments import (
    EMPTY_DOCUMENT,
    NOT_HTML,
    ExtractOptions,
    Extracted,
    Rejected,
    binary_kind,
    decode_html,
    extract,
)

ARTICLE = b"""<!DOCTYPE html>
<html lang="en-GB">
<head>
  <meta charset="utf-8">
  <title>  Growing   tomatoes  </title>
  <base href="/static/img/">
  <script>var tracker = "do not keep";</script>
  <style>p { color: red }</style>
</head>
<body class="page has-sidebar">
  <header><a href="/">Garden Weekly</a></header>
  <nav><ul><li><a href="/">Home</a></li><li><a href="/about">About</a></li></ul></nav>
  <div id="cookie-consent">We use cookies. <button>OK</button></div>
  <article>
    <h1>Growing <em>tomatoes</em> at home</h1>
    <p>Tomatoes need <b>six hours</b> of sun and
       <a href="/water">regular   watering</a>.</p>
    <img src="seedlings.jpg" alt="  Young tomato
       seedlings ">
    <p>Stake the plants early.<br>Tie them loosely.</p>
    <ul><li>Cherry</li><li>Roma <i>(paste)</i></li></ul>
    <img src="https://cdn.example.org/ripe.png">
    <img src="data:image/png;base64,iVBORw0KGgo=" alt="inline">
    <img src="javascript:alert(1)" alt="script">
    <img src="/pixel.gif" width="1" height="1" alt="">
    <table>
      <tr><th>Variety</th><th>Days</th></tr>
      <tr><td>Cherry</td><td>60</td></tr>
    </table>
    <!-- a comment that never shows -->
    <div class="share-buttons"><a href="#">Share on social</a></div>
    <section class="comments"><p>First!</p></section>
  </article>
  <aside>Popular posts</aside>
  <footer><p>Copyright 2026</p></footer>
</body>
</html>
"""

ARTICLE_SEGMENTS = [
    {"type": "text", "text": "Growing tomatoes at home"},
    {"type": "text", "text": "Tomatoes need six hours of sun and regular watering."},
    {"type": "image", "url": "https://garden.example.com/static/img/seedlings.jpg", "alt": "Young tomato seedlings"},
    {"type": "text", "text": "Stake the plants early.\nTie them loosely."},
    {"type": "text", "text": "Cherry"},
    {"type": "text", "text": "Roma (paste)"},
    {"type": "image", "url": "https://cdn.example.org/ripe.png", "alt": ""},
    {"type": "text", "text": "Variety"},
    {"type": "text", "text": "Days"},
    {"type": "text", "text": "Cherry"},
    {"type": "text", "text": "60"},
]


def segments(html: bytes, url: str | None = "https://garden.example.com/2026/tomatoes.html", **kw) -> list[dict]:
    result = extract(html, url, **kw)
    assert isinstance(result, Extracted), result
    return result.segments


def test_article_page_exact_segments_title_and_language():
    result = extract(ARTICLE, "https://garden.example.com/2026/tomatoes.html")
    assert isinstance(result, Extracted)
    assert result.segments == ARTICLE_SEGMENTS
    assert result.title == "Growing tomatoes"
    assert result.lang == "en-GB"
    assert result.encoding == "utf-8"


def test_merge_paragraphs_joins_blocks_between_images():
    merged = segments(ARTICLE, options=ExtractOptions(merge_paragraphs=True))
    assert merged == [
        {"type": "text", "text": "Growing tomatoes at home\n\nTomatoes need six hours of sun and regular watering."},
        ARTICLE_SEGMENTS[2],
        {"type": "text", "text": "Stake the plants early.\nTie them loosely.\n\nCherry\n\nRoma (paste)"},
        ARTICLE_SEGMENTS[6],
        {"type": "text", "text": "Variety\n\nDays\n\nCherry\n\n60"},
    ]


def test_relative_images_resolve_against_page_url_without_base():
    html = b"<p>x</p><img src='a.jpg'><img src='/b.jpg'><img src='//c.example.net/c.jpg'><img src='../d.jpg?s=1#f'>"
    assert [s["url"] for s in segments(html, "https://e.org/dir/sub/page") if s["type"] == "image"] == [
        "https://e.org/dir/sub/a.jpg", "https://e.org/b.jpg", "https://c.example.net/c.jpg",
        "https://e.org/dir/d.jpg?s=1#f"]


def test_absolute_base_href_wins_and_without_page_url_relative_images_are_skipped():
    html = b"<head><base href='https://img.example.com/x/'></head><p>t</p><img src='a.jpg'>"
    assert segments(html, "https://e.org/p")[-1]["url"] == "https://img.example.com/x/a.jpg"
    assert segments(html, None)[-1]["url"] == "https://img.example.com/x/a.jpg"
    assert segments(b"<p>t</p><img src='a.jpg'><img src='http://e.org/b.jpg'>", None) == [
        {"type": "text", "text": "t"}, {"type": "image", "url": "http://e.org/b.jpg", "alt": ""}]


@pytest.mark.parametrize("img", [
    b"<img src='data:image/gif;base64,R0lGODlhAQABAAAAACw='>",
    b"<img src='javascript:void(0)'>",
    b"<img src='JavaScript:alert(1)'>",
    b"<img src='blob:https://e.org/1'>",
    b"<img src='ftp://e.org/a.jpg'>",
    b"<img src='file:///etc/passwd'>",
    b"<img>",
    b"<img src=''>",
    b"<img src='http://[::1'>",
    b"<img src='/t.gif' width='1' height='1'>",
    b"<img src='/t.gif' width='0'>",
    b"<img src='/t.gif' height='1px'>",
])
def test_unusable_images_are_skipped(img):
    assert segments(b"<p>kept</p>" + img) == [{"type": "text", "text": "kept"}]


def test_lazy_and_srcset_fallbacks():
    html = (b"<p>t</p><img src='data:image/gif;base64,R0=' data-src='/lazy.jpg'>"
            b"<img srcset='/s.jpg 320w, /l.jpg 1280w, /m.jpg 640w'>"
            b"<img src='/real.jpg' data-src='/other.jpg'>"
            b"<img src='/big.jpg' width='800' height='600'>")
    assert [s["url"] for s in segments(html, "https://e.org/") if s["type"] == "image"] == [
        "https://e.org/lazy.jpg", "https://e.org/l.jpg", "https://e.org/real.jpg", "https://e.org/big.jpg"]


def test_image_inside_a_paragraph_splits_it_in_reading_order():
    html = b"<p>before <a href='/x'><img src='/i.jpg' alt='icon'></a> after</p>"
    assert segments(html, "https://e.org/") == [
        {"type": "text", "text": "before"},
        {"type": "image", "url": "https://e.org/i.jpg", "alt": "icon"},
        {"type": "text", "text": "after"},
    ]


@pytest.mark.parametrize("boilerplate", [
    b"<div class='main-menu'>menu</div>", b"<div id='sidebarLeft'>side</div>", b"<div class='ad'>buy</div>",
    b"<div class='advertisement-box'>buy</div>", b"<div class='social-share'>x</div>",
    b"<div role='navigation'>nav</div>", b"<div hidden>h</div>", b"<div aria-hidden='true'>h</div>",
    b"<div style='display: none'>h</div>", b"<noscript>enable js</noscript>", b"<form><p>field</p></form>",
    b"<iframe src='https://e.org'></iframe>", b"<svg><title>icon</title><text>x</text></svg>",
    b"<template><p>tpl</p></template>", b"<div class='breadcrumbs'>a &gt; b</div>",
])
def test_boilerplate_is_removed(boilerplate):
    assert segments(b"<body><p>content</p>" + boilerplate + b"<p>end</p></body>") == [
        {"type": "text", "text": "content"}, {"type": "text", "text": "end"}]


@pytest.mark.parametrize("content", [
    b"<div class='download-area'>get it</div>", b"<div class='shadow'>get it</div>",
    b"<div class='thread-head'>get it</div>", b"<div id='address'>get it</div>",
])
def test_words_containing_a_boilerplate_token_are_not_boilerplate(content):
    assert segments(b"<body>" + content + b"</body>") == [{"type": "text", "text": "get it"}]


def test_tails_after_removed_elements_and_inline_runs_stay():
    html = b"<div>one <span>two</span><script>x()</script> three<nav>n</nav> four</div><p>5</p>"
    assert segments(html) == [{"type": "text", "text": "one two three four"}, {"type": "text", "text": "5"}]


def test_pre_keeps_lines_and_unicode_whitespace_collapses():
    html = "<pre>def f():\n    return 1\n\n</pre><p>a\u00a0\u2003 b\t\nc</p>".encode()
    assert segments(html) == [{"type": "text", "text": "def f():\nreturn 1"}, {"type": "text", "text": "a b c"}]


def test_entities_and_character_references_decode():
    assert segments(b"<p>caf&eacute; &amp; cr&#232;me &#x2014; &lt;b&gt;</p>") == [
        {"type": "text", "text": "caf\u00e9 & cr\u00e8me \u2014 <b>"}]


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def test_latin1_bytes_declared_utf8_decode_with_replacement():
    text, codec = decode_html(b"<p>caf\xe9 cr\xe8me</p>", "utf-8")
    assert codec == "utf-8" and text == "<p>caf\ufffd cr\ufffdme</p>"
    assert segments(b"<p>caf\xe9</p>", charset="UTF-8") == [{"type": "text", "text": "caf\ufffd"}]


def test_utf8_bytes_labelled_shift_jis_read_as_utf8():
    page = '<meta charset="shift_jis"><p>日本語のページ café</p>'.encode()
    assert segments(page) == [{"type": "text", "text": "日本語のページ café"}]
    assert segments(page, charset="Shift_JIS") == [{"type": "text", "text": "日本語のページ café"}]


def test_real_shift_jis_and_latin1_pages_follow_their_label():
    sjis = '<meta http-equiv="Content-Type" content="text/html; charset=Shift_JIS"><p>日本語</p>'.encode("shift_jis")
    assert segments(sjis) == [{"type": "text", "text": "日本語"}]
    assert decode_html("<p>日本語</p>".encode("euc_jp"), "EUC-JP")[0] == "<p>日本語</p>"
    # iso-8859-1 is read as windows-1252, as browsers do (0x93/0x94: curly quotes)
    assert segments(b"<meta charset='iso-8859-1'><p>\x93caf\xe9\x94</p>") == [{"type": "text", "text": "\u201ccaf\u00e9\u201d"}]


def test_byte_order_marks_win():
    assert segments("\ufeff<p>bom utf-8 é</p>".encode("utf-8"), charset="latin-1") == [
        {"type": "text", "text": "bom utf-8 é"}]
    assert segments("\ufeff<p>utf-16 é</p>".encode("utf-16-le")) == [{"type": "text", "text": "utf-16 é"}]


@pytest.mark.parametrize("label", ["no-such-charset", "utf-7", "unicode_escape", "rot13", "base64", "zlib", "x" * 300])
def test_bogus_or_dangerous_charset_labels_are_ignored(label):
    page = b"<p>caf\xe9 \\u0041</p>"
    assert segments(page, charset=label) == [{"type": "text", "text": "caf\ufffd \\u0041"}]
    assert segments(b"<meta charset='" + label.encode() + b"'>" + page) == [{"type": "text", "text": "caf\ufffd \\u0041"}]


# ---------------------------------------------------------------------------------------------
# Rejections and hostile markup
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, why", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG signature"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG signature"),
    (b"GIF89a\x01\x00", "GIF signature"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "RIFF WEBP signature"),
    (b"%PDF-1.7\n", "PDF signature"),
    (b"\x1f\x8b\x08\x00", "gzip signature"),
    (b"<html>\x00\x01\x02</html>", "NUL bytes in the first 1024 bytes"),
])
def test_binary_payloads_are_not_html(payload, why):
    assert binary_kind(payload) == why
    assert extract(payload, None) == Rejected(NOT_HTML, why)


@pytest.mark.parametrize("page", [b"", b"   \n\t", b"<html><head><title>t</title></head><body></body></html>",
                                  b"<html><body><script>only()</script><nav>menu</nav></body></html>",
                                  b"<!-- nothing -->", b"<img src='data:x'>"])
def test_empty_documents(page):
    assert extract(page, "https://e.org/") == Rejected(EMPTY_DOCUMENT, "no text and no image")


def test_an_image_alone_is_a_document():
    assert segments(b"<img src='/a.jpg'>", "https://e.org/") == [{"type": "image", "url": "https://e.org/a.jpg", "alt": ""}]


def test_plain_text_is_kept():
    assert segments(b"just some words\nin a file") == [{"type": "text", "text": "just some words in a file"}]


def test_external_entity_cannot_read_a_local_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-7f3a9c1e-must-not-leak")
    for page in (
        f'<!DOCTYPE html [<!ENTITY e SYSTEM "file://{secret}">]><html><body><p>&e;</p></body></html>',
        f'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY e SYSTEM "{secret}">]><p>x&e;y</p>',
        f'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0//EN" "file://{secret}"><p>&e;</p>',
    ):
        result = extract(page.encode(), "https://e.org/")
        assert isinstance(result, Extracted)
        assert "SECRET-7f3a9c1e" not in repr(result)


def test_billion_laughs_does_not_expand():
    lol = ['<!ENTITY lol "lol">'] + [f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">' for i in range(1, 10)]
    page = f'<?xml version="1.0"?><!DOCTYPE lolz [{"".join(lol).replace("&lol0;", "&lol;")}]><p>&lol9;</p>'
    result = extract(page.encode(), None)
    assert isinstance(result, Extracted)
    assert len(repr(result)) < 1000 and "lollol" not in repr(result)


def test_deep_nesting_and_huge_colspan_parse_small():
    # libxml2 (huge_tree off) stops at 256 levels: what came before is kept, the rest is lost
    deep = extract(b"<p>before</p>" + b"<div>" * 100_000 + b"deep text" + b"</div>" * 100_000, None)
    assert deep == Extracted([{"type": "text", "text": "before"}], None, None, "utf-8")
    assert segments(b"<div>" * 200 + b"deep text" + b"</div>" * 200 + b"<p>after</p>") == [
        {"type": "text", "text": "deep text"}, {"type": "text", "text": "after"}]
    colspan = segments(b"<table><tr><td colspan=100000000 rowspan=100000000>wide</td><td>next</td></tr></table>")
    assert colspan == [{"type": "text", "text": "wide"}, {"type": "text", "text": "next"}]


def test_control_characters_are_removed_raw_or_as_references():
    assert segments("<p>a\x01b\x1bc\x7fd</p>".encode()) == [{"type": "text", "text": "abcd"}]
    assert segments(b"<p>a&#1;b&#x1b;c&#xD800;d</p><img src='/x.jpg' alt='&#2;alt'>", "https://e.org/") == [
        {"type": "text", "text": "abc\ufffdd"}, {"type": "image", "url": "https://e.org/x.jpg", "alt": "alt"}]
