"""The challenge's token shard format (`fineweb_{train,val}_NNNNNN.bin`), read memory-mapped.

Layout (technique-spec §1.1), little-endian:
    header  256 x int32 = 1,024 bytes: [MAGIC, VERSION, n_tokens, 0, 0, ...]
    payload n_tokens x uint16 token ids

Every defect is reported as one `DataError` line naming the file and the fix; numpy never gets to
raise on a bad file because the header and the size are checked before the memmap is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

from pgolf.errors import DataError
from pgolf.fileio import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4  # 1,024
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN_ID = 65_535  # uint16

Split = Literal["train", "val"]

_REFETCH = "re-create it (`pgolf data fetch` / `pgolf data build`)"


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray) -> None:
    """Write `tokens` as one shard, atomically (temp file + os.replace), so a reader never sees half."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"{path.name}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > MAX_TOKEN_ID):
        bad = int(tokens.max()) if int(tokens.max()) > MAX_TOKEN_ID else int(tokens.min())
        raise DataError(
            f"{path.name}: token id {bad} does not fit the uint16 shard format (0..{MAX_TOKEN_ID}); "
            "use a vocabulary of at most 65,536 pieces"
        )
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    payload = tokens.astype(TOKEN_DTYPE, copy=False)
    atomic_write(path, lambda fh: (fh.write(header.tobytes()), fh.write(payload.tobytes())))


def read_header(path: str | os.PathLike[str]) -> int:
    """Validate magic, version and file size; return the token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found; check DATA_PATH or run `pgolf data fetch`") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read shard ({exc.strerror}); check permissions") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(
            f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header); {_REFETCH}"
        )
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise DataError(
            f"{path}: wrong magic {int(header[0])} (expected {MAGIC}); not a challenge token shard, {_REFETCH}"
        )
    if int(header[1]) != VERSION:
        raise DataError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION}); {_REFETCH}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * n_tokens
    if n_tokens < 0 or size != expected:
        kind = "truncated shard" if size < expected else "size mismatch"
        raise DataError(
            f"{path}: {kind}: {size} bytes on disk but the header says {n_tokens} tokens "
            f"({expected} bytes); {_REFETCH}"
        )
    return n_tokens


def check_vocab(path: str | os.PathLike[str], tokens: np.ndarray, vocab_size: int) -> None:
    """One cheap max() over the shard: ids >= vocab_size mean the shards and tokenizer disagree."""
    if tokens.size == 0:
        return
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(
            f"{path}: token id {top} >= VOCAB_SIZE={vocab_size}; the shards were made with a larger "
            "vocabulary: set VOCAB_SIZE/TOKENIZER_PATH to match or fetch the matching variant"
        )


def read_shard(path: str | os.PathLike[str], vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap (validated; ids checked when vocab_size is given)."""
    n_tokens = read_header(path)
    if n_tokens == 0:
        tokens = np.zeros(0, dtype=TOKEN_DTYPE)
    else:
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    if vocab_size is not None:
        check_vocab(path, tokens, vocab_size)
    return tokens


def shard_paths(data_dir: str | os.PathLike[str], split: Split) -> list[Path]:
    """Sorted `fineweb_{split}_*.bin` in data_dir, without the `*_bytes_*` sidecars."""
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
    data_dir = Path(data_dir)
    pattern = f"fineweb_{split}_*.bin"
    paths = sorted(p for p in data_dir.glob(pattern) if "_bytes_" not in p.name)
    if not paths:
        where = "does not exist" if not data_dir.is_dir() else "has none"
        raise DataError(
            f"no {split} shards: {data_dir}/{pattern} {where}; run `pgolf data offline` or "
            "`pgolf data fetch`, or point DATA_PATH at a shard folder"
        )
    return paths


def sidecar_paths(data_dir: str | os.PathLike[str], split: Split = "val") -> list[Path]:
    """Sorted per-token byte sidecars `fineweb_{split}_bytes_*.bin` (may be empty)."""
    return sorted(Path(data_dir).glob(f"fineweb_{split}_bytes_*.bin"))


def count_tokens(paths: list[Path]) -> int:
    """Total tokens over shards, from the headers only (validated)."""
    return sum(read_header(p) for p in paths)
