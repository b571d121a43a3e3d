"""Atomic file writes and content hashes: the one implementation every stage uses.

Writes go to a temp file beside the target (a dotfile the store sync never uploads), are fsynced,
then renamed over the target, so a reader or a background sync never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable

HASH_CHUNK = 1 << 20


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call write(fh) on a temp file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """torch.save, atomically. torch's zip writer swallows the OSError of a failed write (a full
    disk, a file size limit) and raises `RuntimeError: unexpected pos`; this re-raises the OSError,
    so the CLI can say what happened in one line."""
    import torch

    def write(fh: IO[bytes]) -> None:
        errors: list[OSError] = []

        class Sink:
            def write(self, data: bytes) -> int:
                try:
                    return fh.write(data)
                except OSError as exc:
                    errors.append(exc)
                    raise

            def flush(self) -> None:
                fh.flush()

        try:
            torch.save(obj, Sink())
        except RuntimeError:
            if errors:
                raise errors[0] from None
            raise

    return atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], payload: Any, *, sort_keys: bool = True,
                      default: Callable[[Any], Any] | None = str) -> Path:
    """Pretty JSON (2-space indent, trailing newline), atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=default) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as fh:
        return sha256_fileobj(fh)


def sha256_fileobj(fh: IO[bytes]) -> str:
    """sha256 of what is left to read in an open binary file."""
    digest = hashlib.sha256()
    while block := fh.read(HASH_CHUNK):
        digest.update(block)
    return digest.hexdigest()
