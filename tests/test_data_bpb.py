"""Exact bits per byte (spec §1.5): the byte tables, the leading-space rule, the sidecar, the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pgolf.data.bpb import (
    ByteTables,
    bits_per_byte,
    check_tokenizer_vocab,
    load_sentencepiece,
    target_bytes,
    val_target_bytes,
)
from pgolf.data.shards import write_shard
from pgolf.errors import DataError

# A hand-made 6-id vocabulary: 0 pad, 1 bos (boundaries), 2 "<0x41>" (byte), 3 "▁the", 4 "cat", 5 "▁é"
HAND = ByteTables(
    base_bytes=np.array([0, 0, 1, 3, 3, 2], dtype=np.int32),
    has_leading_space=np.array([0, 0, 0, 1, 0, 1], dtype=bool),
    is_boundary=np.array([1, 1, 0, 0, 0, 0], dtype=bool),
)


def test_target_bytes_leading_space_rule_by_hand():
    # BOS ▁the cat ▁é BOS ▁the <0x41> ▁the
    tokens = np.array([1, 3, 4, 5, 1, 3, 2, 3])
    # ▁the after BOS: 3 (space not counted); cat: 3; ▁é: 2+1; BOS: 0; ▁the after BOS: 3;
    # <0x41>: 1; ▁the after a byte piece: 3+1
    assert target_bytes(tokens, HAND).tolist() == [3, 3, 3, 0, 3, 1, 4]
    assert target_bytes(tokens, HAND).dtype == np.int32
    assert target_bytes(tokens[:1], HAND).size == 0


def test_target_bytes_refuses_ids_outside_the_tables():
    with pytest.raises(DataError, match="outside the byte tables"):
        target_bytes(np.array([1, 6]), HAND)


def test_bits_per_byte_hand_computed():
    # 10 targets at NLL ln(4) nats each = 2 bits each = 20 bits over 8 bytes = 2.5 bpb
    assert bits_per_byte(10 * math.log(4), 8) == pytest.approx(2.5, abs=1e-12)
    # the spec's identity: bpb = (mean NLL / ln 2) * (targets / bytes)
    assert bits_per_byte(3.0, 7.0) == pytest.approx((3.0 / 5 / math.log(2)) * (5 / 7.0))
    with pytest.raises(DataError, match="0 bytes"):
        bits_per_byte(1.0, 0)


def test_sidecar_replaces_the_tables(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 3, 4]))
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.array([0, 5, 2]))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.array([1, 4]))
    write_shard(tmp_path / "fineweb_val_bytes_000001.bin", np.array([0, 7]))
    tokens = np.array([1, 3, 4, 1, 4])
    got = val_target_bytes(tmp_path, tokens, tokenizer_path=None)  # no tokenizer needed
    assert got.tolist() == [5, 2, 0, 7] and got.dtype == np.int32
    with pytest.raises(DataError, match="byte sidecar holds 5 entries"):
        val_target_bytes(tmp_path, tokens[:4], tokenizer_path=None)


def test_no_sidecar_and_no_tokenizer(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 3, 4]))
    with pytest.raises(DataError, match="TOKENIZER_PATH"):
        val_target_bytes(tmp_path, np.array([1, 3, 4]), tokenizer_path=None)


def test_bad_tokenizer_files_are_one_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_sentencepiece(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError) as exc:
        load_sentencepiece(junk)
    assert "not a SentencePiece model" in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# with real SentencePiece models: the offline corpus's trained tokenizer and the challenge's sp1024

TRICKY = [
    "  Leading spaces\n\nand   runs\tof whitespace\n",
    "Café naïve — “quotes” 日本語 🙂 ﬁ ligature ① 1234567 ½",
    "\u2581a literal space marker, then ▁▁ two",
    "x",
    "",
]


def docs_of(data_dir, limit_bytes):
    import json

    docs, total = [], 0
    with open(data_dir / "docs.jsonl", encoding="utf-8") as fh:
        for line in fh:
            docs.append(json.loads(line)["text"])
            total += len(docs[-1].encode("utf-8"))
            if total >= limit_bytes:
                break
    return docs, total


def assert_tables_count_normalized_bytes(model_path, docs):
    """Per doc: sum of target bytes over [BOS] + encode(doc) == UTF-8 length of decode(encode(doc))."""
    sp = load_sentencepiece(model_path)
    tables = ByteTables.from_sentencepiece(model_path, sp.vocab_size())
    encoded = sp.encode(docs, out_type=int)
    used_byte_pieces = used_space_pieces = 0
    for doc, ids in zip(docs, encoded):
        tokens = np.array([sp.bos_id(), *ids])
        counted = int(target_bytes(tokens, tables).sum())
        assert counted == len(sp.decode(ids).encode("utf-8")), doc[:80]
        used_byte_pieces += sum(sp.is_byte(i) for i in ids)
        used_space_pieces += int(tables.has_leading_space[ids].sum()) if ids else 0
    return used_byte_pieces, used_space_pieces


def test_tables_from_trained_tokenizer(offline_data):
    model = offline_data / "tokenizer.model"
    sp = load_sentencepiece(model)
    tables = ByteTables.from_sentencepiece(model, 1100)  # padded past the tokenizer: extra ids are boundaries
    assert tables.vocab_size == 1100 and tables.is_boundary[1024:].all()
    assert tables.is_boundary[[0, 1, 2, 3]].all() and (tables.base_bytes[[0, 1, 2, 3]] == 0).all()
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and (tables.base_bytes[byte_ids] == 1).all()
    assert not tables.has_leading_space[byte_ids].any()
    space_word = sp.piece_to_id("\u2581the")
    assert tables.has_leading_space[space_word] and tables.base_bytes[space_word] == 3
    with pytest.raises(DataError, match="VOCAB_SIZE=512"):
        ByteTables.from_sentencepiece(model, 512)
    with pytest.raises(DataError, match="has 1024 pieces but VOCAB_SIZE=1000"):
        check_tokenizer_vocab(model, 1000)
    check_tokenizer_vocab(model, 1024)


def test_tables_count_the_scorers_bytes_on_a_megabyte_of_text(offline_data):
    docs, total = docs_of(offline_data, 1_100_000)
    assert total >= 1_000_000
    byte_pieces, space_pieces = assert_tables_count_normalized_bytes(offline_data / "tokenizer.model", docs + TRICKY)
    assert byte_pieces > 0 and space_pieces > 0  # byte fallback and leading spaces were exercised


def test_tables_with_the_challenge_tokenizer(offline_data, sp1024_model):
    docs, _ = docs_of(offline_data, 1_100_000)
    byte_pieces, _ = assert_tables_count_normalized_bytes(sp1024_model, docs + TRICKY)
    assert byte_pieces > 0


def test_val_bytes_of_the_offline_dataset(offline_data):
    """The bpb denominator over the whole val stream equals the normalized bytes of the val docs."""
    import json

    from pgolf.data.loader import load_val_tokens

    manifest = json.loads((offline_data / "manifest.json").read_text())
    docs, _ = docs_of(offline_data, float("inf"))
    val_docs = docs[: manifest["docs"]["val"]]
    sp = load_sentencepiece(offline_data / "tokenizer.model")
    want = sum(len(sp.decode(ids).encode("utf-8")) for ids in sp.encode(val_docs, out_type=int))
    tokens = load_val_tokens(offline_data, vocab_size=1024)
    got = val_target_bytes(offline_data, tokens, offline_data / "tokenizer.model")
    assert got.size == tokens.size - 1
    assert int(got.sum()) == want
    assert 2.0 < want / got.size < 5.0  # bytes per token of a 1024 vocab on English
