"""Input files at fsspec URLs (s3://, gs://, ...), beside local paths: listing, facts, opening.

Sources that read files of records (`url_list`, `text_corpus`, `obelics`), WebDataset tars
(`webdataset`) and WARC files (`warc`) accept a URL wherever they accept a path: a file, a
folder (its files matching the source's patterns) or a glob. Folders of loose files
(`image_folder`, `html_files`) stay local: they resolve symlinks to keep reads inside the folder.
Credentials and endpoint come from the store's usual environment, on the driver and on the
workers. A file's fingerprint on a store is its size and ETag (or modification time): a changed
object refuses a resume, as a changed local file does.
"""

from __future__ import annotations

import glob
import os
import posixpath
from typing import IO, Any

from curate.storage import fs_path, is_url, location


def remote_matches(pattern: str, folder_patterns: tuple[str, ...] | list[str] | None) -> tuple[list[str], bool]:
    """(URLs of the files `pattern` names, whether it named a folder). A folder stands for its
    files matching `folder_patterns` (None: a folder names nothing)."""
    where, fs = fs_path(location(pattern))
    if fs.isdir(where):
        matches = [m for p in folder_patterns or () for m in fs.glob(posixpath.join(where, p))]
        folder = True
    else:
        matches = fs.glob(where) if glob.has_magic(where) else ([where] if fs.exists(where) else [])
        folder = False
    return sorted({fs.unstrip_protocol(m) for m in matches if fs.isfile(m)}), folder


def file_facts(path: Any) -> tuple[int, Any]:
    """(size, version) of an input file for fingerprints: the mtime in ns on a local disk, the
    ETag (else the modification time) on a store."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    where, fs = fs_path(location(path))
    info = fs.info(where)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") \
        or info.get("updated")
    return int(info["size"]), str(version)


def open_input(path: Any) -> IO[bytes]:
    """An input file opened for binary reading (random access on a store too)."""
    if not is_url(path):
        return open(path, "rb")
    where, fs = fs_path(location(path))
    return fs.open(where, "rb")


def input_labels(paths: list[Any]) -> list[str]:
    """Each file's path relative to the common folder of all of them (posix): the ids' `<file>`."""
    if not paths:
        return []
    names = [fs_path(location(p))[0] if is_url(p) else os.path.abspath(p) for p in paths]
    root = posixpath.commonpath([posixpath.dirname(n) for n in names])
    return [posixpath.relpath(n, root) for n in names]


def local_folder(path: str, kind: str) -> str:
    """A recipe check for the sources that read a local folder only."""
    if is_url(path):
        raise ValueError(f"{kind} reads a local folder, got the URL {path!r}; for inputs on an object "
                         "store use url_list, webdataset, text_corpus, obelics or warc")
    return path
