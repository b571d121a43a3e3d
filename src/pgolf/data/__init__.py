"""Data: the challenge's token shards, the training/validation loaders, exact bits-per-byte accounting,
and the commands that fetch, build, inspect and push datasets.

The reading side (`shards`, `loader`, `bpb`) needs only numpy and sentencepiece, so a GPU machine can
train and score without anything else; `fetch`/`push` import huggingface_hub / pgolf.store lazily.
"""

from pgolf.data.shards import HEADER_BYTES, MAGIC, VERSION, read_shard, shard_paths, write_shard

__all__ = ["HEADER_BYTES", "MAGIC", "VERSION", "read_shard", "shard_paths", "write_shard"]
