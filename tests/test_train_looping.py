"""Depth recurrence in the training loop: the switch at ENABLE_LOOPING_AT, logged, and what ships looped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pgolf import config
from pgolf.data.shards import read_shard, shard_paths, write_shard
from pgolf.train import train
from pgolf.train.schedule import train_fraction

VAL_ROWS, SEQ = 16, 64


def test_train_fraction_is_the_clock_that_ends_first():
    assert train_fraction(7, 0.0, 20, None) == pytest.approx(0.35)  # CPU presets: steps
    assert train_fraction(100, 210_000.0, 20_000, 600_000.0) == pytest.approx(0.35)  # 600 s runs: the clock
    assert train_fraction(10, 900.0, 10, 600.0) == 1.0  # clamped
    assert train_fraction(3, 0.0, 0, None) == 0.0


@pytest.fixture(scope="module")
def small_caseops(offline_caseops_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_caseops")
    for path in shard_paths(offline_caseops_data, "train"):
        (out / path.name).symlink_to(path)
    val = np.asarray(read_shard(shard_paths(offline_caseops_data, "val")[0]))[: VAL_ROWS * SEQ + 1]
    write_shard(out / "fineweb_val_000000.bin", val)
    sidecar = offline_caseops_data / "fineweb_val_bytes_000000.bin"  # bytes per val token, same layout
    write_shard(out / sidecar.name, np.asarray(read_shard(sidecar))[: VAL_ROWS * SEQ + 1])
    shutil.copy(offline_caseops_data / "tokenizer.model", out / "tokenizer.model")
    return out


def test_frontier_debug_switches_looping_on_at_35_percent(small_caseops, tmp_path):
    cfg = config.resolve("frontier-debug", dict(data_path=str(small_caseops),
                                                 tokenizer_path=str(small_caseops / "tokenizer.model"),
                                                 iterations=6, val_batch_size=1024, train_log_every=1), env={})
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    log = (run_dir / "train.log").read_text()
    # steps done / 6 first reaches 0.35 after 3 steps (2/6 = 0.33): step 4 is the first looped one
    assert "looping:enabled step:4 train_frac:0.5000 slots:5" in log
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("phase") == "looping"] == [4]
    assert json.loads((run_dir / "train_summary.json").read_text())["looping_step"] == 4


def test_a_run_that_ends_before_the_switch_ships_looped(small_caseops, tmp_path):
    cfg = config.resolve("frontier-debug", dict(data_path=str(small_caseops),
                                                 tokenizer_path=str(small_caseops / "tokenizer.model"),
                                                 iterations=2, val_batch_size=1024, enable_looping_at=0.9), env={})
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert "looping:enabled step:3 end_of_training slots:5" in (run_dir / "train.log").read_text()
