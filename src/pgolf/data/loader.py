"""Token loaders: the training stream split over ranks (spec §1.3 (a)) and the validation tokens (§1.4).

Training: every rank walks the same sorted shard list in order, wrapping around at the end. Each
optimizer micro-step takes ONE contiguous span of `world_size * (local_tokens + 1)` tokens; rank r
keeps the r-th piece of `local_tokens + 1` tokens, inputs are the first `local_tokens`, targets the
same piece shifted by one. No shuffling, no document masking. Because a single rank with W
accumulation steps consumes pieces of the same length one after the other, it sees exactly the
tokens that W ranks see in one step (the rank split does not change the data).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.shards import count_tokens, read_shard, shard_paths
from pgolf.errors import DataError

log = logging.getLogger(__name__)


def load_val_tokens(data_dir: str | os.PathLike[str], vocab_size: int | None = None) -> np.ndarray:
    """All val shards concatenated as int64, NOT truncated; every token but the first is a target."""
    parts = [read_shard(p, vocab_size) for p in shard_paths(data_dir, "val")]
    tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    if tokens.size < 2:
        raise DataError(f"{data_dir}: the val shards hold {tokens.size} tokens; need at least 2 to score")
    return tokens


class TokenStream:
    """Sequential tokens over shards with wrap-around; shards are memory-mapped lazily, one at a time."""

    def __init__(self, paths: list[Path] | list[str], vocab_size: int | None = None):
        if not paths:
            raise DataError("TokenStream got no shard paths; run `pgolf data offline` or `pgolf data fetch`")
        self.paths = [Path(p) for p in paths]
        self.vocab_size = vocab_size
        if count_tokens(self.paths) == 0:  # validates every header up front, cheap
            raise DataError(f"all {len(self.paths)} shards starting with {self.paths[0]} are empty; rebuild them")
        self.shard_index = 0
        self.position = 0
        self._tokens: np.ndarray | None = None
        self._loaded_index = -1

    def _current(self) -> np.ndarray:
        if self._loaded_index != self.shard_index:
            self._tokens = read_shard(self.paths[self.shard_index], self.vocab_size)
            self._loaded_index = self.shard_index
        assert self._tokens is not None
        return self._tokens

    def _advance(self) -> None:
        self.shard_index = (self.shard_index + 1) % len(self.paths)
        self.position = 0
        if self.shard_index == 0:
            log.info("token stream wrapped around after %d shards", len(self.paths))

    def take(self, n: int) -> np.ndarray:
        """The next n tokens (int64), crossing shard boundaries and wrapping around at the end."""
        if n < 0:
            raise DataError(f"TokenStream.take({n}): count must be >= 0")
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            tokens = self._current()
            available = tokens.size - self.position
            if available <= 0:
                self._advance()
                continue
            k = min(available, n - filled)
            out[filled : filled + k] = tokens[self.position : self.position + k]
            self.position += k
            filled += k
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "shard_index": self.shard_index,
            "position": self.position,
            "shards": [p.name for p in self.paths],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [p.name for p in self.paths]
        if state.get("shards", names) != names:
            raise DataError(
                f"loader state was saved over {len(state['shards'])} shards ({state['shards'][0]}...) but "
                f"DATA_PATH now holds {len(names)}; resume with the same data folder"
            )
        self.shard_index = int(state["shard_index"])
        self.position = int(state["position"])


class DistributedTokenLoader:
    """Per-rank (x, y) batches from one shared, deterministic stream over the train shards."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        rank: int,
        world_size: int,
        vocab_size: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}; check the launcher's RANK/WORLD_SIZE")
        self.rank = rank
        self.world_size = world_size
        self.stream = TokenStream(shard_paths(data_dir, "train"), vocab_size)

    def local_tokens(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> int:
        per_rank = self.world_size * grad_accum_steps
        local = global_tokens // per_rank
        if local < seq_len or local % seq_len:
            raise DataError(
                f"TRAIN_BATCH_TOKENS={global_tokens} over {self.world_size} ranks x {grad_accum_steps} "
                f"accumulation steps gives {local} tokens per micro-batch, not a positive multiple of "
                f"TRAIN_SEQ_LEN={seq_len}; make the batch a multiple of seq_len * ranks * accumulation"
            )
        return local

    def _piece(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> np.ndarray:
        """This rank's local_tokens + 1 tokens of the next micro-step's span."""
        local = self.local_tokens(global_tokens, seq_len, grad_accum_steps)
        span = self.stream.take(self.world_size * (local + 1))
        return span[self.rank * (local + 1) : (self.rank + 1) * (local + 1)]

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """int64 x and y of shape (local_tokens // seq_len, seq_len) for this rank's micro-step."""
        piece = self._piece(global_tokens, seq_len, grad_accum_steps)
        return piece[:-1].reshape(-1, seq_len), piece[1:].reshape(-1, seq_len)

    def next_tensors(self, global_tokens: int, seq_len: int, grad_accum_steps: int,
                     device: Any) -> tuple[Any, Any]:
        """`next_batch` as torch tensors on `device`: ONE copy of this rank's piece, from pinned memory and
        non-blocking on CUDA, so the host goes on queueing work while it travels."""
        import torch

        piece = torch.from_numpy(self._piece(global_tokens, seq_len, grad_accum_steps))
        if torch.device(device).type == "cuda":
            piece = piece.pin_memory().to(device, non_blocking=True)
        return piece[:-1].view(-1, seq_len), piece[1:].view(-1, seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
