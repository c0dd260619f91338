"""Every path in react-ray is a URI: a local path, ``file://...`` or ``s3://bucket/key``.

All I/O goes through fsspec so the same code reads a laptop directory and a LAION bucket.
S3 endpoints and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which botocore honours, so a local
S3-compatible server (MinIO, moto) needs no code change, only the environment.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``uri`` and the path inside it (no scheme for local files). Object
    stores without a listing cache: other processes (Ray workers) write where this one looks."""
    return url_to_fs(uri, **({"use_listings_cache": False} if is_remote(uri) else {}))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(local_path(uri), *parts)


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    if not is_remote(uri):  # object stores have no directories
        os.makedirs(local_path(uri), exist_ok=True)


def open_uri(uri: str, mode: str = "rb") -> IO:
    fs, path = filesystem(uri)
    return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file."""
    with atomic_writer(uri) as f:
        f.write(data)


@contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """A binary file to stream into; it appears at ``uri`` whole, only if the block succeeds.

    Local: a temporary sibling renamed into place. S3: a (multipart) upload, which the store
    only makes visible when it completes.
    """
    if is_remote(uri):
        fs, path = filesystem(uri)
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            # Not ``with``: its exit would close, and closing completes the upload of the part
            # written so far. Abort it (a multipart upload; a small file was never sent).
            f.discard()
            f.closed = True
            raise
        f.close()
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def list_files(uri: str, suffix: str) -> list[str]:
    """Sorted URIs of the files directly under ``uri`` whose names end with ``suffix``."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return _uris(uri, (p for p in fs.ls(path, detail=False) if p.endswith(suffix)))


def file_size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def file_sizes(uri: str, suffix: str) -> dict[str, int]:
    """{URI: size in bytes} of the files directly under ``uri`` whose names end with ``suffix``."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return {}
    entries = [
        e
        for e in fs.ls(path, detail=True)
        if e["name"].endswith(suffix) and e.get("type") != "directory"
    ]
    return dict(
        zip(
            _uris(uri, [e["name"] for e in entries]),
            [int(e["size"]) for e in sorted(entries, key=lambda e: e["name"])],
        )
    )


def find_files(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted URIs of the files anywhere under ``uri`` whose names end with one of ``suffixes`` (any
    case)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return _uris(uri, (p for p in fs.find(path) if p.lower().endswith(suffixes)))


def _uris(uri: str, paths) -> list[str]:
    names = sorted(paths)
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in names]
    return names


def cache_dir() -> Path:
    """Where remote files are cached locally: ``$REACT_RAY_CACHE`` or ``~/.cache/react-ray``."""
    return Path(os.environ.get("REACT_RAY_CACHE", Path.home() / ".cache" / "react-ray"))


def local_copy(uri: str) -> str:
    """A local path for ``uri``: itself when local, else a cached download keyed by the URI."""
    if not is_remote(uri):
        return local_path(uri)
    target = (
        cache_dir()
        / "files"
        / hashlib.sha256(uri.encode()).hexdigest()[:16]
        / os.path.basename(uri)
    )
    if not target.exists():
        write_bytes_atomic(str(target), read_bytes(uri))
    return str(target)
