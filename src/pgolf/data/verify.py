"""Is this dataset folder what it claims to be, and safe to train and score on?

`verify_dataset` runs, in this order, the checks `data fetch` and `data inspect` share:
  1. byte sidecars aligned 1:1 with the val shards (same count, same tokens per pair);
  2. a CaseOps folder (its tokenizer reserves the operators, or it claims a CaseOps variant): the
     tokenizer has the variant's vocabulary and one piece per operator, a sidecar exists, and it gives
     0 bytes to BOS and to every operator that is not an escaped literal;
  3. a known export (`caseops8192`): the canonical counts (pgolf.data.leakage.check_canonical);
  4. the document-level leakage check (pgolf.data.leakage.check_leakage).
Each failure is one DataError line; the leakage report is returned for the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pgolf.data import caseops
from pgolf.data.leakage import (
    BOS_ID,
    CANONICAL,
    MAX_OVERLAP_FRACTION,
    LeakReport,
    canonical_for,
    check_canonical,
    check_leakage,
    require_no_leakage,
)
from pgolf.data.bpb import check_sidecar_alignment
from pgolf.data.shards import read_shard, shard_paths
from pgolf.errors import DataError


def check_caseops_sidecar(data_dir: str | os.PathLike[str], operator_ids: dict[str, int]) -> int:
    """Sidecar sanity for a CaseOps folder; returns the original bytes it holds."""
    sidecars = check_sidecar_alignment(data_dir)
    if not sidecars:
        raise DataError(f"{data_dir}: a CaseOps tokenizer but no fineweb_val_bytes_*.bin sidecar: bpb would count "
                        "transformed bytes; fetch or build the dataset with its sidecar")
    esc = operator_ids[caseops.ESC]
    ops = np.array(sorted(operator_ids.values()))
    total, prev = 0, -1
    for shard, sidecar in zip(shard_paths(data_dir, "val"), sidecars):
        tokens, counts = np.asarray(read_shard(shard)), np.asarray(read_shard(sidecar))
        before = np.concatenate([[prev], tokens[:-1]]) if tokens.size else tokens
        marker = np.isin(tokens, ops) & (before != esc)  # an escaped literal operator is 3 real bytes
        bad = np.flatnonzero(((tokens == BOS_ID) | marker) & (counts != 0))
        if bad.size:
            raise DataError(f"{sidecar}: entry {int(bad[0]):,} gives {int(counts[bad[0]])} bytes to token "
                            f"{int(tokens[bad[0]])} (BOS or a CaseOps operator: 0); the sidecar is not this export's")
        total += int(counts.sum(dtype=np.int64))
        prev = int(tokens[-1]) if tokens.size else prev
    if total <= 0:
        raise DataError(f"{data_dir}: the byte sidecars count no bytes; re-fetch them")
    return total


def verify_dataset(data_dir: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None, *,
                   variant: str | None = None, train_shards_available: int | None = None,
                   leak_sample_shards: int = 0, max_overlap_fraction: float = MAX_OVERLAP_FRACTION) -> LeakReport:
    """Run every check above (see the module doc); returns the leakage report."""
    from pgolf.data.bpb import load_sentencepiece

    data_dir = Path(data_dir)
    canonical = CANONICAL.get(variant or "") or canonical_for(data_dir)
    check_sidecar_alignment(data_dir)
    if tokenizer is not None:
        sp = load_sentencepiece(tokenizer)
        ops = caseops.operator_ids(sp)
        if canonical is not None or ops is not None:
            ops = caseops.check_caseops_tokenizer(sp, str(tokenizer), canonical.vocab_size if canonical else None)
            check_caseops_sidecar(data_dir, ops)
    if canonical is not None:
        check_canonical(data_dir, canonical, train_shards_available)
    report = check_leakage(data_dir, sample_shards=leak_sample_shards, max_overlap_fraction=max_overlap_fraction)
    require_no_leakage(report, data_dir)
    return report
