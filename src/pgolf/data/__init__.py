"""Data: the challenge's token shards, the training/validation loaders, exact bits-per-byte accounting,
and the commands that fetch, build, inspect and push datasets.

The reading side (`shards`, `loader`, `bpb`) needs only numpy and sentencepiece, so a GPU machine can
train and score without anything else; `fetch`/`push` import huggingface_hub / pgolf.store lazily.
"""

import os

from pgolf.data.shards import HEADER_BYTES, MAGIC, VERSION, read_shard, shard_paths, write_shard

__all__ = ["HEADER_BYTES", "MAGIC", "VERSION", "read_shard", "shard_paths", "usable_cpus", "write_shard"]


def usable_cpus() -> int:
    """CPUs this process may run on (os.cpu_count() reports the host's, even under a cgroup/affinity)."""
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 16))
    except AttributeError:  # macOS
        return max(1, min(os.cpu_count() or 1, 16))
