"""VeCap's caption rules, as pure functions: cleaning generated text, the fusion prompt, and the
guards that decide whether a fused caption is kept or the synthetic caption stands in for it.

VeCap (the captions MM1 pretrains on) rewrites a web image's noisy alt-text with a captioning
model's description so that the alt-text's facts survive and the visual detail is added. A
language model can fail that in a few recognisable ways; each has a stable code, recorded in
`vecap_fallback` when it happens (and `caption_vecap` then holds the synthetic caption):

- `fusion_empty`: nothing left after cleaning;
- `fusion_too_long`: more than `max_words` words, or generation stopped at its token limit
  (an unfinished sentence);
- `fusion_repetition`: a repetition loop (`repetition_loop`);
- `fusion_lost_alt_facts`: the alt-text has salient tokens and the output keeps none of them;
- `fusion_error`: the model could not be asked (its server failed after retries);
- `no_alt_text`: nothing to fuse: the alt-text is empty, the synthetic caption is used as is.

And for the captioner's own output, which has no fallback (the row keeps its alt-text only,
`caption_synthetic` and `caption_vecap` null): `caption_empty`, `caption_repetition`.

Salient tokens (the lexical rule): numbers (digit runs, with inner `.`, `,` or `:` as in 1889,
3.5, 10:30) and capitalised words (an upper-case first letter: names, places, brands), except a
short list of words that are capitalised only for starting a sentence (`The`, `A`, `This`,
...) and stock-photo filler (`Image`, `Photo`, ...); text is NFC-normalised first and a
possessive 's is dropped (`Obama's` -> `obama`). Matching is case-insensitive on whole tokens. An alt-text without salient tokens puts no constraint on the fusion.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

CAPTION_EMPTY = "caption_empty"
CAPTION_REPETITION = "caption_repetition"
NO_ALT_TEXT = "no_alt_text"
FUSION_EMPTY = "fusion_empty"
FUSION_TOO_LONG = "fusion_too_long"
FUSION_REPETITION = "fusion_repetition"
FUSION_LOST_ALT_FACTS = "fusion_lost_alt_facts"
FUSION_ERROR = "fusion_error"

DEFAULT_CAPTION_PROMPT = "Describe this image in one detailed paragraph: the objects, people, text, setting and colours you see."
DEFAULT_FUSION_PROMPT = (
    "Write one caption for an image from two sources. The alt-text came with the image on the web: "
    "keep its facts (names, places, numbers, dates). The description was written by looking at the image: "
    "add its visual details. Do not invent anything else.\n"
    "Alt-text: {alt_text}\n"
    "Description: {synthetic_caption}\n"
    "Reply with the caption only."
)

_TOKEN = re.compile(r"\d+(?:[.,:]\d+)*|[^\W\d_][\w'’-]*", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)
_POSSESSIVE = re.compile(r"['’]s$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{alt_text\}|\{synthetic_caption\}")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "„": "“"}
_SPACE = re.compile(r"\s+")
_LABEL = re.compile(r"^(?:caption|new caption|description)\s*:\s*", re.IGNORECASE)
NOT_SALIENT = frozenset(
    "a an the this that these those there here it its in on at of for with from by and or but "
    "my our your his her their we you he she they i image photo photograph picture stock "
    "close closeup view".split()
)


def prompt_hash(*parts: object) -> str:
    """A short, stable hash of a prompt and the generation settings that shape its answers."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def fusion_prompt(template: str, alt_text: str, synthetic_caption: str) -> str:
    """The template with `{alt_text}` and `{synthetic_caption}` filled in, in one pass (not
    str.format, not two replaces: braces or placeholders inside an alt-text stay text)."""
    values = {"{alt_text}": alt_text, "{synthetic_caption}": synthetic_caption}
    return _PLACEHOLDER.sub(lambda m: values[m.group(0)], template)


def check_fusion_template(template: str) -> str:
    missing = [p for p in ("{alt_text}", "{synthetic_caption}") if p not in template]
    if missing:
        raise ValueError(f"the fusion prompt must contain {missing}")
    return template


def clean(text: str | None) -> str:
    """Generated text as a caption: control and format characters and U+FFFD (undecodable bytes)
    removed, whitespace collapsed, a leading "Caption:" label and wrapping quotes dropped."""
    if not text:
        return ""
    kept = "".join(" " if ch.isspace() else ch for ch in unicodedata.normalize("NFC", text)
                   if ch.isspace() or (unicodedata.category(ch)[0] != "C" and ch != "\ufffd"))
    out = _LABEL.sub("", _SPACE.sub(" ", kept).strip())
    if len(out) >= 2 and _QUOTES.get(out[0]) == out[-1]:
        out = out[1:-1].strip()
    return out


def salient_tokens(alt_text: str) -> set[str]:
    """Numbers and capitalised words of the alt-text (lower-cased), by the rule above."""
    out = set()
    for tok in _tokens(alt_text):
        if tok[0].isdigit():
            out.add(tok)
        elif tok[0].isupper() and tok.lower() not in NOT_SALIENT:
            out.add(tok.lower())
    return out


def keeps_alt_facts(alt_text: str, fused: str) -> bool:
    """True when the alt-text has no salient token or `fused` contains at least one of them."""
    salient = salient_tokens(alt_text)
    if not salient:
        return True
    have = {t.lower() for t in _tokens(fused)}
    return bool(salient & have)


def _tokens(text: str | None) -> list[str]:
    """Words and numbers of NFC text (a decomposed accent stays inside its word), a possessive
    's dropped (Obama's -> Obama)."""
    return [_POSSESSIVE.sub("", t) for t in _TOKEN.findall(unicodedata.normalize("NFC", text or ""))]


def repetition_loop(text: str, n: int = 3, times: int = 3) -> bool:
    """A word n-gram (case-insensitive) occurring `times` or more times, or one word five times
    in a row: what greedy decoding stuck in a loop produces."""
    ws = [w.lower() for w in _WORD.findall(text)]
    run = 1
    for a, b in zip(ws, ws[1:]):
        run = run + 1 if a == b else 1
        if run >= 5:
            return True
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    return any(c >= times for c in grams.values())


def judge_caption(text: str | None) -> tuple[str | None, str | None]:
    """(the cleaned synthetic caption, None) or (None, why it is unusable)."""
    caption = clean(text)
    if not caption:
        return None, CAPTION_EMPTY
    if repetition_loop(caption):
        return None, CAPTION_REPETITION
    return caption, None


def judge_fusion(alt_text: str, synthetic: str, fused: str | None, *, truncated: bool = False,
                 max_words: int = 120) -> tuple[str, str | None]:
    """(caption_vecap, vecap_fallback): the cleaned fusion and None when it passes every guard,
    else the synthetic caption and the first guard's code, in the module docstring's order."""
    out = clean(fused)
    if not out:
        return synthetic, FUSION_EMPTY
    if truncated or len(_WORD.findall(out)) > max_words:
        return synthetic, FUSION_TOO_LONG
    if repetition_loop(out):
        return synthetic, FUSION_REPETITION
    if not keeps_alt_facts(alt_text, out):
        return synthetic, FUSION_LOST_ALT_FACTS
    return out, None
