"""`file://` backend: a directory that behaves like a bucket.

Layout: the object for key `a/b` lives at `<root>/a/b`; its sidecar `<root>/.meta/a/b.json` holds
{sha256, size, mtime_ns, metadata}. The sidecar is trusted only while size and mtime_ns still match
the data file (otherwise the sha256 is recomputed), so a crash between the two renames never makes
the store lie about an object's identity.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

from pgolf.errors import StoreError
from pgolf.store.base import (ObjectNotFound, ObjInfo, PreconditionFailed, check_sha, copy_hashing,
                              receive_verified, sha256_bytes, sha256_file, validate_key)

META_DIR = ".meta"


def is_temp_name(name: str) -> bool:
    """Names of half-written files (`.<name>.tmp-<uuid>`), never listed or served."""
    return name.startswith(".") and ".tmp-" in name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")


class FileStore:
    """A local directory with the ObjectStore interface. Writes are atomic (temp, fsync, rename)."""

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))
        self.uri = "file://" + str(self.root)

    def check_bucket(self) -> None:
        """The folder may be created, but only inside one that exists: a store URI on a disk that
        is not mounted fails here instead of filling the local disk."""
        if not self.root.is_dir() and not self.root.parent.is_dir():
            raise StoreError(f"{self.uri}: neither {self.root} nor its parent exists (is the disk "
                                  "mounted?): create the folder or fix the URI")

    # -- paths ---------------------------------------------------------------------------------

    def _check_key(self, key: str) -> str:
        validate_key(key)
        segs = key.split("/")
        if segs[0] == META_DIR or any(is_temp_name(s) for s in segs):
            raise StoreError(f"unsafe object key {key!r} for {self.uri}: '{META_DIR}/' and "
                                  "'.<name>.tmp-*' names are reserved by the file:// store")
        return key

    def _data(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _meta(self, key: str) -> Path:
        parts = key.split("/")
        return self.root.joinpath(META_DIR, *parts[:-1], parts[-1] + ".json")

    def _check_conflicts(self, key: str) -> None:
        """S3 allows objects `a` and `a/b` side by side; a file system does not. Refuse both ways."""
        segs = key.split("/")
        for i in range(1, len(segs)):
            anc = self.root.joinpath(*segs[:i])
            if anc.is_file():
                raise StoreError(f"key {key!r} conflicts with object {'/'.join(segs[:i])!r} in "
                                      f"{self.uri}: a file:// store cannot hold both; rename one")
        if self._data(key).is_dir():
            raise StoreError(f"key {key!r} conflicts with existing keys under {key + '/'!r} in "
                                  f"{self.uri}: a file:// store cannot hold both; rename one")

    # -- metadata ------------------------------------------------------------------------------

    def _read_meta(self, key: str, st: os.stat_result) -> tuple[str, dict[str, str]]:
        """sha256 and user metadata, recomputing the hash when the sidecar is stale or missing."""
        try:
            meta = json.loads(self._meta(key).read_text(encoding="utf-8"))
            if meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns:
                return str(meta["sha256"]), dict(meta.get("metadata") or {})
        except (OSError, ValueError, KeyError):
            pass
        return sha256_file(self._data(key)), {}

    def _write_meta(self, key: str, sha: str, metadata: dict[str, str]) -> None:
        st = self._data(key).stat()
        path = self._meta(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        body = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "metadata": metadata}
        tmp.write_text(json.dumps(body, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    def _info(self, key: str) -> ObjInfo | None:
        try:
            st = self._data(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(self._data(key)):
            return None
        sha, metadata = self._read_meta(key, st)
        return ObjInfo(key=key, size=st.st_size, sha256=sha, etag=sha, mtime=st.st_mtime,
                       metadata=metadata)

    # -- writes --------------------------------------------------------------------------------

    def _commit(self, key: str, tmp: Path, sha: str, *, if_absent: bool, if_match: str | None,
                metadata: dict[str, str] | None) -> ObjInfo:
        final = self._data(key)
        try:
            if if_match is not None:
                lock_path = self._meta(key).with_suffix(".lock")
                lock_path.parent.mkdir(parents=True, exist_ok=True)
                with open(lock_path, "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    current = self._info(key)
                    if current is None or current.etag != if_match:
                        raise PreconditionFailed(f"{self.uri}/{key} changed (etag is not "
                                                      f"{if_match[:16]}…): re-read it and retry")
                    os.replace(tmp, final)
                    self._write_meta(key, sha, dict(metadata or {}))
            elif if_absent:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise PreconditionFailed(f"{self.uri}/{key} already exists: if_absent "
                                                  "refuses to overwrite it") from None
                tmp.unlink()
                self._write_meta(key, sha, dict(metadata or {}))
            else:
                os.replace(tmp, final)
                self._write_meta(key, sha, dict(metadata or {}))
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        info = self._info(key)
        assert info is not None
        return info

    def _prepare(self, key: str) -> Path:
        self._check_key(key)
        self._check_conflicts(key)
        final = self._data(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        return _temp_path(final)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None, metadata: dict[str, str] | None = None) -> ObjInfo:
        tmp = self._prepare(key)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return self._commit(key, tmp, sha256_bytes(data), if_absent=if_absent,
                                 if_match=if_match, metadata=metadata)

    def put_file(self, key: str, path: str | Path, *, if_absent: bool = False,
                 metadata: dict[str, str] | None = None) -> ObjInfo:
        tmp = self._prepare(key)
        # Hash the bytes as they are copied, so the recorded sha256 matches what was stored
        # even if the source file is still growing (train.log, metrics.jsonl).
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            _, sha = copy_hashing(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        return self._commit(key, tmp, sha, if_absent=if_absent, if_match=None, metadata=metadata)

    # -- reads ---------------------------------------------------------------------------------

    def head(self, key: str) -> ObjInfo | None:
        self._check_key(key)
        return self._info(key)

    def _require(self, key: str) -> ObjInfo:
        info = self.head(key)
        if info is None:
            raise ObjectNotFound(f"no object {self.uri}/{key}: check the key (pgolf results ls)")
        return info

    def get_bytes(self, key: str) -> bytes:
        info = self._require(key)
        data = self._data(key).read_bytes()
        check_sha(self.uri, key, info.sha256, sha256_bytes(data))
        return data

    def get_file(self, key: str, path: str | Path) -> ObjInfo:
        info = self._require(key)
        with open(self._data(key), "rb") as src:
            receive_verified(src, path, self.uri, key, info.sha256)
        return info

    def list(self, prefix: str = "", *, start_after: str | None = None,
             page_size: int = 1000) -> Iterator[ObjInfo]:
        """Keys under `prefix` (a plain string prefix, as in S3) in sorted UTF-8 byte order."""
        base = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        if not base.is_dir():
            return
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != META_DIR]
                rel_dir = ""
            for name in filenames:
                if is_temp_name(name):
                    continue
                key = f"{rel_dir}/{name}" if rel_dir else name
                key = key.replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort(key=lambda k: k.encode("utf-8", "surrogateescape"))
        after = start_after.encode("utf-8", "surrogateescape") if start_after else None
        for key in keys:
            if after is not None and key.encode("utf-8", "surrogateescape") <= after:
                continue
            info = self._info(key)
            if info is not None:  # deleted while we walked
                yield info

    # -- the rest ------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Idempotent, like S3. Empty parent folders are pruned so `a` can later be a key again."""
        self._check_key(key)
        for path, top in ((self._data(key), self.root), (self._meta(key), self.root / META_DIR)):
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != top and parent.is_relative_to(top):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def url(self, key: str, expires: int = 3600) -> str:
        self._check_key(key)
        return self._data(key).as_uri()

