"""Validation leakage guard: refuse a dataset whose train shards contain validation documents.

Why (technique-spec §7.1 item 9, §10): `prepare_caseops_data.py` defaults to `--val-docs 10000`, so its
train stream starts at document 10,000 while validation is documents 0-49,999; 80% of validation was
trained on, and five top CaseOps submissions were voided for it (parameter-golf issue #2127; fingerprint
`train_shards: 1499`). Only the canonical export is accepted: 80 train shards, 47,851,520 scored
validation tokens, 50,000 validation documents.

Two checks, both cheap enough to run on every fetch:
  * counts (`check_canonical`): for a known variant, the train shard count, the val documents and the
    scored val targets must be the canonical ones (catches the 1,499-shard and 10,000-doc builds);
  * documents (`check_leakage`): every document (a BOS-delimited token run) of the val stream is hashed,
    then every train document no longer than the longest val document; a hit is confirmed by comparing
    the tokens, so `overlapping_docs` is exact. This also catches an 80-shard leaky build, which passes
    the counts. Hashes are 64-bit polynomial hashes of each span, computed for a whole chunk of the
    stream at once with numpy (one multiply and one cumulative sum per token); shards are hashed in
    parallel threads and documents crossing a shard boundary are stitched afterwards.
Exact duplicates occur naturally in web text, so up to MAX_OVERLAP_FRACTION of val documents may appear
in train before the dataset is refused; the known leak was 80%. Every count is reported.

A run's summary.json asks the same question of the data it trained on: `val_shards_in_training`
(whole val shards also read as train) and `val_docs_in_training` (this report, never raised).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.shards import read_shard, shard_paths
from pgolf.errors import DataError

log = logging.getLogger(__name__)

BOS_ID = 1
MAX_OVERLAP_FRACTION = 0.01  # natural exact duplicates tolerated; the voided builds overlapped 80%
CHUNK_TOKENS = 1 << 22  # 4M tokens per hashing step: ~130 MB of uint64 work arrays per thread
_P = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_P_INV = pow(_P, -1, 1 << 64)
_LEN_MIX = 0xC2B2AE3D27D4EB4F
_TOO_LONG = -1  # a carried fragment that already exceeds every val document


@dataclass(frozen=True)
class Canonical:
    """The accepted shape of a published export (spec §10)."""

    variant: str
    dataset_dir: str
    train_shards: int
    val_docs: int
    val_targets: int  # floor((val_tokens - 1) / seq_len) * seq_len: what every accepted log prints
    vocab_size: int
    seq_len: int = 2048


CANONICAL = {
    "caseops8192": Canonical("caseops8192", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                             train_shards=80, val_docs=50_000, val_targets=47_851_520, vocab_size=8192),
}
LEAKY_FINGERPRINT = ("`train_shards: 1499` is the fingerprint of prepare_caseops_data.py's default "
                     "--val-docs 10000, which put 80% of val into train (parameter-golf issue #2127)")


@dataclass
class LeakReport:
    method: str
    checked_docs: int  # val documents hashed
    overlapping_docs: int  # val documents whose exact tokens are a train document
    allowed_docs: int
    train_docs: int
    train_tokens: int
    train_shards_checked: int
    train_shards: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.overlapping_docs <= self.allowed_docs

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ---------------------------------------------------------------------------------------------
# hashing document spans


class _Powers:
    """P**i and P**-i mod 2**64 for i < n, grown on demand; the threads share them read-only."""

    def __init__(self) -> None:
        self.tables = (np.ones(0, dtype=np.uint64), np.ones(0, dtype=np.uint64))
        self.lock = threading.Lock()

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:  # both tables replaced at once: a reader never sees one grown and not the other
            if self.tables[0].size < n:
                size = max(n, CHUNK_TOKENS)
                steps = [np.full(size, base, dtype=np.uint64) for base in (_P, _P_INV)]
                for s in steps:
                    s[0] = 1
                self.tables = tuple(np.cumprod(s, dtype=np.uint64) for s in steps)  # wraps mod 2**64, as intended
            return self.tables


_POWERS = _Powers()


def span_keys(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """uint64 key of each span tokens[start:end] (a polynomial hash mixed with the length)."""
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    lo, hi = int(starts.min()), int(ends.max())
    seg = np.asarray(tokens[lo:hi])
    pw, inv = _POWERS.upto(seg.size)
    x = np.add(seg, np.uint64(1), dtype=np.uint64, casting="unsafe")  # + 1: token 0 still counts
    np.multiply(x, pw[: seg.size], out=x)
    prefix = np.empty(seg.size + 1, dtype=np.uint64)
    prefix[0] = 0
    np.cumsum(x, out=prefix[1:])
    s, e = starts - lo, ends - lo
    keys = (prefix[e] - prefix[s]) * inv[s]
    keys += (e - s).astype(np.uint64) * np.uint64(_LEN_MIX)
    return keys


@dataclass
class _ShardDocs:
    keys: np.ndarray
    starts: np.ndarray  # token offsets in the shard
    lengths: np.ndarray
    head: np.ndarray | int  # tokens before the first BOS (the whole shard without one), or _TOO_LONG
    tail: np.ndarray | int  # tokens after the last BOS, or _TOO_LONG
    bos: int  # documents starting in this shard
    tokens: int


def _clip(fragment: np.ndarray, max_len: int | None) -> np.ndarray | int:
    return _TOO_LONG if max_len is not None and fragment.size > max_len else np.array(fragment)


def _among(keys: np.ndarray, sorted_keys: np.ndarray | None) -> np.ndarray:
    """Mask of the keys present in sorted_keys (all True without a filter)."""
    if sorted_keys is None:
        return np.ones(keys.size, dtype=bool)
    if sorted_keys.size == 0:
        return np.zeros(keys.size, dtype=bool)
    slot = np.searchsorted(sorted_keys, keys).clip(max=sorted_keys.size - 1)
    return sorted_keys[slot] == keys


def _shard_docs(path: Path, max_len: int | None, only: np.ndarray | None = None) -> _ShardDocs:
    """Keys of the complete documents inside one shard (those no longer than max_len, and only those
    whose key is in `only` when given, so memory stays with the hits), plus the fragments at its ends,
    which belong to documents crossing into the neighbouring shards."""
    tokens = read_shard(path)
    bos = np.flatnonzero(tokens == BOS_ID)
    if bos.size == 0:
        return _ShardDocs(np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                          _clip(tokens, max_len), _TOO_LONG, 0, tokens.size)
    starts, ends = bos[:-1] + 1, bos[1:]  # complete documents: after one BOS, up to the next
    lengths = ends - starts
    keep = lengths > 0
    if max_len is not None:
        keep &= lengths <= max_len
    starts, ends = starts[keep], ends[keep]
    keys, pos = [], 0
    while pos < starts.size:  # chunks of whole documents, ~CHUNK_TOKENS each (at least one document)
        stop = max(pos + 1, int(np.searchsorted(ends, starts[pos] + CHUNK_TOKENS, side="right")))
        keys.append(span_keys(tokens, starts[pos:stop], ends[pos:stop]))
        pos = stop
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    hit = _among(all_keys, only)
    return _ShardDocs(
        keys=all_keys[hit], starts=starts[hit], lengths=(ends - starts)[hit],
        head=_clip(tokens[: bos[0]], max_len), tail=_clip(tokens[bos[-1] + 1:], max_len), bos=bos.size,
        tokens=tokens.size,
    )


@dataclass
class StreamDocs:
    """Every document of a split's stream: key, where it is (shard index, offset) and its length."""

    keys: np.ndarray
    shard: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    stitched: list[np.ndarray]  # documents crossing shard boundaries (shard = -1 - index here)
    paths: list[Path]
    docs: int
    tokens: int

    def doc_tokens(self, i: int) -> np.ndarray:
        if self.shard[i] < 0:
            return self.stitched[-1 - int(self.shard[i])]
        data = read_shard(self.paths[int(self.shard[i])])
        return np.asarray(data[int(self.starts[i]): int(self.starts[i] + self.lengths[i])])


def stream_docs(paths: list[Path], max_len: int | None = None, workers: int = 1,
                stitch: bool = True, only: np.ndarray | None = None) -> StreamDocs:
    """Hash the documents of the concatenated shards (in parallel), stitching the boundary ones; with
    `only` (sorted keys), keep just the documents whose key is among them."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        parts = list(pool.map(lambda p: _shard_docs(p, max_len, only), paths))
    keys = [p.keys for p in parts]
    shard = [np.full(p.keys.size, i, dtype=np.int64) for i, p in enumerate(parts)]
    starts, lengths = [p.starts for p in parts], [p.lengths for p in parts]
    stitched: list[np.ndarray] = []
    if stitch:
        for doc in _stitch(parts, max_len):
            key = span_keys(doc, np.array([0]), np.array([doc.size]))
            if not _among(key, only)[0]:
                continue
            stitched.append(doc)
            keys.append(key)
            shard.append(np.array([-len(stitched)]))
            starts.append(np.zeros(1, np.int64))
            lengths.append(np.array([doc.size]))
    return StreamDocs(keys=np.concatenate(keys), shard=np.concatenate(shard), starts=np.concatenate(starts),
                      lengths=np.concatenate(lengths), stitched=stitched, paths=list(paths),
                      docs=sum(p.bos for p in parts) + int(bool(parts) and _nonempty(parts[0].head)),
                      tokens=sum(p.tokens for p in parts))


def _stitch(parts: list[_ShardDocs], max_len: int | None) -> list[np.ndarray]:
    """Documents that cross shard boundaries, and the fragment before the stream's first BOS."""
    out: list[np.ndarray] = []
    carry: np.ndarray | int = parts[0].head if parts else _TOO_LONG
    for i, part in enumerate(parts):
        if i > 0:
            carry = _join(carry, part.head, max_len)
        if part.bos:  # the carried document ends at this shard's first BOS
            if _nonempty(carry):
                out.append(carry)  # type: ignore[arg-type]
            carry = part.tail
    if _nonempty(carry):
        out.append(carry)  # type: ignore[arg-type]
    return out


def _nonempty(fragment: np.ndarray | int) -> bool:
    return not isinstance(fragment, int) and fragment.size > 0


def _join(a: np.ndarray | int, b: np.ndarray | int, max_len: int | None) -> np.ndarray | int:
    if isinstance(a, int) or isinstance(b, int):
        return _TOO_LONG
    return _clip(np.concatenate([a, b]), max_len)


# ---------------------------------------------------------------------------------------------
# the checks


def _sample(paths: list[Path], n: int) -> list[Path]:
    if n <= 0 or n >= len(paths):
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def check_leakage(data_dir: str | os.PathLike[str], sample_shards: int = 0, workers: int | None = None,
                  max_overlap_fraction: float = MAX_OVERLAP_FRACTION) -> LeakReport:
    """Hash every val document and every train document (of `sample_shards` evenly spaced train shards
    when > 0) and count the val documents found in train, confirmed token by token."""
    from pgolf.data import usable_cpus

    started = time.perf_counter()
    data_dir = Path(data_dir)
    workers = workers or min(8, usable_cpus())
    val = stream_docs(shard_paths(data_dir, "val"), workers=workers)
    all_train = shard_paths(data_dir, "train")
    train_paths = _sample(all_train, sample_shards)
    max_len = int(val.lengths.max()) if val.lengths.size else 0
    order = np.argsort(val.keys, kind="stable")
    sorted_keys = val.keys[order]
    train = stream_docs(train_paths, max_len=max_len, workers=workers, stitch=len(train_paths) == len(all_train),
                        only=sorted_keys)  # every train doc is hashed; only the hash hits are kept
    overlapping: set[int] = set()
    for t in range(train.keys.size):  # confirm each hash hit token by token (and count duplicate val docs)
        train_doc = train.doc_tokens(t)
        lo, hi = np.searchsorted(sorted_keys, train.keys[t], "left"), np.searchsorted(sorted_keys, train.keys[t], "right")
        for v in order[lo:hi].tolist():
            if v not in overlapping and np.array_equal(val.doc_tokens(v), train_doc):
                overlapping.add(v)
    sampled = len(train_paths) < len(all_train)
    shards = f"{len(train_paths)} of {len(all_train)}" if sampled else f"{len(all_train)}"
    method = (f"doc-hash: {val.keys.size:,} val docs vs every doc of {shards} train "
              f"shard{'s' if len(all_train) != 1 else ''}{' (sampled)' if sampled else ''}")
    report = LeakReport(method=method, checked_docs=int(val.keys.size), overlapping_docs=len(overlapping),
                        allowed_docs=int(max_overlap_fraction * val.keys.size), train_docs=train.docs,
                        train_tokens=train.tokens, train_shards_checked=len(train_paths),
                        train_shards=len(all_train), seconds=round(time.perf_counter() - started, 3))
    log.info("leakage check: %s: %d overlapping (%.1f s)", method, report.overlapping_docs, report.seconds)
    return report


def require_no_leakage(report: LeakReport, data_dir: str | os.PathLike[str]) -> None:
    if not report.ok:
        pct = 100.0 * report.overlapping_docs / max(report.checked_docs, 1)
        raise DataError(
            f"{data_dir}: {report.overlapping_docs:,} of {report.checked_docs:,} validation documents "
            f"({pct:.1f}%) are also train documents (tolerance {report.allowed_docs:,}); training on them "
            "voids a run: rebuild with disjoint splits or fetch the canonical export"
        )


def val_stats(data_dir: str | os.PathLike[str], seq_len: int) -> tuple[int, int]:
    """(val documents = BOS count, scored targets at seq_len) of a folder's val shards."""
    tokens = docs = 0
    for path in shard_paths(data_dir, "val"):
        shard = read_shard(path)
        tokens += shard.size
        docs += int(np.count_nonzero(shard == BOS_ID))
    return docs, max(tokens - 1, 0) // seq_len * seq_len


def check_canonical(data_dir: str | os.PathLike[str], canonical: Canonical,
                    train_shards_available: int | None = None) -> None:
    """Refuse a folder (or a source holding `train_shards_available`) whose counts are not the export's."""
    n_train = len(shard_paths(data_dir, "train")) if train_shards_available is None else train_shards_available
    where = f"{data_dir}" if train_shards_available is None else "the source"
    if n_train > canonical.train_shards:
        raise DataError(f"{where} holds {n_train:,} train shards; the canonical {canonical.variant} export has "
                        f"{canonical.train_shards}. {LEAKY_FINGERPRINT}; fetch the canonical export")
    docs, targets = val_stats(data_dir, canonical.seq_len)
    if (docs, targets) != (canonical.val_docs, canonical.val_targets):
        raise DataError(f"{data_dir}: validation has {docs:,} documents / {targets:,} scored tokens, the canonical "
                        f"{canonical.variant} export {canonical.val_docs:,} / {canonical.val_targets:,}; a "
                        "rebuilt split is not the challenge's (issue #2127): fetch the canonical export")


def canonical_for(data_dir: str | os.PathLike[str]) -> Canonical | None:
    """The canonical spec a folder claims to be: by its manifest's variant, else by its folder name."""
    from pgolf.data.manifest import read_manifest

    data_dir = Path(data_dir)
    variant = ((read_manifest(data_dir) if data_dir.is_dir() else None) or {}).get("variant")
    if variant in CANONICAL:
        return CANONICAL[variant]
    return next((c for c in CANONICAL.values() if c.dataset_dir == data_dir.resolve().name), None)


def leakage_report(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """{checked_docs, overlapping_docs, method, ...} for a run's compliance: the data manifest's record
    while the folder still holds exactly the files it lists, else a full check computed now."""
    from pgolf.data.manifest import manifest_files_present, read_manifest

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir) if data_dir.is_dir() else None
    record = (manifest or {}).get("leakage_check")
    if record and manifest_files_present(data_dir, manifest):
        listed = {e["file"] for e in manifest["files"] if e.get("split") in ("train", "val")}
        present = {p.name for split in ("train", "val") for p in shard_paths(data_dir, split)}  # type: ignore[arg-type]
        if listed == present:
            return dict(record, source="data manifest")
    return dict(check_leakage(data_dir).as_dict(), source="computed at run time")


def record_in_manifest(data_dir: Path, report: LeakReport) -> None:
    """Add the report to an existing manifest.json (atomically)."""
    from pgolf.fileio import atomic_write_json

    path = data_dir / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["leakage_check"] = report.as_dict()
    atomic_write_json(path, data, default=None)


def val_shards_in_training(data_path: str) -> int:
    """How many validation shards the training stream could read: val files that are also train
    files by name or by content (sha256, from the data manifest when it lists the file, else hashed).

    Training and calibration read only `fineweb_train_*` through `shard_paths(..., "train")`, so a
    non-zero count means the dataset itself leaks validation text into training (spec §7.1 item 9).
    """
    from pgolf.data.manifest import read_manifest
    from pgolf.fileio import sha256_file

    data_dir = Path(data_path)
    listed = {e["file"]: e.get("sha256") for e in (read_manifest(data_dir) or {"files": []})["files"]}

    def digest(path: Path) -> str:
        return listed.get(path.name) or sha256_file(path)

    train, val = shard_paths(data_dir, "train"), shard_paths(data_dir, "val")
    train_digests = {digest(p) for p in train}
    train_names = {p.resolve() for p in train}
    return sum(1 for p in val if p.resolve() in train_names or digest(p) in train_digests)


def val_docs_in_training(data_path: str) -> dict[str, Any]:
    """The dataset's document-level leakage check (`leakage_report`): from its data manifest when
    recorded there, else computed now; a failure to check is recorded, never raised."""
    from pgolf.errors import PgolfError

    try:
        return leakage_report(data_path)
    except PgolfError as exc:
        return {"error": str(exc)}
