"""The store room: one small object-store interface with two backends, `s3://bucket/prefix` and
`file:///dir`, and what pgolf keeps in it.

    base.py      the interface (ObjectStore, ObjInfo, errors), key rules, hashing, S3Options
    file.py      file:// backend (sha256 sidecars, atomic renames)
    s3.py        s3:// backend (boto3, imported only when an s3:// store is opened)
    runstore.py  the layout of a run in the store: objects `<path>@<sha16>`, generations/NNNNNN.json,
                 the manifest pointer (committed generations)
    sync.py      RunSync: a run folder -> the store while it runs, then its final generation
    seaweed.py   the local S3 server, SeaweedFS `weed mini` (`pgolf store up|down`, `make store-up`)

A new backend is a module here that implements ObjectStore, plus a scheme in `open_store`.

Why our own instead of fsspec/s3fs: s3fs pins aiobotocore, which pins botocore and fights a free
boto3; the surface we need (put/get/head/list/delete/url, conditional writes) is small.
"""

from __future__ import annotations

from pathlib import Path

from pgolf.errors import StoreError
from pgolf.store.base import (  # noqa: F401  (the interface, importable as pgolf.store.X)
    HASH_CHUNK,
    MAX_KEY_BYTES,
    ChecksumMismatch,
    MiB,
    ObjectNotFound,
    ObjectStore,
    ObjInfo,
    PreconditionFailed,
    S3Options,
    StoreUnavailable,
    check_sha,
    copy_hashing,
    join_key,
    receive_verified,
    sha256_bytes,
    sha256_file,
    validate_key,
)


def open_store(uri: str, options: S3Options | None = None) -> ObjectStore:
    """`s3://bucket/prefix` -> S3Store, `file:///abs/dir` or `file:rel/dir` -> FileStore."""
    if not isinstance(uri, str) or not uri:
        raise StoreError("empty store URI: give s3://bucket/prefix or file:///abs/dir")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"bad store URI {uri!r}: no bucket; use s3://bucket/prefix")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        from pgolf.store.s3 import S3Store  # boto3 is imported there, only when needed

        return S3Store(bucket, prefix, options or S3Options())
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):  # file://host/... is not supported
                raise StoreError(f"bad store URI {uri!r}: use file:///abs/dir or file:rel/dir")
        if not rest:
            raise StoreError(f"bad store URI {uri!r}: no directory")
        from pgolf.store.file import FileStore

        return FileStore(Path(rest))
    raise StoreError(f"unsupported store URI {uri!r}: use s3://bucket/prefix or file:///abs/dir")
