"""The commit protocol: how a task's output becomes visible, exactly once, whatever happens.

1. Every output is first written under a name unique to the attempt (`NAME.<uuid>.tmp`).
2. It is published: on a local disk by an atomic rename onto its final name. (On an object
   store, which has no rename, publishing is the marker naming the attempt's object: the
   `Storage` seam below is where that implementation goes.)
3. The task's done marker is written last, atomically, recording counts, the recipe hash and
   the input fingerprint. Readers trust only what a marker names.

Dask may run a task twice, concurrently: both attempts write their own temporaries and publish
byte-identical files onto the same names, so the last rename wins with the same content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO

TMP_SUFFIX = ".tmp"


class Storage:
    """Local-disk storage. Paths are `pathlib.Path`s under the output root."""

    def attempt_path(self, final: Path) -> Path:
        final = Path(final)
        return final.with_name(f"{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")

    def open_write(self, path: Path) -> BinaryIO:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")

    def publish(self, tmp: Path, final: Path) -> None:
        os.replace(tmp, final)

    def publish_dir(self, tmp: Path, final: Path) -> None:
        """Directories cannot be replaced atomically when the target exists: an earlier
        unmarked attempt's directory is removed first. Safe because only a marker makes it
        visible, and the marker is written after this returns."""
        if Path(final).exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def remove(self, path: Path) -> None:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def exists(self, path: Path) -> bool:
        return Path(path).exists()

    def sha256(self, path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    # markers -----------------------------------------------------------------------------------

    def write_marker(self, path: Path, content: dict[str, Any]) -> None:
        tmp = self.attempt_path(path)
        with self.open_write(tmp) as f:
            f.write(json.dumps(content, sort_keys=True, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        self.publish(tmp, path)

    def read_marker(self, path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None

    def write_json(self, path: Path, content: Any) -> None:
        """A JSON document published atomically (the manifest, sizes.json)."""
        self.write_marker(path, content)

    def remove_temporaries(self, root: Path) -> int:
        """Delete leftover attempt files of killed tasks. Only call when no task is running."""
        removed = 0
        for path in sorted(Path(root).rglob(f"*{TMP_SUFFIX}"), reverse=True):
            if path.name.count(".") >= 2:  # NAME.<uuid>.tmp
                self.remove(path)
                removed += 1
        return removed
