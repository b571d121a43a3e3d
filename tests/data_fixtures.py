"""A dataset folder with the val split cut short, for tests whose runs must take seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pgolf.data.shards import read_shard, shard_paths, sidecar_paths, write_shard


def cut_val(src: Path, out: Path, val_tokens: int) -> Path:
    """`out` = `src`'s train shards (linked), its first `val_tokens` val tokens and, when `src` has one,
    the byte sidecar cut alike (one entry per val token), and its tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for path in shard_paths(src, "train"):
        (out / path.name).symlink_to(path)
    write_shard(out / "fineweb_val_000000.bin", np.asarray(read_shard(shard_paths(src, "val")[0]))[:val_tokens])
    for sidecar in sidecar_paths(src, "val")[:1]:
        write_shard(out / sidecar.name, np.asarray(read_shard(sidecar))[:val_tokens])
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    return out
