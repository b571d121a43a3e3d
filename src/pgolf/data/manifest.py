"""`manifest.json` of a data folder: every file with its size, sha256 and (for shards) token count.

The manifest is written last, so its presence means the folder is complete; `push` uploads it last
for the same reason, and `fetch` / `prepare_offline` compare against it to skip work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pgolf.data.shards import read_header
from pgolf.fileio import atomic_write_json, sha256_file
from pgolf.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "pgolf-data/1"


def split_of(name: str) -> str | None:
    """'train' / 'val' / 'val_bytes' for challenge shard names, else None."""
    if not (name.startswith("fineweb_") and name.endswith(".bin")):
        return None
    if "_bytes_" in name:
        return "val_bytes" if "_val_" in name else "train_bytes"
    if name.startswith("fineweb_train_"):
        return "train"
    if name.startswith("fineweb_val_"):
        return "val"
    return None


def file_entry(path: Path, root: Path, with_sha256: bool = True) -> dict[str, Any]:
    """{file, bytes, sha256[, tokens, split]} for one file (shards are header-validated)."""
    entry: dict[str, Any] = {"file": path.relative_to(root).as_posix(), "bytes": path.stat().st_size}
    if with_sha256:
        entry["sha256"] = sha256_file(path)
    split = split_of(path.name)
    if split is not None:
        entry["split"] = split
        entry["tokens"] = read_header(path)
    return entry


def write_manifest(out_dir: Path, files: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """Write manifest.json (atomically) listing `files` plus split totals and any extra `info`."""
    splits: dict[str, dict[str, int]] = {}
    for entry in files:
        if "split" in entry:
            s = splits.setdefault(entry["split"], {"shards": 0, "tokens": 0})
            s["shards"] += 1
            s["tokens"] += entry["tokens"]
    data = {"format": FORMAT, **info, "splits": splits, "files": sorted(files, key=lambda e: e["file"])}
    atomic_write_json(out_dir / MANIFEST, data, default=None)
    return data


def read_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's manifest, None when absent; a corrupt one is a one-line DataError."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); delete it and rebuild") from None
    if not isinstance(data, dict) or "files" not in data:
        raise DataError(f"{path} has no 'files' list; delete it and rebuild the folder")
    return data


def manifest_files_present(data_dir: Path, manifest: dict[str, Any]) -> bool:
    """Cheap completeness check: every listed file exists with the listed size."""
    for entry in manifest["files"]:
        path = data_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
    return True
