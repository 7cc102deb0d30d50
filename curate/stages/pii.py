"""PII redaction (`pii_redact`): email addresses, IP addresses and phone numbers in the texts of
every record kind are replaced by placeholders and counted.

What it rewrites: a pair's `caption` and its other caption columns when present (`caption_alt`,
`caption_synthetic`, `caption_vecap`: the recaption stage's); a doc's text segments and its image
segments' `alt` (and their `caption_synthetic` / `caption_vecap`); a text record's `text`. Nothing
else (URLs, carried input columns) is touched. No row is ever dropped.

How it finds them:
- emails and IPv4 addresses: datatrove's `PIIFormatter` regexes and its IP validator (by default
  only public IPs are PII: 192.168.x.x, 10.x, 127.0.0.1 stay, as in datatrove). Its replacer is not
  called: it cycles through its replacements with state kept on the instance, so the text it
  writes would depend on which rows a worker saw before; here every match of a kind gets one
  fixed placeholder, so the same input always gives the same output;
- phone numbers: `phonenumbers.PhoneNumberMatcher` (Google's libphonenumber), once per region of
  `phone_regions` (a number with its +country code is found whatever the region; a national one
  like "020 7946 0958" only with its region, GB), at `phone_leniency` (VALID: a number its region's
  numbering plan allows). Overlapping finds of several regions count once. A number labelled
  "ISBN", or hyphenated as an ISBN with a valid check digit, is a book's, not a phone (an ISBN-10
  starting with 0 is a valid German or French national number to phonenumbers). A bare run of
  ten digits with a valid area code is a US number to it (2147483647 is one): `phone_bare_digits:
  false` keeps such runs (ids, integers in code) at the cost of unformatted phone numbers.

Placeholders default to `<EMAIL>`, `<IP>`, `<PHONE>`, not datatrove's example addresses
(email@example.com, 22.214.171.124): a placeholder that no matcher finds makes the stage
idempotent (a rerun over redacted text, or a second pii stage, counts 0, not the placeholders
again) and makes what was redacted visible in the output. Set them to datatrove's if natural-looking
text matters more.

Every live row gets `pii_emails`, `pii_ips`, `pii_phones` (int32; null when that kind is switched
off) and the stage counts `emails`, `ips`, `phones` and `records` (rows with at least one) in the
manifest's `stages.pii_redact.counts`. The new columns are scalar, so they reach the sidecars and
KEY.json like any stage column.

Cost: the matchers are built once per worker in `setup()`; a text without '@' skips the email
regex, one without '.' the IP regex, and one without `phone_min_digits` digits close together
(at most 3 other characters between two) skips phonenumbers, which is slow (Python parsing of every
candidate). A recipe line:

    - kind: pii_redact            # all kinds: emails, public IPs, phone numbers -> placeholders
      phone_regions: [US, GB]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import pyarrow as pa
from datatrove.pipeline.formatters.pii import PIIFormatter
from pydantic import Field, field_validator, model_validator

from curate.contract import PAIR_TEXT_COLUMNS
from curate.documents import dump_json, load_segments
from curate.stages.base import RowStage, StageConfig, register
from curate.stages.text_quality import installed

PII_KINDS = ("emails", "ips", "phones")
# A pair's texts: the caption (KEY.txt's default) and the recaption stage's columns, the alt-text
# copy included (it reaches the sidecar and KEY.json like the others).
PAIR_COLUMNS = tuple(dict.fromkeys(["caption", "caption_alt", *PAIR_TEXT_COLUMNS.values()]))
# An image segment's texts: its alt-text and the captions the recaption stage wrote into it.
IMAGE_SEGMENT_KEYS = ("alt", "caption_synthetic", "caption_vecap")
SAFETY_EXTRA = "pip install 'mm1-pipeline[safety]'"
Leniency = Literal["POSSIBLE", "VALID", "STRICT_GROUPING", "EXACT_GROUPING"]


class PiiRedactConfig(StageConfig):
    kind: Literal["pii_redact"] = "pii_redact"
    emails: bool = True
    ips: bool = True
    phones: bool = True
    only_public_ips: bool = True  # datatrove's default: a private or loopback address is no PII
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP>"
    phone_placeholder: str = "<PHONE>"
    phone_regions: list[str] = Field(default_factory=lambda: ["US"], min_length=1)  # ISO 3166 codes
    phone_leniency: Leniency = "VALID"  # phonenumbers.Leniency's names
    # False: a bare run of digits (no '+', space, '-', '.', '(' inside) is never a phone: an id or an
    # integer such as 2147483647 is a valid US number to phonenumbers
    phone_bare_digits: bool = True
    # a text with fewer digits than this close together is not handed to phonenumbers
    phone_min_digits: int = Field(7, ge=3, le=15)

    @field_validator("phone_regions")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [r.strip().upper() for r in value]

    @model_validator(mode="after")
    def _check(self) -> "PiiRedactConfig":
        if not (self.emails or self.ips or self.phones):
            raise ValueError("pii_redact: emails, ips and phones are all off; switch one on")
        if self.phones:
            if not installed("phonenumbers"):
                raise ValueError("pii_redact finds phone numbers with phonenumbers, which is not installed: "
                                 f"{SAFETY_EXTRA} (or set phones: false)")
            # Optional dependency (the safety extra), checked here so a wrong region fails at load.
            import phonenumbers

            unknown = [r for r in self.phone_regions if r not in phonenumbers.SUPPORTED_REGIONS]
            if unknown:
                raise ValueError(f"phone_regions: {unknown} are not regions phonenumbers knows "
                                 "(ISO 3166-1 alpha-2 codes, e.g. US, GB, DE)")
        return self


Span = tuple[int, int]


def replace_spans(text: str, spans: list[Span], placeholder: str) -> str:
    """`text` with each (start, end) span, sorted and not overlapping, replaced by `placeholder`."""
    out, at = [], 0
    for start, end in spans:
        out.append(text[at:start])
        out.append(placeholder)
        at = end
    out.append(text[at:])
    return "".join(out)


def regex_spans(regex: re.Pattern[str], text: str, valid: Callable[[str], bool] | None = None) -> list[Span]:
    """The spans of `regex`'s matches in `text` that `valid` accepts (all of them without one)."""
    return [m.span() for m in regex.finditer(text) if valid is None or valid(m.group(0))]


_ISBN_LABEL = re.compile(r"ISBN(?:-1[03])?:?\s*$", re.IGNORECASE)
_ISBN_10 = re.compile(r"^\d{1,5}-\d{1,7}-\d{1,7}-[\dX]$")
_ISBN_13 = re.compile(r"^97[89]-\d{1,5}-\d{1,7}-\d{1,7}-\d$")


def isbn_checksum(digits: str) -> bool:
    """Whether `digits` (10 or 13, 'X' the last of ten meaning 10) carries a valid ISBN check digit."""
    if len(digits) == 10:
        values = [10 if c in "Xx" else int(c) for c in digits]
        return sum((10 - i) * v for i, v in enumerate(values)) % 11 == 0
    if len(digits) == 13 and digits.isdigit():
        return sum((3 if i % 2 else 1) * int(c) for i, c in enumerate(digits)) % 10 == 0
    return False


def is_isbn(text: str, start: int, end: int) -> bool:
    """Whether the number at text[start:end] is a book's ISBN rather than a phone number: labelled
    "ISBN" just before it, or hyphenated as an ISBN is (four groups, or five after 978/979, the
    last one the check digit) with a valid check digit. phonenumbers takes an ISBN-10 that starts
    with 0 for a German or French national number."""
    if _ISBN_LABEL.search(text, max(0, start - 12), start):
        return True
    raw = text[start:end]
    return bool(_ISBN_10.match(raw) or _ISBN_13.match(raw)) and isbn_checksum(raw.replace("-", ""))


def first_spans(spans: list[Span]) -> list[Span]:
    """Sorted spans without overlaps: of overlapping ones, the earliest (then the longest) wins."""
    kept: list[Span] = []
    for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
        if not kept or start >= kept[-1][1]:
            kept.append((start, end))
    return kept


@register
class PiiRedact(RowStage):
    """Replaces emails, IPs and phone numbers in a record's texts and counts them (module docstring)."""

    name = "pii_redact"
    Config = PiiRedactConfig
    config: PiiRedactConfig
    kinds = ("pair", "doc", "text")
    output_columns: ClassVar[dict[str, pa.DataType]] = {f"pii_{k}": pa.int32() for k in PII_KINDS}

    def setup(self) -> None:
        cfg = self.config
        # datatrove's regexes and IP validator, built once per worker (the formatter compiles them)
        formatter = PIIFormatter(only_remove_public_ips=cfg.only_public_ips)
        self.email_regex = formatter.emails_replacer.regex
        self.ip_regex = formatter.ip_replacer.regex
        self.ip_valid = formatter.ip_replacer.validator
        self.digit_run = re.compile(r"\d(?:[^\d\n]{0,3}\d){%d}" % (cfg.phone_min_digits - 1))
        if cfg.phones:
            # Optional dependency (the safety extra: the config's validator named it if missing); 16 ms.
            import phonenumbers

            self.phone_matcher = phonenumbers.PhoneNumberMatcher
            self.leniency = getattr(phonenumbers.Leniency, cfg.phone_leniency)

    def phone_spans(self, text: str) -> list[Span]:
        spans = []
        for region in self.config.phone_regions:
            spans += [(m.start, m.end) for m in self.phone_matcher(text, region, leniency=self.leniency)
                      if not is_isbn(text, m.start, m.end)
                      and (self.config.phone_bare_digits or not m.raw_string.isdigit())]
        return first_spans(spans)

    def redact(self, text: str, found: dict[str, int]) -> str:
        """`text` with its PII replaced; adds what it replaced to `found` (per kind)."""
        cfg = self.config
        if cfg.emails and "@" in text:
            spans = regex_spans(self.email_regex, text)
            found["emails"] += len(spans)
            text = replace_spans(text, spans, cfg.email_placeholder)
        if cfg.ips and "." in text:
            spans = regex_spans(self.ip_regex, text, self.ip_valid)
            found["ips"] += len(spans)
            text = replace_spans(text, spans, cfg.ip_placeholder)
        if cfg.phones and self.digit_run.search(text):
            spans = self.phone_spans(text)
            found["phones"] += len(spans)
            text = replace_spans(text, spans, cfg.phone_placeholder)
        return text

    def _redact_keys(self, holder: dict[str, Any], keys: tuple[str, ...], found: dict[str, int]) -> bool:
        """Redact the string values of `keys` in `holder` in place; whether any changed."""
        changed = False
        for key in keys:
            value = holder.get(key)
            if isinstance(value, str) and value:
                new = self.redact(value, found)
                if new != value:
                    holder[key] = new
                    changed = True
        return changed

    def process_row(self, row: dict[str, Any]) -> None:
        found = dict.fromkeys(PII_KINDS, 0)
        if self.batch_kind == "pair":
            self._redact_keys(row, PAIR_COLUMNS, found)
        elif self.batch_kind == "text":
            self._redact_keys(row, ("text",), found)
        else:
            segments = load_segments(row)
            changed = False
            for segment in segments:
                keys = ("text",) if segment.get("type") == "text" else IMAGE_SEGMENT_KEYS
                changed = self._redact_keys(segment, keys, found) or changed
            if changed:  # untouched docs keep their segments' JSON byte for byte
                row["segments"] = dump_json(segments)
        for kind in PII_KINDS:
            on = getattr(self.config, kind)
            row[f"pii_{kind}"] = found[kind] if on else None
            self.count(kind, found[kind])
        self.count("records", int(any(found.values())))
        return None
