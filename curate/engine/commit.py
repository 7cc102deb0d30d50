"""The commit protocol: how a task's output becomes visible, exactly once, whatever happens.

Outputs live on a local disk or on an object store (any fsspec URL: s3://, gs://, memory://);
`location(path_or_url)` (curate/storage.py, the storage seam, which also holds the reads) turns
either into a path object (`pathlib.Path`, or a `upath.UPath` on the store) and
`storage_for(path)` gives the storage that commits there.

1. Every output is first written under a name unique to the attempt.
2. It is published:
   - on a local disk by an atomic rename of `NAME.<uuid>.tmp` onto its final name;
   - on an object store, which has no rename, an intermediate (a segment's rows, a global
     stage's decisions: directories, and what the network fed) keeps its attempt's own name
     (`NAME.<uuid>.EXT`): the done marker that names it publishes it, and the next task reads
     the name from the marker. A task's *final* single-object outputs (tars, sidecars, ledger
     files, retry id lists) are functions of marked inputs only, so every attempt writes the
     same bytes; an object store's upload is atomic (the object appears whole when the upload
     completes, a killed upload leaves nothing), so they are uploaded to their final names
     (`attempt_path(final, deterministic=True)` is `final` itself there) and the pack marker,
     then the manifest, publish them.
3. The task's done marker is written last, atomically (one PUT on a store), recording counts,
   the recipe hash and the input fingerprint. Readers trust only what a marker names.

Dask may run a task twice, concurrently, and the twins' outputs may differ where the network fed
them (a URL answered differently the second time). Each attempt writes its own temporaries; its
intermediate is published and its marker written under the marker's lock (`marker_lock`), and
the first marker stands: a twin that finds it written removes its own attempt and returns it.
So a marker's counts describe the file it names. On a local disk the lock is an flock (the
renames onto one final name would otherwise interleave with the markers: A's counts naming B's
rows); a store needs none, as each attempt's intermediate is its own object and whichever marker
is last names its own attempt whole. Final outputs (tars, sidecars, ledgers) are the same bytes
in every attempt: the last rename (or upload) wins with the same content.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from curate.contract import TMP_SUFFIX
from curate.storage import fs_path, is_url, relative

# an attempt's own name on an object store: NAME.<12 hex>[.EXT]
ATTEMPT_NAME = re.compile(r"^(?P<stem>[^.]+)\.(?P<attempt>[0-9a-f]{12})(?P<ext>\.[A-Za-z0-9]+)?$")


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


class Storage:
    """Local-disk storage. Paths are `pathlib.Path`s under the output root."""

    remote = False

    def attempt_path(self, final: Path, deterministic: bool = False) -> Path:
        """Where an attempt writes `final` before `publish` (`deterministic`: every attempt
        writes the same bytes; only an object store makes use of it)."""
        final = Path(final)
        return final.with_name(f"{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")

    def open_write(self, path: Path) -> BinaryIO:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")

    def discard(self, f: BinaryIO, path: Path) -> None:
        """Give up an attempt's file opened by `open_write` (a failed write)."""
        f.close()
        self.remove(path)

    def publish(self, tmp: Path, final: Path) -> Path:
        """Make an attempt's file the output; returns the name its marker records."""
        os.replace(tmp, final)
        return final

    def publish_dir(self, tmp: Path, final: Path) -> Path:
        """Directories cannot be replaced atomically when the target exists: an earlier
        unmarked attempt's directory is removed first. Safe because only a marker makes it
        visible, and the marker is written after this returns."""
        if Path(final).exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

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
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    # markers -----------------------------------------------------------------------------------

    @contextmanager
    def marker_lock(self, marker: Path) -> Iterator[None]:
        """Held while a task publishes what its marker names and writes the marker: twin attempts
        take turns (module docstring). An flock on `<marker>.lock.tmp`, which the kernel releases
        if the attempt dies (a leftover file is a temporary, swept by `remove_temporaries`); the
        holder removes it, so an attempt that locked a file since removed locks the new one."""
        marker = Path(marker)
        lock = marker.with_name(f"{marker.name}.lock{TMP_SUFFIX}")
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder before us removed the file we locked
        try:
            yield
        finally:
            os.unlink(lock)
            os.close(fd)

    def commit(self, marker: Path, content: dict[str, Any], earlier: Callable[[], dict[str, Any] | None],
               attempt: tuple[Path, Path] | None = None, root: Path | None = None) -> dict[str, Any]:
        """Publish `attempt` (an attempt's file, its final name; `data` in the marker names it as
        published, relative to `root`) and write `content` as the done marker at `marker`, unless
        `earlier()` finds a marker written: the first stands (module docstring), and this
        attempt's file is removed. Returns the marker that stands."""
        with self.marker_lock(marker):
            if (found := earlier()) is not None:
                if attempt is not None:
                    self.remove(attempt[0])
                return found
            if attempt is not None:
                content = {**content, "data": relative(self.publish(*attempt), root)}
            self.write_marker(marker, content)
        return content

    def write_marker(self, path: Path, content: dict[str, Any]) -> None:
        tmp = self.attempt_path(path)
        with self.open_write(tmp) as f:
            f.write(_marker_bytes(content))
            f.flush()
            os.fsync(f.fileno())
        self.publish(tmp, path)

    def read_marker(self, path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def read_markers(self, paths: list[Path]) -> list[dict[str, Any] | None]:
        """Many markers at once (None for each that does not exist)."""
        return [self.read_marker(p) for p in paths]

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


class ObjectStorage(Storage):
    """An object store through fsspec (paths are `upath.UPath`s): no rename; see the module
    docstring for what publishes what."""

    remote = True

    def attempt_path(self, final: Any, deterministic: bool = False) -> Any:
        if deterministic:
            return final
        name = final.name
        stem, dot, ext = name.partition(".")
        return final.with_name(f"{stem}.{uuid.uuid4().hex[:12]}{dot}{ext}")

    def open_write(self, path: Any) -> BinaryIO:
        """An upload: completed by `close()` or a clean `with` exit, aborted by an exception in
        the `with` block or by `discard` (a partial object never appears)."""
        return _Upload(path.fs.open(path.path, "wb"), self, path)

    def discard(self, f: Any, path: Any) -> None:
        f.abort()
        self.remove(path)

    def publish(self, tmp: Any, final: Any) -> Any:
        return tmp  # the marker that records this name publishes it

    def publish_dir(self, tmp: Any, final: Any) -> Any:
        return tmp

    @contextmanager
    def marker_lock(self, marker: Any) -> Iterator[None]:
        """No lock: each attempt's marker names its own objects (module docstring)."""
        yield

    def remove(self, path: Any) -> None:
        where, fs = fs_path(path)
        try:
            fs.rm(where, recursive=True)
        except FileNotFoundError:
            pass

    def exists(self, path: Any) -> bool:
        where, fs = fs_path(path)
        return fs.exists(where)

    def write_marker(self, path: Any, content: dict[str, Any]) -> None:
        where, fs = fs_path(path)
        fs.pipe_file(where, _marker_bytes(content))  # one PUT: the object appears whole

    def read_marker(self, path: Any) -> dict[str, Any] | None:
        where, fs = fs_path(path)
        try:
            return json.loads(fs.cat_file(where))
        except FileNotFoundError:
            return None

    def read_markers(self, paths: list[Any]) -> list[dict[str, Any] | None]:
        """Concurrent GETs (one marker a partition: a run of 100k partitions reads 100k)."""
        if not paths:
            return []
        where = [fs_path(p)[0] for p in paths]
        found = paths[0].fs.cat(where, on_error="omit")
        found = {k.split("://", 1)[-1]: v for k, v in found.items()}
        return [json.loads(found[w]) if w in found else None for w in where]

    def remove_temporaries(self, root: Any) -> int:
        return 0  # attempts are not temporaries here: `remove_unnamed` sweeps what no marker names

    def remove_unnamed(self, folder: Any, named: set[str]) -> int:
        """Delete the attempt-named entries directly in `folder` whose paths (str) are not in
        `named`: attempts of killed or duplicated tasks. Only call when no task is running."""
        where, fs = fs_path(folder)
        try:
            entries = fs.ls(where, detail=False)
        except FileNotFoundError:
            return 0
        removed = 0
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if ATTEMPT_NAME.match(name) and entry.rstrip("/") not in named:  # fs paths, no protocol
                fs.rm(entry, recursive=True)
                removed += 1
        return removed


class _Upload:
    """An fsspec file being uploaded, that an exception aborts instead of completing."""

    def __init__(self, f: Any, storage: ObjectStorage, path: Any):
        self._f, self._storage, self._path = f, storage, path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def write(self, data: Any) -> int:
        return self._f.write(data)

    def abort(self) -> None:
        if not self._f.closed:
            if hasattr(self._f, "discard"):
                self._f.discard()  # a multipart upload aborted, never completed
            self._f.closed = True  # nor completed later by the file's finaliser

    def __enter__(self) -> "_Upload":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._f.close()
        else:
            self._storage.discard(self, self._path)


def _marker_bytes(content: Any) -> bytes:
    return json.dumps(content, sort_keys=True, indent=1).encode()


_LOCAL, _OBJECT = Storage(), ObjectStorage()


def storage_for(path: Any) -> Storage:
    """The storage that commits under `path` (a local path or a store's URL/UPath)."""
    return _OBJECT if is_url(path) else _LOCAL
