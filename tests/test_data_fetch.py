"""Fetching from a mirror (file:// store; Hugging Face itself is unreachable from CI), and pushing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pgolf.data.fetch import dataset_dir_for_variant, fetch, hf_plan
from pgolf.data.manifest import read_manifest, sha256_file
from pgolf.data.push import push
from pgolf.data.shards import read_shard, shard_paths, write_shard
from pgolf.errors import DataError, PgolfError

# The shape of willdepueoai/parameter-golf's datasets/manifest.json, as its downloader reads it.
HF_MANIFEST = {
    "datasets": [
        {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
         "stats": {"files_train": 80, "files_val": 1}},
        {"name": "fineweb10B_sp4096", "tokenizer_name": "sp_bpe_4096",
         "stats": {"files_train": 50, "files_val": 2}},
    ],
    "tokenizers": [
        {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        {"name": "sp_bpe_4096", "model_path": "tokenizers/fineweb_4096_bpe.model"},
    ],
}


def test_hf_plan_asks_only_for_what_is_needed():
    plan = hf_plan(HF_MANIFEST, "sp1024", 3)
    assert [f.key for f in plan] == [
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model",
    ]
    assert [f.name for f in hf_plan(HF_MANIFEST, "sp4096", 0)] == [
        "fineweb_val_000000.bin", "fineweb_val_000001.bin", "fineweb_4096_bpe.model"]
    with pytest.raises(DataError, match="has 80 train shards .* asked for 81"):
        hf_plan(HF_MANIFEST, "sp1024", 81)
    with pytest.raises(DataError, match="no dataset fineweb10B_sp2048"):
        hf_plan(HF_MANIFEST, "sp2048", 1)
    assert dataset_dir_for_variant("byte260") == "fineweb10B_byte260"
    with pytest.raises(DataError, match="unknown variant"):
        dataset_dir_for_variant("gpt2")


@pytest.fixture
def small_dataset(offline_data, tmp_path):
    """A 3-train-shard copy of a slice of the offline dataset, with its own manifest (via build)."""
    from pgolf.data.build import build_dataset
    import json

    with open(offline_data / "docs.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for _, line in zip(range(40), fh)]
    out = tmp_path / "small"
    build_dataset(docs, out, tokenizer=offline_data / "tokenizer.model", val_docs=5, shard_tokens=8000,
                  info={"dataset": "small-set"})
    assert len(shard_paths(out, "train")) >= 3
    return out


def test_push_then_fetch_round_trip(small_dataset, tmp_path):
    store_dir = tmp_path / "store"
    result = push(small_dataset, f"file://{store_dir}")
    assert result.dataset == "small-set" and result.uploaded[-1] == "small-set/manifest.json"
    assert (store_dir / "small-set" / "tokenizer.model").is_file()
    again = push(small_dataset, f"file://{store_dir}")
    assert again.uploaded == ["small-set/manifest.json"] and len(again.skipped) == len(result.uploaded) - 1

    out = tmp_path / "fetched"
    tok_copy = tmp_path / "tokenizers" / "tok.model"
    got = fetch(out, train_shards=2, source=f"file://{store_dir}", dataset="small-set", tokenizer_out=tok_copy)
    vals = [p.name for p in shard_paths(small_dataset, "val")]
    assert got.downloaded == 3 + len(vals)
    assert [p.name for p in shard_paths(out, "train")] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    for p in [*shard_paths(out, "train"), *shard_paths(out, "val")]:
        np.testing.assert_array_equal(read_shard(p), read_shard(small_dataset / p.name))
    manifest = read_manifest(out)
    assert {e["file"] for e in manifest["files"]} == {
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "tokenizer.model", *vals}
    for e in manifest["files"]:
        assert e["sha256"] == sha256_file(out / e["file"])
    assert manifest["splits"]["train"]["shards"] == 2 and manifest["source"] == f"file://{store_dir}"
    assert sha256_file(tok_copy) == sha256_file(small_dataset / "tokenizer.model")

    # resumable: a second fetch downloads nothing; a truncated leftover is fetched again
    assert fetch(out, train_shards=2, source=f"file://{store_dir}", dataset="small-set").downloaded == 0
    shard = out / "fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:2000])
    assert fetch(out, train_shards=2, source=f"file://{store_dir}", dataset="small-set").downloaded == 1
    read_shard(shard)
    n_train = len(shard_paths(small_dataset, "train"))
    with pytest.raises(DataError, match=f"holds {n_train} train shards, asked for {n_train + 1}"):
        fetch(out, train_shards=n_train + 1, source=f"file://{store_dir}", dataset="small-set")


def test_fetch_from_a_copy_of_the_hf_tree(small_dataset, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "datasets" / "fineweb10B_sp1024").mkdir(parents=True)
    (mirror / "tokenizers").mkdir()
    for p in small_dataset.glob("fineweb_*.bin"):
        shutil.copy(p, mirror / "datasets" / "fineweb10B_sp1024" / p.name)
    shutil.copy(small_dataset / "tokenizer.model", mirror / "tokenizers" / "fineweb_1024_bpe.model")
    got = fetch(tmp_path / "out", variant="sp1024", train_shards=1, source=f"file://{mirror}")
    vals = [p.name for p in shard_paths(small_dataset, "val")]
    assert sorted(p.name for p in got.files) == ["fineweb_1024_bpe.model", "fineweb_train_000000.bin", *vals]
    assert got.tokenizer.name == "fineweb_1024_bpe.model"


def test_fetch_verifies_shards(small_dataset, tmp_path):
    mirror = tmp_path / "mirror" / "fineweb10B_sp1024"
    shutil.copytree(small_dataset, mirror)
    (mirror / "manifest.json").unlink()
    bad = mirror / "fineweb_train_000000.bin"
    bad.write_bytes(bad.read_bytes()[:-2])  # truncated in the source itself
    with pytest.raises(DataError, match="fineweb_train_000000.bin: truncated") as exc:
        fetch(tmp_path / "out", train_shards=1, source=f"file://{tmp_path / 'mirror'}")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_fetch_source_errors(tmp_path):
    with pytest.raises(DataError, match="unknown --source"):
        fetch(tmp_path, source="ftp://x")
    with pytest.raises(DataError, match="no shards under"):
        fetch(tmp_path / "o", source=f"file://{tmp_path / 'empty'}")
    with pytest.raises(PgolfError):  # the store's own one-line error
        fetch(tmp_path / "o", source="file://relative-host/x")


def test_push_refuses_incomplete_folders(small_dataset, tmp_path):
    with pytest.raises(DataError, match="has no manifest.json"):
        push(tmp_path, f"file://{tmp_path / 's'}")
    write_shard(small_dataset / "fineweb_val_000000.bin", np.array([1, 2, 3]))  # changed after the build
    with pytest.raises(DataError, match="fineweb_val_000000.bin is missing or not"):
        push(small_dataset, f"file://{tmp_path / 's'}")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("manifest.json"))
