"""Every path in react-ray is a URI: a local path, ``file://...`` or ``s3://bucket/key``.

All I/O goes through fsspec so the same code reads a laptop directory and a LAION bucket.
S3 endpoints and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which botocore honours, so a local
S3-compatible server (MinIO, moto) needs no code change, only the environment.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``uri`` and the path inside it (no scheme for local files)."""
    return url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(local_path(uri), *parts)


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    if not is_remote(uri):  # object stores have no directories
        os.makedirs(local_path(uri), exist_ok=True)


def open_uri(uri: str, mode: str = "rb") -> IO:
    return fsspec.open(uri, mode).open()


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Local files go to a temporary name beside the target and are renamed into place; an S3
    PUT is already atomic (the object appears whole or not at all).
    """
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def list_files(uri: str, suffix: str) -> list[str]:
    """Sorted URIs of the files directly under ``uri`` whose names end with ``suffix``."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffix))
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in names]
    return names
