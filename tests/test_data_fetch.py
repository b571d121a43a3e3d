"""Fetching from a mirror (file:// store; Hugging Face itself is unreachable from CI), and pushing."""

from __future__ import annotations

import shutil
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# caseops8192: the canonical CaseOps export, from a local mirror laid out like its HF repository

CASEOPS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_TOK = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


@pytest.fixture(scope="module")
def caseops_build(offline_data, tmp_path_factory):
    """A small CaseOps dataset with an 8,192-piece operator-reserving tokenizer (as the real export)."""
    from pgolf.data.build import build_dataset
    import json

    with open(offline_data / "docs.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for _, line in zip(range(1500), fh)]
    out = tmp_path_factory.mktemp("caseops") / "build"
    build_dataset(docs, out, vocab_size=8192, val_docs=20, shard_tokens=200_000, caseops_transform=True)
    return out


def hf_tree(build, root):
    """`root` laid out like romeerp/parameter-golf-caseops-v1: datasets/{manifest.json, datasets/<dir>/, tokenizers/}."""
    import json

    shards = root / "datasets" / "datasets" / CASEOPS
    shards.mkdir(parents=True)
    for p in build.glob("fineweb_*.bin"):
        shutil.copy(p, shards / p.name)
    (root / "datasets" / "tokenizers").mkdir()
    shutil.copy(build / "tokenizer.model", root / "datasets" / "tokenizers" / CASEOPS_TOK)
    (root / "datasets" / "manifest.json").write_text(json.dumps({"datasets": [{"name": CASEOPS}]}))
    return root


@pytest.fixture
def canonical_small(caseops_build, monkeypatch):
    """The canonical counts scaled to the small build (the checks are the same code)."""
    from dataclasses import replace

    from pgolf.data import leakage

    docs, targets = leakage.val_stats(caseops_build, 64)
    small = replace(leakage.CANONICAL["caseops8192"], train_shards=len(shard_paths(caseops_build, "train")),
                    val_docs=docs, val_targets=targets, seq_len=64)
    monkeypatch.setitem(leakage.CANONICAL, "caseops8192", small)
    return small


def test_caseops_fetch_from_a_mirror_of_the_hf_tree(caseops_build, canonical_small, tmp_path):
    from pgolf.data.bpb import load_sidecar

    mirror = hf_tree(caseops_build, tmp_path / "mirror")
    tok = tmp_path / "tokenizers" / CASEOPS_TOK
    got = fetch(tmp_path / "out", variant="caseops8192", train_shards=canonical_small.train_shards,
                source=f"file://{mirror}", tokenizer_out=tok)
    names = sorted(p.name for p in got.files)
    assert names[:1] == [CASEOPS_TOK] and "fineweb_val_bytes_000000.bin" in names
    assert len([n for n in names if n.startswith("fineweb_train_")]) == canonical_small.train_shards
    manifest = read_manifest(tmp_path / "out")
    assert manifest["variant"] == "caseops8192" and manifest["text_transform"] == "lossless_caps_caseops_v1"
    assert manifest["splits"]["val_bytes"] == {"shards": 1, "tokens": manifest["splits"]["val"]["tokens"]}
    leak = manifest["leakage_check"]
    assert leak["ok"] and leak["overlapping_docs"] == 0 and leak["checked_docs"] == 20
    assert leak["method"].endswith(f"every doc of {canonical_small.train_shards} train shards")
    np.testing.assert_array_equal(load_sidecar(tmp_path / "out"), load_sidecar(caseops_build))
    assert sha256_file(tok) == sha256_file(caseops_build / "tokenizer.model")


def test_caseops_fetch_through_the_hf_code_path(caseops_build, canonical_small, tmp_path, monkeypatch):
    """source=hf with only the network replaced: the repository listing and each file come from the mirror."""
    from pgolf.data import fetch as F

    mirror = hf_tree(caseops_build, tmp_path / "mirror")
    listing = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file())
    asked: list[str] = []

    def downloader(staging, repo_id):
        assert repo_id == "romeerp/parameter-golf-caseops-v1"
        return lambda remote, dest: (asked.append(remote.key), shutil.copyfile(mirror / remote.key, dest))

    monkeypatch.setattr(F, "hf_list_files", lambda repo_id: listing)
    monkeypatch.setattr(F, "hf_downloader", downloader)
    got = fetch(tmp_path / "out", variant="caseops8192", train_shards=2)
    assert f"datasets/tokenizers/{CASEOPS_TOK}" in asked and "datasets/manifest.json" in asked
    assert f"datasets/datasets/{CASEOPS}/fineweb_val_bytes_000000.bin" in asked
    assert sorted(k.rsplit("/", 1)[-1] for k in asked if "_train_" in k) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert got.manifest["leakage_check"]["train_shards"] == 2 and got.manifest["source"] == "hf"
    plan, available = F.hf_listing_plan(listing, F.variant_info("caseops8192"), 1)
    assert available == canonical_small.train_shards and len(plan) == 5  # val, sidecar, 1 train, tokenizer, manifest


def test_caseops_fetch_refuses_non_canonical_and_broken_exports(caseops_build, canonical_small, offline_data, tmp_path):
    mirror = hf_tree(caseops_build, tmp_path / "mirror")
    shards = mirror / "datasets" / "datasets" / CASEOPS
    n = canonical_small.train_shards

    def attempt(name):
        with pytest.raises(DataError) as exc:
            fetch(tmp_path / name, variant="caseops8192", train_shards=1, source=f"file://{mirror}")
        assert "\n" not in str(exc.value) and not (tmp_path / name / "manifest.json").exists()
        return str(exc.value)

    shutil.copy(shards / "fineweb_train_000000.bin", shards / f"fineweb_train_{n:06d}.bin")  # a rebuilt export
    assert f"the source holds {n + 1} train shards" in attempt("extra") and "train_shards: 1499" in attempt("extra")
    (shards / f"fineweb_train_{n:06d}.bin").unlink()

    val = read_shard(shards / "fineweb_val_000000.bin")
    write_shard(shards / "fineweb_train_000000.bin", val)  # the val docs inside train (an 80-shard leaky build)
    assert "20 of 20 validation documents (100.0%) are also train documents" in attempt("leaky")
    shutil.copy(caseops_build / "fineweb_train_000000.bin", shards / "fineweb_train_000000.bin")

    sidecar = read_shard(shards / "fineweb_val_bytes_000000.bin")
    write_shard(shards / "fineweb_val_bytes_000000.bin", sidecar[:-1])
    assert "not aligned 1:1" in attempt("short-sidecar")
    bad = np.array(sidecar)
    bad[0] = 5  # bytes on BOS
    write_shard(shards / "fineweb_val_bytes_000000.bin", bad)
    assert "entry 0 gives 5 bytes to token 1 (BOS" in attempt("bos-bytes")
    (shards / "fineweb_val_bytes_000000.bin").unlink()
    assert "no fineweb_val_bytes_*.bin sidecar" in attempt("no-sidecar")
    write_shard(shards / "fineweb_val_bytes_000000.bin", sidecar)

    tok = mirror / "datasets" / "tokenizers" / CASEOPS_TOK
    shutil.copy(offline_data / "tokenizer.model", tok)  # a plain tokenizer under the CaseOps name
    assert "has 1024 pieces, expected 8192" in attempt("plain-tok")


def test_default_locations_follow_the_variant():
    from pgolf import config as C
    from pgolf.cli.data import default_locations

    data = C.resolve("seed", env={}).data
    assert default_locations(data, "sp1024") == (Path(data.data_path), Path(data.tokenizer_path))
    assert default_locations(data, "caseops8192") == (
        Path("data/datasets") / CASEOPS, Path("data/tokenizers") / CASEOPS_TOK)
