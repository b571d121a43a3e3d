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
The CaseOps variant `caseops8192` (technique-spec §1.2, §10) lives in another repository with the same
tree, read from the #1729 record README (records/track_10min_16mb/2026-04-18_PR1626_CaseOps_Taper/, "the HF
dataset repo contains the caseops tokenizer model / vocab, the exported train shards, the exported
validation shard, the validation byte-sidecar shard, manifest.json"), the #1855 record README and the
download commands of #1953/#2019 (`snapshot_download(repo_id="romeerp/parameter-golf-caseops-v1",
allow_patterns=["datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/*",
"datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"])`):
  repo `romeerp/parameter-golf-caseops-v1` (repo_type=dataset):
    datasets/manifest.json         (quoted in the #2127 audits: docs_val 50,000, docs_train 8,181,945)
    datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/fineweb_train_NNNNNN.bin  (80;
        `train_shards: 80` in the accepted logs; #2068's README: "80 .bin files" + "2 .bin files" of val)
    datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/fineweb_val_000000.bin
    datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/fineweb_val_bytes_000000.bin
    datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
Its files are planned from the repository listing (whether its manifest counts the sidecar among the
val files is not documented), and after the download the folder is verified: shard headers, sidecars
aligned 1:1 with the val shards, an 8,192-piece tokenizer reserving the four operators, the canonical
counts and the document-level leakage check (pgolf.data.leakage).

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
from pgolf.data.caseops import TEXT_TRANSFORM
from pgolf.data.manifest import file_entry, write_manifest
from pgolf.data.shards import read_header
from pgolf.errors import DataError

log = logging.getLogger(__name__)

HF_REPO_ID = "willdepueoai/parameter-golf"
HF_ROOT = "datasets"


@dataclass(frozen=True)
class Variant:
    """What `--variant NAME` fetches: where, which folder, which tokenizer, what to verify."""

    name: str
    repo_id: str
    dataset: str  # folder under datasets/datasets/ (and the default local folder name)
    tokenizer: str | None  # file under datasets/tokenizers/; None: named by the HF manifest
    vocab_size: int | None
    caseops: bool = False  # operators reserved in the tokenizer, val byte sidecar required


VARIANTS = {
    "caseops8192": Variant("caseops8192", "romeerp/parameter-golf-caseops-v1",
                           "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                           "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", 8192, caseops=True),
}


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
    leakage: dict[str, Any]


def variant_info(variant: str) -> Variant:
    """`caseops8192`, or the challenge's own `sp<VOCAB>` / `byte260` in willdepueoai/parameter-golf."""
    if variant in VARIANTS:
        return VARIANTS[variant]
    if variant.startswith("sp") and variant[2:].isdigit():
        vocab = int(variant[2:])
        return Variant(variant, HF_REPO_ID, f"fineweb10B_{variant}", f"fineweb_{vocab}_bpe.model", vocab)
    if variant == "byte260":
        return Variant(variant, HF_REPO_ID, "fineweb10B_byte260", None, 260)
    raise DataError(f"unknown variant {variant!r}; use sp<VOCAB> (e.g. sp1024), byte260 or {', '.join(VARIANTS)}")


def dataset_dir_for_variant(variant: str) -> str:
    """`sp1024` -> `fineweb10B_sp1024`, `caseops8192` -> `fineweb10B_sp8192_lossless_caps_caseops_v1_reserved`."""
    return variant_info(variant).dataset


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


def hf_listing_plan(listing: list[str], spec: Variant, train_shards: int) -> tuple[list[RemoteFile], int]:
    """(files to get, train shards available) from a repository file listing, for `spec`'s folder:
    every val shard and byte sidecar, the first train_shards train shards, the tokenizer, the manifest."""
    prefix = f"{HF_ROOT}/datasets/{spec.dataset}/"
    names = sorted(k[len(prefix):] for k in listing if k.startswith(prefix) and "/" not in k[len(prefix):])
    if not any(n.endswith(".bin") for n in names):
        raise DataError(f"{spec.repo_id} has no shards under {prefix}; check --variant or use --source with a mirror")
    available = sum(shard_index_ok(n, "train", 1 << 30) for n in names)
    if train_shards > available:
        raise DataError(f"{spec.dataset} has {available} train shards on {spec.repo_id}, asked for {train_shards}; "
                        "lower --train-shards")
    picked = [n for n in names if shard_index_ok(n, "val", 0) or shard_index_ok(n, "train", train_shards)]
    files = [RemoteFile(prefix + n, n) for n in picked]
    tokenizer = f"{HF_ROOT}/tokenizers/{spec.tokenizer}"
    if tokenizer not in listing:
        raise DataError(f"{spec.repo_id} has no {tokenizer}; the export changed: use --source with a mirror")
    files.append(RemoteFile(tokenizer, Path(tokenizer).name))
    if f"{HF_ROOT}/manifest.json" in listing:
        files.append(RemoteFile(f"{HF_ROOT}/manifest.json", "hf_manifest.json"))
    return files, available


def store_plan(store: Any, dataset: str, spec: Variant, train_shards: int) -> tuple[list[RemoteFile], int]:
    """(files, train shards available) of `dataset` in a store, as `push` lays them out or as a copy
    of the HF tree (whose tokenizers sit in tokenizers/ beside datasets/)."""
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
    if not tokenizers and spec.tokenizer:  # the HF tree keeps tokenizers beside the datasets
        root = prefix[: -len(f"datasets/{dataset}/")] if prefix.endswith(f"datasets/{dataset}/") else ""
        tokenizers = [RemoteFile(i.key, i.key.rsplit("/", 1)[-1], i.size)
                      for i in store.list(f"{root}tokenizers/") if i.key.endswith("/" + spec.tokenizer)]
    picked += tokenizers[:1]
    manifest = [f for f in files if f.name == "manifest.json"]
    return picked + manifest, available


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


def hf_list_files(repo_id: str) -> list[str]:
    """Every file path in a Hugging Face dataset repository (one API call)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise DataError("huggingface_hub is not installed; `pip install 'pgolf[hub]'` or use --source file://|s3://") from None
    try:
        return list(HfApi().list_repo_files(repo_id, repo_type="dataset"))
    except Exception as exc:  # network, auth, 404: one line
        raise DataError(f"listing {repo_id} failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the network or use --source") from None


def hf_downloader(staging: Path, repo_id: str = HF_REPO_ID) -> Callable[[RemoteFile, Path], None]:
    """Download one HF repo file into `dest` (huggingface_hub resumes partial files in staging)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError("huggingface_hub is not installed; `pip install 'pgolf[hub]'` or use --source file://|s3://") from None

    def get(remote: RemoteFile, dest: Path) -> None:
        try:
            local = hf_hub_download(repo_id=repo_id, filename=remote.key, repo_type="dataset", local_dir=staging)
        except Exception as exc:  # network, auth, 404: one line, the file named
            raise DataError(f"download of {repo_id}/{remote.key} failed ({type(exc).__name__}: "
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
    leak_sample_shards: int = 0,
) -> FetchResult:
    """Get val (+ sidecars) + the first `train_shards` train shards + the tokenizer into out_dir; verify
    (headers, sidecars, tokenizer, canonical counts, leakage: pgolf.data.verify); manifest last."""
    from pgolf.data.verify import verify_dataset

    if train_shards < 0:
        raise DataError(f"--train-shards {train_shards} must be >= 0")
    spec = variant_info(variant)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = dataset or spec.dataset
    if source == "hf" and spec.repo_id != HF_REPO_ID:
        get = hf_downloader(out_dir / ".hf", spec.repo_id)
        files, available = hf_listing_plan(hf_list_files(spec.repo_id), spec, train_shards)
    elif source == "hf":
        get = hf_downloader(out_dir / ".hf")
        hf_manifest_path = out_dir / "hf_manifest.json"
        get(RemoteFile(f"{HF_ROOT}/manifest.json", "hf_manifest.json"), hf_manifest_path)
        files = hf_plan(json.loads(hf_manifest_path.read_text(encoding="utf-8")), variant, train_shards)
        available = None
    elif source.startswith(("file:", "s3://")):
        from pgolf.store import open_store

        store = open_store(source)
        files, available = store_plan(store, dataset, spec, train_shards)
        files = [f for f in files if f.name != "manifest.json"]
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
    leakage = verify_dataset(out_dir, tokenizer, variant=variant, train_shards_available=available,
                             leak_sample_shards=leak_sample_shards)
    if tokenizer_out is not None and Path(tokenizer_out).resolve() != tokenizer.resolve():
        Path(tokenizer_out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, tokenizer_out)
    from tqdm import tqdm

    entries = [file_entry(p, out_dir) for p in tqdm(paths, desc="sha256", unit="file", leave=False,
                                                    disable=sum(p.stat().st_size for p in paths) < 500_000_000)]
    info = {"text_transform": TEXT_TRANSFORM} if spec.caseops else {}
    manifest = write_manifest(out_dir, entries, dataset=dataset, variant=variant, source=source,
                              tokenizer={"file": tokenizer.name}, created_by=f"pgolf {__version__}",
                              leakage_check=leakage.as_dict(), **info)
    return FetchResult(out_dir=out_dir, files=paths, tokenizer=tokenizer, downloaded=fetched, manifest=manifest,
                       leakage=leakage.as_dict())
