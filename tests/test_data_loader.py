"""Training stream (spec §1.3 (a)) and validation tokens (§1.4)."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.data.loader import DistributedTokenLoader, TokenStream, load_val_tokens
from pgolf.data.shards import write_shard
from pgolf.errors import DataError


@pytest.fixture
def data_dir(tmp_path):
    """Three train shards of uneven length holding the running sequence 0..N-1 (mod 1000)."""
    lengths = [1000, 357, 2111]
    start = 0
    for i, n in enumerate(lengths):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", (np.arange(start, start + n) % 1000))
        start += n
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 7, 8, 9]))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.array([1, 10, 11]))
    return tmp_path


TOTAL = 1000 + 357 + 2111


def expected(start, n):
    return (np.arange(start, start + n) % TOTAL) % 1000


def test_stream_crosses_shards_and_wraps(data_dir):
    stream = TokenStream(sorted(data_dir.glob("fineweb_train_*.bin")))
    got = np.concatenate([stream.take(n) for n in [10, 990, 500, 3000, 1]])
    assert got.dtype == np.int64
    assert got.tolist() == expected(0, got.size).tolist()


def test_batch_shapes_and_shift(data_dir):
    loader = DistributedTokenLoader(data_dir, rank=0, world_size=1)
    x, y = loader.next_batch(global_tokens=64, seq_len=16, grad_accum_steps=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    assert x.ravel().tolist() == expected(0, 64).tolist()
    assert y.ravel().tolist() == expected(1, 64).tolist()
    x2, _ = loader.next_batch(64, 16, 1)  # one span of W * (local + 1) tokens per call
    assert x2.ravel().tolist() == expected(65, 64).tolist()


def test_rank_r_takes_the_rth_piece(data_dir):
    world = 4
    pieces = [DistributedTokenLoader(data_dir, r, world).next_batch(256, 32, 1) for r in range(world)]
    for r, (x, y) in enumerate(pieces):
        start = r * (64 + 1)
        assert x.shape == (2, 32)
        assert x.ravel().tolist() == expected(start, 64).tolist()
        assert y.ravel().tolist() == expected(start + 1, 64).tolist()


def test_one_rank_with_accumulation_sees_the_same_tokens_as_many_ranks(data_dir):
    world, steps, global_tokens, seq = 4, 9, 512, 32  # 9 steps wrap around the 3,468-token stream
    ranks = [DistributedTokenLoader(data_dir, r, world) for r in range(world)]
    single = DistributedTokenLoader(data_dir, 0, 1)
    for _ in range(steps):
        multi = [ld.next_batch(global_tokens, seq, 1) for ld in ranks]
        accum = [single.next_batch(global_tokens, seq, world) for _ in range(world)]
        for (xm, ym), (xs, ys) in zip(multi, accum):
            np.testing.assert_array_equal(xm, xs)
            np.testing.assert_array_equal(ym, ys)
    assert single.stream.shard_index == ranks[0].stream.shard_index
    assert single.stream.position == ranks[0].stream.position


def test_deterministic_and_resumable(data_dir):
    a = DistributedTokenLoader(data_dir, 1, 2)
    for _ in range(5):
        a.next_batch(128, 16, 2)
    state = a.state_dict()
    want = [a.next_batch(128, 16, 2) for _ in range(7)]
    b = DistributedTokenLoader(data_dir, 1, 2)
    b.load_state_dict(state)
    got = [b.next_batch(128, 16, 2) for _ in range(7)]
    for (xw, yw), (xg, yg) in zip(want, got):
        np.testing.assert_array_equal(xw, xg)
        np.testing.assert_array_equal(yw, yg)


def test_state_from_other_shards_is_refused(data_dir, tmp_path_factory):
    a = TokenStream(sorted(data_dir.glob("fineweb_train_*.bin")))
    state = a.state_dict()
    other = tmp_path_factory.mktemp("other")
    write_shard(other / "fineweb_train_000000.bin", np.arange(10))
    with pytest.raises(DataError, match="same data folder"):
        TokenStream([other / "fineweb_train_000000.bin"]).load_state_dict(state)


def test_batch_geometry_errors_are_one_line(data_dir):
    loader = DistributedTokenLoader(data_dir, 0, 8)
    with pytest.raises(DataError) as exc:
        loader.next_batch(1000, 64, 1)
    assert "TRAIN_BATCH_TOKENS=1000" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(DataError, match="outside world size"):
        DistributedTokenLoader(data_dir, 8, 8)


def test_vocab_checked_on_each_new_shard(data_dir):
    loader = DistributedTokenLoader(data_dir, 0, 1, vocab_size=1000)
    loader.next_batch(64, 16, 1)
    bad = DistributedTokenLoader(data_dir, 0, 1, vocab_size=500)
    with pytest.raises(DataError, match="VOCAB_SIZE=500"):
        bad.next_batch(64, 16, 1)


def test_val_tokens_concatenated_untruncated(data_dir):
    val = load_val_tokens(data_dir)
    assert val.dtype == np.int64 and val.tolist() == [1, 7, 8, 9, 1, 10, 11]
    with pytest.raises(DataError, match="VOCAB_SIZE=10"):
        load_val_tokens(data_dir, vocab_size=10)


def test_no_train_shards(tmp_path):
    with pytest.raises(DataError, match="pgolf data offline"):
        DistributedTokenLoader(tmp_path, 0, 1)


def test_empty_shards_are_skipped(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([1, 2, 3]))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.zeros(0, dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000002.bin", np.array([4, 5]))
    stream = TokenStream(sorted(tmp_path.glob("*.bin")))
    assert stream.take(12).tolist() == [1, 2, 3, 4, 5] * 2 + [1, 2]
    write_shard(tmp_path / "fineweb_train_000000.bin", np.zeros(0, dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000002.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(DataError, match="are empty"):
        TokenStream(sorted(tmp_path.glob("*.bin")))
