"""Shard format: round trip, and every defect as one DataError line naming the file and the fix."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.data.shards import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    count_tokens,
    read_shard,
    shard_paths,
    write_shard,
)
from pgolf.errors import DataError


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_round_trip_and_header_layout(tmp_path):
    tokens = np.array([1, 5, 1023, 0, 65535, 42], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * tokens.size
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC, VERSION, tokens.size]
    assert not header[3:].any()
    back = read_shard(path)
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    assert back.tolist() == tokens.tolist()
    assert count_tokens([path]) == tokens.size
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


def test_empty_shard_round_trips(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.zeros(0, dtype=np.uint16))
    assert read_shard(path).size == 0


def test_write_refuses_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(DataError) as exc:
        write_shard(tmp_path / "x.bin", np.array([1, 65536]))
    assert "65536" in one_line(exc) and "x.bin" in str(exc.value)
    assert not (tmp_path / "x.bin").exists()


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(100) % 50)
    return path


def _patch_word(path, index, value):
    raw = bytearray(path.read_bytes())
    raw[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))


def test_wrong_magic(good):
    _patch_word(good, 0, 12345)
    with pytest.raises(DataError) as exc:
        read_shard(good)
    msg = one_line(exc)
    assert str(good) in msg and "magic 12345" in msg and "pgolf data" in msg


def test_wrong_version(good):
    _patch_word(good, 1, 7)
    with pytest.raises(DataError) as exc:
        read_shard(good)
    msg = one_line(exc)
    assert str(good) in msg and "version 7" in msg


def test_truncated_payload(good):
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError) as exc:
        read_shard(good)
    msg = one_line(exc)
    assert str(good) in msg and "truncated" in msg and "100 tokens" in msg


def test_truncated_header(good):
    good.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError) as exc:
        read_shard(good)
    assert "truncated" in one_line(exc) and "header" in str(exc.value)


def test_size_mismatch_extra_bytes(good):
    good.write_bytes(good.read_bytes() + b"\0\0")
    with pytest.raises(DataError) as exc:
        read_shard(good)
    assert "size mismatch" in one_line(exc)


def test_token_id_beyond_vocab(good):
    assert read_shard(good, vocab_size=50).size == 100
    with pytest.raises(DataError) as exc:
        read_shard(good, vocab_size=49)
    msg = one_line(exc)
    assert str(good) in msg and "49 >= VOCAB_SIZE=49" in msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as exc:
        read_shard(tmp_path / "nope.bin")
    assert "not found" in one_line(exc)


def test_shard_paths_sorted_without_sidecars(tmp_path):
    for name in ["fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin",
                 "fineweb_val_bytes_000000.bin", "fineweb_train_000001.bin"]:
        write_shard(tmp_path / name, np.array([1, 2]))
    assert [p.name for p in shard_paths(tmp_path, "train")] == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in shard_paths(tmp_path, "val")] == ["fineweb_val_000000.bin"]


def test_empty_glob_names_the_pattern_and_the_fix(tmp_path):
    with pytest.raises(DataError) as exc:
        shard_paths(tmp_path, "train")
    msg = one_line(exc)
    assert f"{tmp_path}/fineweb_train_*.bin" in msg and "pgolf data offline" in msg
    with pytest.raises(DataError):
        shard_paths(tmp_path / "missing", "val")
