"""robots.txt, fetched once per origin and honoured for our user agent (RFC 9309).

`RobotsCache(fetcher, agent).allowed(url) -> (allowed, detail)`. The first question about an
origin (scheme, host, port) fetches `scheme://host[:port]/robots.txt` through the caller's
`Fetcher`, so the same resolver, address checks, deadline and redirect limit apply; concurrent
first questions about one origin wait for that one fetch. The text is parsed with
`urllib.robotparser` (fed the text: it never fetches anything itself). Entries last the cache's
life, at most `ttl_s` (RFC 9309 asks for no more than 24 hours).

What an answer other than 2xx means (RFC 9309 section 2.3.1, read conservatively):
- 4xx except 429 ("unavailable"): no rules, every URL allowed;
- 429, 5xx, timeout, connection errors, undecodable bodies ("unreachable"): every URL of the
  origin disallowed, for as long as the entry lives (the RFC's MUST; a host that is down or rate
  limiting us is left alone, at the cost of losing its images for this process);
- larger than `max_bytes` (500 KiB, the RFC's minimum parse limit): no rules, every URL allowed;
- more redirects than the fetcher follows: "unavailable" (the RFC's reading), allowed;
- a host that cannot be resolved or is refused (`dns_error`, `blocked`, `bad_url` before anything
  was dialled): no decision here; the image fetch fails with that same, more telling code.

Matching, on top of `urllib.robotparser`: the rules of a group are tried longest path first
(allow before disallow on a tie), so the most specific rule wins as RFC 9309 says rather than the
first written; `*` and a trailing `$` in a path are wildcards. Group selection is the parser's own:
the first group whose user-agent occurs in our token (case-insensitive), else the `*` group.
Not used: Crawl-delay and Request-rate.

A disallowed URL's detail names the robots.txt and the rule, e.g.
`http://host/robots.txt: Disallow: /private/ (user-agent mm1-pipeline)`.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
from urllib.robotparser import Entry, RobotFileParser, RuleLine

from curate.web.addresses import parse_url
from curate.web.drops import BAD_URL, BLOCKED, DNS_ERROR, TOO_LARGE, TOO_MANY_REDIRECTS, FetchFailure
from curate.web.fetcher import Fetcher

ROBOTS_DISALLOWED = "robots_disallowed"
MAX_ROBOTS_BYTES = 500 * 1024
ROBOTS_TTL_S = 24 * 3600.0
_ACCEPT = "text/plain, */*;q=0.1"


class _Rule(RuleLine):
    """A robotparser rule line that also understands `*` (any run) and a final `$` (the end)."""

    def __init__(self, line: RuleLine):
        self.path, self.allowance = line.path, line.allowance  # quoted: "*" is %2A, "$" is %24
        pattern, anchored = self.path, self.path.endswith("%24")
        if anchored:
            pattern = pattern[: -len("%24")]
        self._regex = None
        if anchored or "%2A" in pattern:
            parts = (".*" if p == "%2A" else re.escape(p) for p in re.split(r"(%2A)", pattern))
            self._regex = re.compile("".join(parts) + ("$" if anchored else ""), re.DOTALL)

    def applies_to(self, filename: str) -> bool:
        if self._regex is None:
            return filename.startswith(self.path)
        return self._regex.match(filename) is not None


def _most_specific_first(entry: Entry) -> None:
    entry.rulelines = sorted(
        (_Rule(line) for line in entry.rulelines), key=lambda r: (-len(r.path), not r.allowance)
    )


def _request_path(url: str) -> str:
    """The form `RobotFileParser.can_fetch` matches rules against."""
    parsed = urllib.parse.urlparse(urllib.parse.unquote(url))
    path = urllib.parse.urlunparse(("", "", parsed.path, parsed.params, parsed.query, parsed.fragment))
    return urllib.parse.quote(path) or "/"


class _Rules:
    """One origin's verdict: parsed rules, or all allowed / all disallowed with the reason."""

    def __init__(self, source: str, parser: RobotFileParser | None = None, *, allow_all: bool = True,
                 why: str = ""):
        self.source, self.parser, self.allow_all, self.why = source, parser, allow_all, why
        self.loaded = time.monotonic()

    def check(self, url: str, agent: str) -> tuple[bool, str]:
        if self.parser is None:
            if self.allow_all:
                return True, self.why
            return False, self.why
        if self.parser.can_fetch(agent, url):
            return True, ""
        return False, self._rule_for(url, agent)

    def _rule_for(self, url: str, agent: str) -> str:
        """Which group and rule disallowed `url`, mirroring can_fetch's search."""
        parser, path = self.parser, _request_path(url)
        assert parser is not None
        groups = list(parser.entries) + ([parser.default_entry] if parser.default_entry else [])
        for entry in groups:
            if entry.applies_to(agent):
                for line in entry.rulelines:
                    if line.applies_to(path):
                        kind = "Allow" if line.allowance else "Disallow"
                        rule = f"{kind}: {urllib.parse.unquote(line.path)}"
                        named = ", ".join(entry.useragents)
                        return f"{self.source}: {rule} (user-agent {named})"
                break
        return f"{self.source} disallows it for {agent}"


class RobotsCache:
    """robots.txt rules per (scheme, host, port) for one agent token. Thread-safe; one per process
    (the download stage keeps one per stage instance, which is one per worker process)."""

    def __init__(self, fetcher: Fetcher, agent: str, *, max_bytes: int = MAX_ROBOTS_BYTES,
                 ttl_s: float = ROBOTS_TTL_S):
        self.fetcher, self.agent, self.max_bytes, self.ttl_s = fetcher, agent, max_bytes, ttl_s
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, str, int], tuple[threading.Lock, list[_Rules]]] = {}

    def allowed(self, url: str) -> tuple[bool, str]:
        """Whether our agent may fetch `url`, and why not (a ledger detail) when it may not. A URL
        that is not a fetchable http(s) URL is allowed here: the fetcher drops it as `bad_url`."""
        try:
            target = parse_url(url)
        except FetchFailure:
            return True, ""
        return self._rules(target.scheme, target.host, target.port, target.host_header).check(url, self.agent)

    def gate(self, url: str) -> tuple[str, str] | None:
        """`allowed` as a `Fetcher.fetch` gate: every redirect hop is checked too."""
        ok, why = self.allowed(url)
        return None if ok else (ROBOTS_DISALLOWED, why)

    def _rules(self, scheme: str, host: str, port: int, host_header: str) -> _Rules:
        key = (scheme, host, port)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = (threading.Lock(), [])
        lock, held = slot
        with lock:  # the first asker fetches; the others for this origin wait for its answer
            if not held or time.monotonic() - held[0].loaded > self.ttl_s:
                held[:] = [self._load(f"{scheme}://{host_header}/robots.txt")]
            return held[0]

    def _load(self, source: str) -> _Rules:
        res = self.fetcher.fetch(source, accept=_ACCEPT, max_bytes=self.max_bytes, opt_out=False)
        if res.ok:
            assert res.body is not None
            parser = RobotFileParser(source)
            parser.parse(res.body.decode("utf-8", "replace").lstrip("\ufeff").splitlines())
            for entry in [*parser.entries, *([parser.default_entry] if parser.default_entry else [])]:
                _most_specific_first(entry)
            return _Rules(source, parser)
        reason = res.reason or "unknown"
        status = res.status if reason.startswith("http_") else None
        if status is not None and 400 <= status < 500 and status != 429:
            return _Rules(source, why=f"{source} answered HTTP {status}: no rules")
        if reason == TOO_LARGE:
            return _Rules(source, why=f"{source} is over {self.max_bytes} bytes: no rules")
        if reason == TOO_MANY_REDIRECTS:
            return _Rules(source, why=f"{source}: {res.detail}: no rules")
        if reason in (DNS_ERROR, BLOCKED, BAD_URL) and not res.dialled:
            return _Rules(source, why="")  # the fetch of the URL itself fails the same way
        return _Rules(
            source, allow_all=False,
            why=f"{source} unreachable ({reason}: {res.detail}): every URL of the origin disallowed",
        )
