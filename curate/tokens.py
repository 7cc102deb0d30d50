"""Token counts for the sidecars: what the trainer's packer needs to plan sequences without
tokenizing a shard first.

The recipe names one tokenizer (`tokenizer.path`): a `tokenizer.json` file of the `tokenizers`
library, a folder holding one (a Hugging Face model folder on local disk), or a hub name, which
`tokenizers` fetches (only where the machine may reach the hub: tests and the demo use local
files). Every kept sample's sidecar row gets `token_count` (the tokens of its text: a pair's
caption, a doc's text segments joined by blank lines, a text's body; no special tokens, no image
tokens, which the trainer adds per image from `n_images`) and `tokenizer`, the recipe's
`tokenizer.id` or else "<name>@<first 12 hex of the sha256 of tokenizer.json>", so counts made
with another tokenizer are never mistaken for these.

A local tokenizer must exist when the recipe loads (`check_tokenizer_path`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from curate.documents import record_text

TOKENIZER_FILE = "tokenizer.json"


def is_local(path: str) -> bool:
    """A path on disk (absolute, relative with a dot, a home path, or a .json file), as opposed
    to a hub name such as `gpt2` or `org/model`."""
    return path.startswith(("/", ".", "~")) or path.endswith(".json") or Path(path).exists()


def tokenizer_file(path: str) -> Path:
    p = Path(path).expanduser()
    return p / TOKENIZER_FILE if p.is_dir() else p


def check_tokenizer_path(path: str) -> str:
    if is_local(path) and not tokenizer_file(path).is_file():
        raise ValueError(f"tokenizer {path!r}: no {TOKENIZER_FILE} there (a tokenizers file, or a folder "
                         "holding one; or a hub name)")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> tuple[Any, str]:
    """(the `tokenizers.Tokenizer`, its default id), once per worker process."""
    if is_local(path):
        file = tokenizer_file(path)
        tokenizer = Tokenizer.from_file(str(file))
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
        name = file.parent.name if file.name == TOKENIZER_FILE else file.stem
        return tokenizer, f"{name}@{digest}"
    tokenizer = Tokenizer.from_pretrained(path)
    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    return tokenizer, f"{path}@{digest}"


class TokenCounter:
    """Counts the tokens of records with the recipe's tokenizer (loaded lazily, once)."""

    def __init__(self, path: str, id: str | None = None):
        self.path, self._id = path, id

    @functools.cached_property
    def _loaded(self) -> tuple[Any, str]:
        return load_tokenizer(self.path)

    @property
    def id(self) -> str:
        return self._id or self._loaded[1]

    def count(self, kind: str, row: dict[str, Any]) -> int:
        text = record_text(kind, row)
        if not text:
            return 0
        return len(self._loaded[0].encode(text, add_special_tokens=False).ids)

    def __getstate__(self) -> dict[str, Any]:  # the tokenizer itself is never shipped to workers
        return {"path": self.path, "_id": self._id}
