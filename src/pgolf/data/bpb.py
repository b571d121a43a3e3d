"""Exact bits-per-byte accounting (technique-spec §1.5).

    bpb = sum(NLL in nats) / (ln 2 * sum(bytes))

The byte count of a target token depends on the token before it: a piece that starts with "▁"
(U+2581, SentencePiece's space marker) stands for a space byte plus its text, but a word-initial
space right after BOS/control ids is not counted (the document starts there). So

    bytes(t | prev) = base_bytes[t] + (has_leading_space[t] and not is_boundary[prev])

with control / unknown / unused ids as zero-byte boundaries and byte-fallback pieces `<0xNN>` worth
exactly one byte. Datasets whose text was transformed before tokenization (CaseOps) ship a per-token
byte sidecar `fineweb_val_bytes_*.bin` instead; when present it is used and the tables are not built,
and a CaseOps tokenizer without one is an error: the tables would count the transformed text's bytes
(operators included), which is not the challenge's metric (flagged in parameter-golf PR #2138).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.data.shards import read_header, read_shard, shard_paths, sidecar_paths
from pgolf.errors import DataError

SPACE_MARK = "\u2581"  # "▁"


def load_sentencepiece(model_path: str | os.PathLike[str]):
    """A SentencePieceProcessor, or a one-line DataError naming the file."""
    import sentencepiece as spm

    path = Path(model_path)
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found; set TOKENIZER_PATH or run `pgolf data fetch`/`offline`")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"tokenizer {path} is not a SentencePiece model ({first}); re-fetch or rebuild it") from None


def check_tokenizer_vocab(tokenizer_path: str | os.PathLike[str], vocab_size: int) -> None:
    """Fail when the tokenizer can emit ids the model's embedding (VOCAB_SIZE rows) does not have."""
    n = load_sentencepiece(tokenizer_path).vocab_size()
    if n > vocab_size:
        raise DataError(
            f"tokenizer {tokenizer_path} has {n} pieces but VOCAB_SIZE={vocab_size}; "
            f"set VOCAB_SIZE>={n} or use the matching tokenizer"
        )


@dataclass(frozen=True)
class ByteTables:
    """Per-id byte accounting built from a SentencePiece model (arrays of length vocab_size)."""

    base_bytes: np.ndarray  # int32[V]: UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: np.ndarray  # bool[V]: piece starts with "▁" (one space byte unless after BOS)
    is_boundary: np.ndarray  # bool[V]: control/unknown/unused ids (and ids past the tokenizer): 0 bytes

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.size)

    @classmethod
    def from_sentencepiece(cls, model_path: str | os.PathLike[str], vocab_size: int) -> "ByteTables":
        sp = load_sentencepiece(model_path)
        n_pieces = sp.vocab_size()
        if n_pieces > vocab_size:
            raise DataError(
                f"tokenizer {model_path} has {n_pieces} pieces but VOCAB_SIZE={vocab_size}; "
                f"set VOCAB_SIZE>={n_pieces} or use the matching tokenizer"
            )
        base = np.zeros(vocab_size, dtype=np.int32)
        leading = np.zeros(vocab_size, dtype=bool)
        boundary = np.ones(vocab_size, dtype=bool)  # ids the tokenizer never emits count 0 bytes
        for i in range(n_pieces):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            boundary[i] = False
            if sp.is_byte(i):  # "<0xNN>": one raw byte of the text
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith(SPACE_MARK):
                leading[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
        return cls(base_bytes=base, has_leading_space=leading, is_boundary=boundary)


def target_bytes(tokens: np.ndarray, tables: ByteTables) -> np.ndarray:
    """int32 bytes of each target tokens[1:], given the token before it (length len(tokens) - 1)."""
    tokens = np.asarray(tokens)
    if tokens.size < 2:
        return np.zeros(0, dtype=np.int32)
    top = int(tokens.max())
    if top >= tables.vocab_size or int(tokens.min()) < 0:
        raise DataError(
            f"token id {top} is outside the byte tables (vocab {tables.vocab_size}); "
            "the tokens and the tokenizer/VOCAB_SIZE do not match"
        )
    prev, tgt = tokens[:-1], tokens[1:]
    extra = tables.has_leading_space[tgt] & ~tables.is_boundary[prev]
    return (tables.base_bytes[tgt] + extra).astype(np.int32)


def check_sidecar_alignment(data_dir: str | os.PathLike[str]) -> list[Path]:
    """The val byte sidecars, each as long as its val shard (or [] when the folder has none)."""
    sidecars = sidecar_paths(data_dir, "val")
    if not sidecars:
        return []
    shards = shard_paths(data_dir, "val")
    if [p.name.replace("_bytes_", "_") for p in sidecars] != [p.name for p in shards]:
        raise DataError(f"{data_dir}: {len(sidecars)} byte sidecars for {len(shards)} val shards "
                        f"({sidecars[0].name} ... vs {shards[0].name} ...); re-fetch both from the same export")
    for sidecar, shard in zip(sidecars, shards):
        if read_header(sidecar) != read_header(shard):
            raise DataError(f"{sidecar}: {read_header(sidecar):,} byte entries for {read_header(shard):,} tokens in "
                            f"{shard.name}; the sidecar is not aligned 1:1, re-fetch both from the same export")
    return sidecars


def load_sidecar(data_dir: str | os.PathLike[str], split: str = "val") -> np.ndarray | None:
    """The per-token byte counts of a split (int32, aligned 1:1 with its tokens), or None if absent."""
    paths = check_sidecar_alignment(data_dir) if split == "val" else sidecar_paths(data_dir, split)  # type: ignore[arg-type]
    if not paths:
        return None
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int32) for p in paths])


def val_target_bytes(
    data_dir: str | os.PathLike[str],
    tokens: np.ndarray,
    tokenizer_path: str | os.PathLike[str] | None,
) -> np.ndarray:
    """Bytes of every val target tokens[1:]: from the byte sidecar when present, else from the tables."""
    sidecar = load_sidecar(data_dir, "val")
    if sidecar is not None:
        if sidecar.size != len(tokens):
            raise DataError(
                f"{data_dir}: byte sidecar holds {sidecar.size} entries but the val shards hold "
                f"{len(tokens)} tokens; re-fetch both from the same export"
            )
        return sidecar[1:]
    if tokenizer_path is None:
        raise DataError(f"{data_dir} has no fineweb_val_bytes_*.bin sidecar; pass TOKENIZER_PATH for byte tables")
    from pgolf.data.caseops import operator_ids

    sp = load_sentencepiece(tokenizer_path)
    if operator_ids(sp) is not None:
        raise DataError(f"{data_dir}: {tokenizer_path} is a CaseOps tokenizer but the folder has no "
                        "fineweb_val_bytes_*.bin sidecar; bpb must count original bytes: fetch or build it with one")
    n_pieces = sp.vocab_size()
    top = int(np.max(tokens)) + 1 if len(tokens) else 0
    tables = ByteTables.from_sentencepiece(tokenizer_path, max(n_pieces, top))
    return target_bytes(tokens, tables)


def byte_source(data_dir: str | os.PathLike[str], tokenizer_path: str | os.PathLike[str] | None) -> dict:
    """Where the val bytes of bpb come from: {"source": "sidecar" | "tokenizer", "caseops_tokenizer",
    "sidecar_bytes"} (the sidecar's byte sum over the targets when there is one). A CaseOps tokenizer
    rewrites the text, so its own pieces' bytes are not the original's (#2138): only a sidecar will do."""
    from pgolf.data.caseops import operator_ids

    sidecar = load_sidecar(data_dir, "val")
    caseops = False
    if tokenizer_path and Path(tokenizer_path).is_file():
        caseops = operator_ids(load_sentencepiece(tokenizer_path)) is not None
    return {"source": "sidecar" if sidecar is not None else "tokenizer", "caseops_tokenizer": caseops,
            "sidecar_bytes": int(sidecar[1:].astype(np.int64).sum()) if sidecar is not None else None}


def bits_per_byte(nll_sum_nats: float, byte_sum: float) -> float:
    """bpb = sum NLL (nats) / (ln 2 * sum bytes)."""
    if byte_sum <= 0:
        raise DataError(f"cannot compute bits per byte over {byte_sum} bytes; the val targets carry no bytes")
    return float(nll_sum_nats) / (math.log(2.0) * float(byte_sum))
