"""Downloading the images of URL-list pairs: the I/O half of what img2dataset does.

Network I/O runs on a thread pool inside the task (`threads` requests in flight), apart from the
CPU work of decoding and resizing, which the `image` stage does next on the downloaded bytes.
Every request goes through `curate.fetch.Fetcher`: one injectable resolver, a total deadline,
a byte cap, checked redirects, and non-public addresses refused unless the recipe allows them.
A failure is a drop with the fetcher's stable code (`http_404`, `timeout`, `too_large`,
`blocked`, `dns_error`, `connection_error`, `bad_url`, ...) and never stops the task.

Only rows that have a URL and no image yet are fetched, so rows from local sources pass through.
"""

from __future__ import annotations

import ipaddress
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate.contract import conform, image_digest
from curate.fetch import Fetcher, FetchPolicy, Resolver, StaticResolver
from curate.stages.base import STAGE_ERROR, Drop, RowStage, StageConfig, mark_dropped, register

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"WEBP", 8, "webp"),
    (b"GIF8", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
)


def sniff_image_format(data: bytes) -> str:
    """The format by magic bytes, not by the server's word; "unknown" lets the image stage drop
    it as `decode_error` with Pillow's reason."""
    for magic, at, fmt in _MAGIC:
        if data[at : at + len(magic)] == magic:
            return fmt
    return "unknown"


@register
class DownloadStage(RowStage):
    name = "download"
    kinds = ("pair",)

    class Config(StageConfig):
        kind: Literal["download"] = "download"
        # requests in flight per task: execution only, not part of the recipe hash
        threads: int = Field(16, ge=1, le=512, json_schema_extra={"execution_only": True})
        deadline_s: float = Field(10.0, gt=0)  # total per request: connect, redirects, body
        max_bytes: int = Field(16 * 2**20, ge=1024)  # counted after any decompression
        max_redirects: int = Field(5, ge=0, le=20)
        # CIDRs exempt from the non-public address block (the demo allows 127.0.0.0/8)
        allow_networks: list[str] = Field(default_factory=list)
        # a static name -> IP map; when given, no DNS is asked at all (tests, the demo)
        hosts: dict[str, str] | None = None
        user_agent: str = "mm1-pipeline/0.1"

        @field_validator("max_bytes", mode="before")
        @classmethod
        def _bytes(cls, v: Any) -> int:
            from curate.recipe import parse_bytes

            return parse_bytes(v)

        @field_validator("allow_networks")
        @classmethod
        def _networks(cls, v: list[str]) -> list[str]:
            for net in v:
                ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
            return v

    config: Config

    def setup(self) -> None:
        cfg = self.config
        policy = FetchPolicy(
            deadline_s=cfg.deadline_s,
            max_bytes=cfg.max_bytes,
            max_redirects=cfg.max_redirects,
            allow_networks=tuple(cfg.allow_networks),
            user_agent=cfg.user_agent,
        )
        resolver: Resolver = StaticResolver(cfg.hosts) if cfg.hosts is not None else Resolver()
        self.fetcher = Fetcher(policy, resolver)
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="mm1-download")

    def _fetch(self, url: str) -> Any:
        try:
            return self.fetcher.fetch(url)
        except Exception as exc:  # the fetcher never raises for what a server does: a bug
            if self.config.on_error == "raise":
                raise
            return Drop(STAGE_ERROR, f"{type(exc).__name__}: {exc}")

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        rows = table.to_pylist()
        todo = [r for r in rows if not r.get("drop_reason") and r.get("image") is None]
        for row, result in zip(todo, self.pool.map(self._fetch, [r.get("url") or "" for r in todo])):
            row["attempts"] = (row.get("attempts") or 0) + 1
            if isinstance(result, Drop):
                mark_dropped(row, self.name, result)
            elif not result.ok:
                mark_dropped(row, self.name, Drop(result.reason, result.detail))
            else:
                body = result.body
                row.update(
                    image=body,
                    image_format=sniff_image_format(body),
                    image_sha256=image_digest(body),
                    image_nbytes=len(body),
                )
        return conform(pa.Table.from_pylist(rows, schema=table.schema), table.schema)
