"""`pgolf data inspect`: shards, tokens and, with a tokenizer, the bytes the bpb denominator counts.

`bytes` for a split is exactly what `val_bpb` would divide by if that split were scored: the sum of
target bytes over the split's concatenated stream (every token but the first is a target), from the
per-token sidecar when the split has one, else from the tokenizer's byte tables (spec §1.5). A CaseOps
tokenizer's tables would count transformed bytes, so a CaseOps split without a sidecar shows no bytes.
`data inspect` also runs pgolf.data.verify (sidecars, CaseOps tokenizer, canonical counts, leakage).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.bpb import ByteTables, load_sentencepiece, load_sidecar, target_bytes
from pgolf.data.manifest import read_manifest
from pgolf.data.shards import count_tokens, read_shard, shard_paths
from pgolf.errors import DataError

CHUNK_TOKENS = 8_000_000  # bounds memory on 100M-token shards


@dataclass
class SplitInfo:
    shards: int
    tokens: int
    bytes: int | None  # None without a tokenizer or sidecar

    @property
    def bytes_per_token(self) -> float | None:
        if self.bytes is None or self.tokens < 2:
            return None
        return self.bytes / (self.tokens - 1)


def find_tokenizer(data_dir: Path) -> Path | None:
    """The folder's tokenizer: the manifest's, else its only *.model file."""
    manifest = read_manifest(data_dir)
    name = ((manifest or {}).get("tokenizer") or {}).get("file")
    if name and (data_dir / name).is_file():
        return data_dir / name
    models = sorted(data_dir.glob("*.model"))
    return models[0] if len(models) == 1 else None


def split_bytes(paths: list[Path], tables: ByteTables) -> int:
    """Sum of target bytes over the concatenation of the shards, chunk by chunk."""
    from tqdm import tqdm

    total = count_tokens(paths)
    done, prev = 0, None
    with tqdm(total=total, unit="tok", unit_scale=True, desc="bytes", leave=False,
              disable=total < 50_000_000) as bar:
        for path in paths:
            tokens = read_shard(path, tables.vocab_size)
            for start in range(0, tokens.size, CHUNK_TOKENS):
                chunk = np.asarray(tokens[start : start + CHUNK_TOKENS], dtype=np.int64)
                if prev is not None:
                    chunk = np.concatenate([[prev], chunk])
                done += int(target_bytes(chunk, tables).sum(dtype=np.int64))
                prev = int(chunk[-1])
                bar.update(chunk.size)
    return done


def inspect_dir(data_dir: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None) -> dict[str, SplitInfo]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder; give a data folder (e.g. data/offline)")
    tok = Path(tokenizer) if tokenizer else find_tokenizer(data_dir)
    tables = None
    if tok is not None:
        from pgolf.data.caseops import operator_ids

        sp = load_sentencepiece(tok)
        if operator_ids(sp) is None:  # ids past the tokenizer: 0 bytes
            tables = ByteTables.from_sentencepiece(tok, max(sp.vocab_size(), 65_536))
    out: dict[str, SplitInfo] = {}
    for split in ("train", "val"):
        try:
            paths = shard_paths(data_dir, split)  # type: ignore[arg-type]
        except DataError:
            if split == "val":
                raise
            paths = []
        tokens = count_tokens(paths)
        sidecar = load_sidecar(data_dir, split)
        if sidecar is not None:
            if sidecar.size != tokens:
                raise DataError(f"{data_dir}: {split} byte sidecar has {sidecar.size} entries for {tokens} tokens; re-fetch both")
            nbytes: int | None = int(sidecar[1:].sum(dtype=np.int64))
        elif tables is not None and paths:
            nbytes = split_bytes(paths, tables)
        else:
            nbytes = None
        out[split] = SplitInfo(shards=len(paths), tokens=tokens, bytes=nbytes)
    return out


def as_json(info: dict[str, SplitInfo]) -> dict[str, Any]:
    return {split: asdict(s) for split, s in info.items()}


def format_table(info: dict[str, SplitInfo]) -> str:
    rows = [("split", "shards", "tokens", "bytes", "bytes/token")]
    for split, s in info.items():
        bpt = s.bytes_per_token
        rows.append((split, f"{s.shards:,}", f"{s.tokens:,}", "-" if s.bytes is None else f"{s.bytes:,}",
                     "-" if bpt is None else f"{bpt:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
