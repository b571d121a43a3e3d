"""Fetch the challenge's tokenized FineWeb: from Hugging Face, or from a mirror (file:// or s3://).

Hugging Face layout (read from openai/parameter-golf `data/cached_challenge_fineweb.py` and
`data/README.md`, current HEAD; the older `matched_10B_docs2m_seed1337/` root is gone):
  repo `willdepueoai/parameter-golf` (repo_type=dataset), everything under the subfolder `datasets/`:
    datasets/manifest.json                                  {"datasets": [{"name": "fineweb10B_sp1024",
                                                              "tokenizer_name": ..., "stats": {"files_train": N,
                                                              "files_val": M}}], "tokenizers": [{"name": ...,
                                                              "model_path": "tokenizers/fineweb_1024_bpe.model",
                                                              "vocab_path": ...}]}
    datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin   val shards, numbered from 0
    datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin train shards, numbered from 0 (80 = 8B tokens)
    datasets/tokenizers/fineweb_1024_bpe.model              the tokenizer (path given by the manifest)
A mirror is a store URI holding either what `pgolf data push` writes (`<uri>/<dataset>/{shards,
*.model, manifest.json}`) or a copy of the HF tree (`<uri>/datasets/<dataset>/...` and
`<uri>/tokenizers/*.model`).

Only the files asked for are downloaded, several at a time; files already present with a valid
header (and the listed size) are kept, so an interrupted fetch resumes. Every shard's header and
size are verified afterwards and `manifest.json` (file, bytes, sha256, tokens) is written last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pgolf import __version__
from pgolf.data.manifest import file_entry, write_manifest
from pgolf.data.shards import read_header
from pgolf.errors import DataError

log = logging.getLogger(__name__)

HF_REPO_ID = "willdepueoai/parameter-golf"
HF_ROOT = "datasets"


@dataclass(frozen=True)
class RemoteFile:
    key: str  # path in the source (HF repo path or store key)
    name: str  # file name in the output folder
    size: int | None = None  # when the source says


@dataclass
class FetchResult:
    out_dir: Path
    files: list[Path]
    tokenizer: Path | None
    downloaded: int
    manifest: dict[str, Any]


def dataset_dir_for_variant(variant: str) -> str:
    """`sp1024` -> `fineweb10B_sp1024`, `byte260` -> `fineweb10B_byte260` (the challenge's names)."""
    if variant == "byte260" or (variant.startswith("sp") and variant[2:].isdigit()):
        return f"fineweb10B_{variant}"
    raise DataError(f"unknown variant {variant!r}; use sp<VOCAB> (e.g. sp1024) or byte260")


def shard_index_ok(name: str, split: str, train_shards: int) -> bool:
    if split == "val":
        return name.startswith("fineweb_val_") and name.endswith(".bin")
    if not (name.startswith("fineweb_train_") and name.endswith(".bin")) or "_bytes_" in name:
        return False
    try:
        return int(name[len("fineweb_train_"):-len(".bin")]) < train_shards
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# planning: which files to get


def hf_plan(manifest: dict[str, Any], variant: str, train_shards: int) -> list[RemoteFile]:
    """The HF repo paths for the val shards, the first train_shards train shards and the tokenizer."""
    name = dataset_dir_for_variant(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        have = ", ".join(d.get("name", "?") for d in manifest.get("datasets", []))
        raise DataError(f"{HF_REPO_ID} has no dataset {name} (has: {have or 'none'}); pick another --variant")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise DataError(f"{name} has {n_train} train shards on {HF_REPO_ID}, asked for {train_shards}; lower --train-shards")
    prefix = f"{HF_ROOT}/datasets/{name}"
    files = [RemoteFile(f"{prefix}/fineweb_val_{i:06d}.bin", f"fineweb_val_{i:06d}.bin") for i in range(n_val)]
    files += [RemoteFile(f"{prefix}/fineweb_train_{i:06d}.bin", f"fineweb_train_{i:06d}.bin") for i in range(train_shards)]
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    model_path = (tok or {}).get("model_path") or (tok or {}).get("path")
    if not model_path:
        raise DataError(f"{HF_REPO_ID}/{HF_ROOT}/manifest.json names no tokenizer model for {name}; use --source with a mirror")
    files.append(RemoteFile(f"{HF_ROOT}/{model_path}", Path(model_path).name))
    return files


def store_plan(store: Any, dataset: str, variant: str, train_shards: int) -> list[RemoteFile]:
    """Files of `dataset` in a store, as `push` lays them out or as a copy of the HF tree."""
    vocab = variant[2:] if variant.startswith("sp") else None
    for prefix in (f"{dataset}/", f"{HF_ROOT}/{dataset}/", f"{HF_ROOT}/{HF_ROOT}/{dataset}/"):
        infos = [i for i in store.list(prefix) if "/" not in i.key[len(prefix):]]
        if any(i.key.endswith(".bin") for i in infos):
            break
    else:
        raise DataError(f"no shards under {store.uri}/{dataset}/ (nor datasets/{dataset}/); push or stage them first")
    files = [RemoteFile(i.key, i.key[len(prefix):], i.size) for i in infos]
    picked = [f for f in files if shard_index_ok(f.name, "val", 0) or shard_index_ok(f.name, "train", train_shards)]
    available = sum(shard_index_ok(f.name, "train", 1 << 30) for f in files)
    if available < train_shards:
        raise DataError(f"{store.uri}/{prefix} holds {available} train shards, asked for {train_shards}; lower --train-shards")
    tokenizers = [f for f in files if f.name.endswith(".model")]
    if not tokenizers:  # the HF tree keeps tokenizers beside the datasets
        root = prefix[: -len(f"datasets/{dataset}/")] if prefix.endswith(f"datasets/{dataset}/") else ""
        want = f"fineweb_{vocab}_bpe.model" if vocab else None
        tokenizers = [RemoteFile(i.key, i.key.rsplit("/", 1)[-1], i.size)
                      for i in store.list(f"{root}tokenizers/") if want and i.key.endswith("/" + want)]
    picked += tokenizers[:1]
    manifest = [f for f in files if f.name == "manifest.json"]
    return picked + manifest


# ---------------------------------------------------------------------------------------------
# downloading


def already_have(path: Path, remote: RemoteFile) -> bool:
    """A finished earlier download: right size when known, and a valid header for shards."""
    if not path.is_file() or (remote.size is not None and path.stat().st_size != remote.size):
        return False
    if path.suffix == ".bin":
        try:
            read_header(path)
        except DataError:
            return False
    return True


def hf_downloader(staging: Path) -> Callable[[RemoteFile, Path], None]:
    """Download one HF repo file into `dest` (huggingface_hub resumes partial files in staging)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError("huggingface_hub is not installed; `pip install 'pgolf[hub]'` or use --source file://|s3://") from None

    def get(remote: RemoteFile, dest: Path) -> None:
        try:
            local = hf_hub_download(repo_id=HF_REPO_ID, filename=remote.key, repo_type="dataset", local_dir=staging)
        except Exception as exc:  # network, auth, 404: one line, the file named
            raise DataError(f"download of {HF_REPO_ID}/{remote.key} failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the network or use --source") from None
        os.replace(local, dest)

    return get


def store_downloader(store: Any) -> Callable[[RemoteFile, Path], None]:
    def get(remote: RemoteFile, dest: Path) -> None:
        store.get_file(remote.key, dest)

    return get


def download_all(files: list[RemoteFile], out_dir: Path, get: Callable[[RemoteFile, Path], None],
                 workers: int) -> int:
    """Download the missing files in parallel with a progress bar; returns how many were fetched."""
    from tqdm import tqdm

    todo = [f for f in files if not already_have(out_dir / f.name, f)]
    log.info("%d of %d files to download into %s", len(todo), len(files), out_dir)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(todo), unit="file", desc="fetch", disable=not todo) as bar:
        futures = [pool.submit(get, f, out_dir / f.name) for f in todo]
        for fut in futures:
            fut.result()  # re-raises the first failure (one-line DataError/StoreError)
            bar.update(1)
    return len(todo)


def fetch(
    out_dir: str | os.PathLike[str],
    variant: str = "sp1024",
    train_shards: int = 80,
    source: str = "hf",
    dataset: str | None = None,
    tokenizer_out: str | os.PathLike[str] | None = None,
    workers: int = 8,
) -> FetchResult:
    """Get val + the first `train_shards` train shards + the tokenizer into out_dir; verify; manifest."""
    if train_shards < 0:
        raise DataError(f"--train-shards {train_shards} must be >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = dataset or dataset_dir_for_variant(variant)
    if source == "hf":
        staging = out_dir / ".hf"
        get = hf_downloader(staging)
        hf_manifest_path = out_dir / "hf_manifest.json"
        get(RemoteFile(f"{HF_ROOT}/manifest.json", "hf_manifest.json"), hf_manifest_path)
        files = hf_plan(json.loads(hf_manifest_path.read_text(encoding="utf-8")), variant, train_shards)
    elif source.startswith(("file:", "s3://")):
        from pgolf.store import open_store

        store = open_store(source)
        files = [f for f in store_plan(store, dataset, variant, train_shards) if f.name != "manifest.json"]
        get = store_downloader(store)
    else:
        raise DataError(f"unknown --source {source!r}; use hf, file:///abs/dir or s3://bucket/prefix")

    (out_dir / "manifest.json").unlink(missing_ok=True)  # incomplete until rewritten below
    fetched = download_all(files, out_dir, get, workers)
    shutil.rmtree(out_dir / ".hf", ignore_errors=True)
    paths = [out_dir / f.name for f in files]
    extra = sorted(set(out_dir.glob("fineweb_*.bin")) - set(paths))
    if extra:  # an earlier, larger fetch: the loader globs them, so the manifest must list them too
        log.warning("%d shards beyond this request are already in %s (e.g. %s); keeping them",
                    len(extra), out_dir, extra[0].name)
        paths += extra
    for path in paths:  # verify every shard's header and size
        if path.suffix == ".bin":
            read_header(path)
    tokenizer = next((p for p in paths if p.suffix == ".model"), None)
    if tokenizer is None:
        raise DataError(f"no tokenizer (*.model) found for {dataset} at {source}; stage it beside the shards")
    if tokenizer_out is not None and Path(tokenizer_out).resolve() != tokenizer.resolve():
        Path(tokenizer_out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, tokenizer_out)
    from tqdm import tqdm

    entries = [file_entry(p, out_dir) for p in tqdm(paths, desc="sha256", unit="file", leave=False,
                                                    disable=sum(p.stat().st_size for p in paths) < 500_000_000)]
    manifest = write_manifest(out_dir, entries, dataset=dataset, variant=variant, source=source,
                              tokenizer={"file": tokenizer.name}, created_by=f"pgolf {__version__}")
    return FetchResult(out_dir=out_dir, files=paths, tokenizer=tokenizer, downloaded=fetched, manifest=manifest)
