"""`pgolf data push DIR --to URI`: stage a data folder in an object store for cloud runs.

Uploads every file the folder's manifest lists (shards, tokenizer) to `<URI>/<dataset>/<file>`, then
`manifest.json` LAST, so a reader that sees the manifest can trust the rest is there (architecture:
store layout). Objects whose stored sha256 already matches are skipped, so a re-push resumes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pgolf.data.manifest import MANIFEST, read_manifest
from pgolf.fileio import sha256_file
from pgolf.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PushResult:
    uri: str
    dataset: str
    uploaded: list[str]
    skipped: list[str]


def dataset_name(data_dir: Path, manifest: dict) -> str:
    """The manifest's dataset id when it is a single path segment, else the folder name."""
    name = str(manifest.get("dataset") or "")
    return name if name and "/" not in name else data_dir.resolve().name


def push(data_dir: str | os.PathLike[str], uri: str, dataset: str | None = None) -> PushResult:
    from tqdm import tqdm

    from pgolf.store import join_key, open_store

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir) if data_dir.is_dir() else None
    if manifest is None:
        raise DataError(f"{data_dir} has no {MANIFEST}; build it first (`pgolf data build|offline|fetch`)")
    name = dataset or dataset_name(data_dir, manifest)
    store = open_store(uri)
    uploaded, skipped = [], []
    entries = manifest["files"]
    for entry in entries:  # check before uploading anything: never stage a folder that changed
        path = data_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise DataError(f"{path} is missing or not {entry['bytes']} bytes as {MANIFEST} says; rebuild or re-fetch {data_dir}")
    with tqdm(total=sum(e["bytes"] for e in entries), unit="B", unit_scale=True, desc="push",
              disable=sum(e["bytes"] for e in entries) < 50_000_000) as bar:
        for entry in entries:
            key = join_key(name, entry["file"])
            sha = entry.get("sha256") or sha256_file(data_dir / entry["file"])
            head = store.head(key)
            if head is not None and head.sha256 == sha:
                skipped.append(key)
            else:
                store.put_file(key, data_dir / entry["file"])
                uploaded.append(key)
            bar.update(entry["bytes"])
    store.put_file(join_key(name, MANIFEST), data_dir / MANIFEST)
    uploaded.append(join_key(name, MANIFEST))
    log.info("pushed %s to %s/%s: %d uploaded, %d already there", data_dir, uri, name, len(uploaded), len(skipped))
    return PushResult(uri=uri, dataset=name, uploaded=uploaded, skipped=skipped)
