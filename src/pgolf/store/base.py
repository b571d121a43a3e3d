"""The object-store interface both backends implement (pgolf.store.file, pgolf.store.s3), and the
helpers they share: key validation, hashing, verified receive, S3 client options.

Both backends behave alike (docs: storage-and-data.md section 5):
- keys are `/`-separated relative paths, validated the same way on both;
- identity is the sha256 stored with every object (S3: `x-amz-meta-sha256` plus a SHA256 checksum;
  file://: a sidecar `.meta/<key>.json`), never the ETag, which is opaque (`md5-N` for multipart);
- `list` yields keys in sorted UTF-8 byte order and pages with `start_after`, no continuation tokens;
- `if_absent` / `if_match` failures raise `PreconditionFailed` (S3's 412).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from pgolf.errors import StoreError
from pgolf.fileio import atomic_write
from pgolf.fileio import sha256_file  # noqa: F401  (the store identifies objects by this hash)

MiB = 1024 * 1024
HASH_CHUNK = 1 * MiB
MAX_KEY_BYTES = 1024  # S3's limit on a key's UTF-8 length


class ObjectNotFound(StoreError):
    """The key does not exist in the store."""


class PreconditionFailed(StoreError):
    """A conditional write lost: `if_absent` found an object, or `if_match` saw another version."""


class ChecksumMismatch(StoreError):
    """Downloaded bytes do not hash to the sha256 recorded with the object."""


class StoreUnavailable(StoreError):
    """The store could not be reached (connection refused, timeout). Worth retrying later."""


@dataclass(frozen=True)
class ObjInfo:
    """What the store knows about one object. `sha256` is the identity; `etag` is opaque."""

    key: str
    size: int
    sha256: str | None = None  # None when the backend cannot tell without a HEAD (S3 listings)
    etag: str | None = None
    mtime: float | None = None  # seconds since the epoch
    metadata: dict[str, str] = field(default_factory=dict)


class ObjectStore(Protocol):
    uri: str

    def put_file(self, key: str, path: str | Path, *, if_absent: bool = False,
                 metadata: dict[str, str] | None = None) -> ObjInfo: ...

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None, metadata: dict[str, str] | None = None) -> ObjInfo: ...

    def get_file(self, key: str, path: str | Path) -> ObjInfo: ...

    def get_bytes(self, key: str) -> bytes: ...

    def head(self, key: str) -> ObjInfo | None: ...

    def list(self, prefix: str = "", *, start_after: str | None = None,
             page_size: int = 1000) -> Iterator[ObjInfo]: ...

    def delete(self, key: str) -> None: ...

    def url(self, key: str, expires: int = 3600) -> str: ...


# ---------------------------------------------------------------------------------------------
# keys and hashing


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise StoreError (one line).

    Refused: empty, absolute, trailing `/`, empty/`.`/`..` segments, backslashes, control
    characters, over 1024 UTF-8 bytes. The same rules guard local paths when pulling, so a
    hostile key in a store can never write outside the destination folder.
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"unsafe object key {key!r}: keys must be non-empty strings")
    reason = None
    if key.startswith("/"):
        reason = "absolute"
    elif key.endswith("/"):
        reason = "trailing '/'"
    elif "\\" in key:
        reason = "backslash"
    elif any(ord(c) < 32 or ord(c) == 127 for c in key):
        reason = "control character"
    elif len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        reason = f"longer than {MAX_KEY_BYTES} bytes"
    else:
        for seg in key.split("/"):
            if seg in ("", ".", ".."):
                reason = f"segment {seg!r}"
                break
    if reason:
        raise StoreError(f"unsafe object key {key!r} ({reason}): use a relative a/b/c path "
                         "without '..', empty segments or backslashes")
    return key


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    """Stream src into dst; return (bytes copied, sha256 hex)."""
    h, n = hashlib.sha256(), 0
    while chunk := src.read(HASH_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def check_sha(uri: str, key: str, expected: str | None, actual: str) -> None:
    if expected and expected != actual:
        raise ChecksumMismatch(f"sha256 mismatch for {uri}/{key}: stored {expected[:16]}…, "
                               f"got {actual[:16]}…; the object is corrupt, re-upload it")


def receive_verified(src: BinaryIO, dest: str | Path, uri: str, key: str, expected: str | None) -> None:
    """Stream an object's bytes into `dest` atomically, hashing on the way: on a sha256 mismatch
    the temp file is dropped and `dest` is left as it was (both backends' get_file)."""

    def write(fh: BinaryIO) -> None:
        _, sha = copy_hashing(src, fh)
        check_sha(uri, key, expected, sha)

    atomic_write(dest, write)


# ---------------------------------------------------------------------------------------------
# client settings and key joining


@dataclass(frozen=True)
class S3Options:
    """Client settings. Retries are bounded (standard mode; total_max_attempts counts the first
    send), so a store that is down costs seconds, not minutes: a request to a server that accepts
    the connection and never answers fails after read_timeout x max_attempts (3 x 10 s). The read
    timeout is the longest silence between two reads, not a cap on a transfer. Endpoint and
    credentials default to boto3's own chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ~/.aws,
    instance roles)."""

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None
    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 4


def join_key(*parts: str) -> str:
    """Join key parts with '/', dropping empty parts (prefix may be '')."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))

