"""The leakage guard: val documents inside train are found exactly, and such datasets are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.data import leakage as L
from pgolf.data.loader import load_val_tokens
from pgolf.data.shards import write_shard
from pgolf.errors import DataError

rng = np.random.default_rng(7)


def random_docs(n: int, lo: int = 20, hi: int = 400) -> list[np.ndarray]:
    return [rng.integers(2, 8192, int(rng.integers(lo, hi))).astype(np.uint16) for _ in range(n)]


def stream(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.concatenate([[1], d]) for d in docs]).astype(np.uint16)


def write_split(folder: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, tokens.size, shard_tokens):
        write_shard(folder / f"fineweb_{split}_{i // shard_tokens:06d}.bin", tokens[i: i + shard_tokens])


def make_dataset(folder: Path, val: list[np.ndarray], train: list[np.ndarray], shard_tokens: int = 3_001) -> Path:
    write_split(folder, "val", stream(val), 1 << 30)
    write_split(folder, "train", stream(train), shard_tokens)  # small shards: documents cross them
    return folder


def test_span_keys_depend_on_the_tokens_not_the_offset():
    doc = rng.integers(0, 8192, 77)
    a, b = np.concatenate([rng.integers(0, 9, 5), doc]), np.concatenate([rng.integers(0, 9, 300), doc, [3]])
    assert L.span_keys(a, np.array([5]), np.array([82]))[0] == L.span_keys(b, np.array([300]), np.array([377]))[0]
    variants = [doc[:-1], doc[1:], np.concatenate([doc, [0]]), doc[::-1], np.where(np.arange(77) == 40, doc + 1, doc)]
    keys = {int(L.span_keys(v, np.array([0]), np.array([v.size]))[0]) for v in variants}
    assert len(keys) == 5 and int(L.span_keys(doc, np.array([0]), np.array([77]))[0]) not in keys


def test_a_clean_split_passes(tmp_path):
    data = make_dataset(tmp_path, random_docs(60), random_docs(400))
    report = L.check_leakage(data)
    assert (report.checked_docs, report.overlapping_docs, report.train_docs) == (60, 0, 400)
    assert report.train_shards == report.train_shards_checked > 10 and report.ok
    assert report.method == f"doc-hash: 60 val docs vs every doc of {report.train_shards} train shards"
    L.require_no_leakage(report, data)


def test_the_val_docs_10000_mistake_is_found_and_refused(tmp_path):
    """prepare_caseops_data.py's default: val = docs 0..49, train starts at doc 10 (80% of val trained on)."""
    docs = random_docs(400)
    data = make_dataset(tmp_path, docs[:50], docs[10:])
    report = L.check_leakage(data)
    assert report.overlapping_docs == 40 and not report.ok  # every one, across shard boundaries too
    with pytest.raises(DataError, match=r"40 of 50 validation documents \(80.0%\) are also train documents"):
        L.require_no_leakage(report, data)
    sampled = L.check_leakage(data, sample_shards=3)
    assert sampled.train_shards_checked == 3 and "(sampled)" in sampled.method
    assert 0 < sampled.overlapping_docs < 40


def test_documents_crossing_shards_and_duplicates_are_counted_exactly(tmp_path):
    val = random_docs(30, lo=2_000, hi=4_000)  # longer than a train shard: each crosses one or two
    train = random_docs(50)
    train[10:10] = [val[3], val[7]]
    train.append(val[29])  # the stream's very last document
    data = make_dataset(tmp_path, val + [val[7]], train, shard_tokens=1_500)
    report = L.check_leakage(data)
    assert report.overlapping_docs == 4  # val[3], val[7] twice (it is in val twice), val[29]
    assert report.allowed_docs == 0 and not report.ok


def test_natural_duplicates_under_the_tolerance_pass(tmp_path):
    val, train = random_docs(300), random_docs(100)
    data = make_dataset(tmp_path, val, train + [val[5], val[6]])
    report = L.check_leakage(data)
    assert (report.overlapping_docs, report.allowed_docs, report.ok) == (2, 3, True)


def test_canonical_counts_refuse_rebuilt_exports(tmp_path):
    docs = random_docs(20)
    data = make_dataset(tmp_path / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", docs[:5], docs[5:])
    real = L.CANONICAL["caseops8192"]
    assert (real.train_shards, real.val_docs, real.val_targets) == (80, 50_000, 47_851_520)
    assert L.canonical_for(data) == real  # by the folder name
    with pytest.raises(DataError, match=r"1,499 train shards; the canonical caseops8192 export has 80\. "
                                        r"`train_shards: 1499` is the fingerprint"):
        L.check_canonical(data, real, train_shards_available=1499)
    with pytest.raises(DataError, match="validation has 5 documents / 0 scored tokens, the canonical caseops8192 "
                                        "export 50,000 / 47,851,520"):
        L.check_canonical(data, real)
    n_val = stream(docs[:5]).size
    small = replace(real, train_shards=3, val_docs=5, val_targets=(n_val - 1) // 64 * 64, seq_len=64)
    L.check_canonical(data, small, train_shards_available=3)
    with pytest.raises(DataError, match="holds 4 train shards"):
        L.check_canonical(data, small, train_shards_available=4)


def test_leakage_report_uses_a_fresh_manifest_record(offline_data, tmp_path):
    from pgolf.data.build import build_dataset

    with open(offline_data / "docs.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for _, line in zip(range(40), fh)]
    data = tmp_path / "ds"
    build_dataset(docs, data, tokenizer=offline_data / "tokenizer.model", val_docs=5, shard_tokens=8_000)
    report = L.leakage_report(data)
    assert report["source"] == "data manifest" and report["checked_docs"] == 5 and report["ok"]
    write_shard(data / "fineweb_train_000999.bin", load_val_tokens(data))  # a leak added later
    report = L.leakage_report(data)
    assert report["source"] == "computed at run time" and report["overlapping_docs"] == 5 and not report["ok"]


def test_inspect_refuses_a_leaky_folder_in_one_line(tmp_path, capsys):
    docs = random_docs(100)
    data = make_dataset(tmp_path, docs[:50], docs[10:])
    rc = main(["data", "inspect", str(data)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "40 of 50 validation documents" in err


def test_build_refuses_a_corpus_whose_val_docs_repeat_in_train(offline_data, tmp_path):
    from pgolf.data.build import build_dataset

    with open(offline_data / "docs.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for _, line in zip(range(30), fh)]
    with pytest.raises(DataError, match="3 of 3 validation documents"):
        build_dataset(docs[:3] + docs, tmp_path / "b", tokenizer=offline_data / "tokenizer.model", val_docs=3)
    assert not (tmp_path / "b" / "manifest.json").exists()
