"""The frontier's training elements (docs/frontier-training.md): the progress warmdown with a floor, context
growth by progress (#2014) and its loader, Muon row normalization, per-group AdamW settings, and GPTQ
calibration inside the train clock (#2135)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf import config
from pgolf.data.loader import DistributedTokenLoader
from pgolf.data.shards import read_shard, shard_paths, write_shard
from pgolf.errors import ConfigError
from pgolf.train.optim import Muon, build_optimizers
from pgolf.train import train
from pgolf.train.schedule import (lr_multiplier, rewarm_multiplier, seq_len_at, train_cap_ms,
                                  training_progress)

FRONTIER_PLAN = "1024@0.1,2048@0.7,3072@1.0"


# ---- LR schedule by progress (spec §3 (b)) ------------------------------------------------------


def _frontier_mult(progress: float) -> float:
    """#1855's rule written out: 1 while progress < 0.15, then max((1 - progress) / 0.85, 0.10)."""
    return 1.0 if progress < 0.15 else max((1.0 - progress) / 0.85, 0.10)


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.1499, 0.15, 0.2, 0.5, 0.8, 0.9, 0.915, 0.95, 1.0])
def test_progress_warmdown_by_wallclock_is_exact(progress):
    cap = train_cap_ms(600.0, 0.5)  # #1855: frac = elapsed / (600 - 0.5) s
    elapsed = progress * cap
    got = lr_multiplier(10, elapsed, 20_000, 1200, cap, warmdown_frac=0.85, min_lr=0.10)
    assert got == _frontier_mult(training_progress(10, elapsed, 20_000, cap))
    assert got == pytest.approx(_frontier_mult(progress), abs=1e-12)


def test_progress_warmdown_without_a_cap_runs_on_steps():
    mults = [lr_multiplier(s, 0.0, 20, 1200, None, warmdown_frac=0.85, min_lr=0.10) for s in range(21)]
    assert mults == [_frontier_mult(s / 20) for s in range(21)]
    assert mults[2] == 1.0 and mults[3] == 0.85 / 0.85 and mults[10] == 0.5 / 0.85 and mults[20] == 0.10
    # with a cap the further-along clock wins: 10 % of the steps but 60 % of the time -> 0.4 / 0.85
    assert lr_multiplier(2, 600.0, 20, 0, 1000.0, warmdown_frac=0.85) == 0.4 / 0.85
    assert lr_multiplier(18, 100.0, 20, 0, 1000.0, warmdown_frac=0.85) == (1 - 0.9) / 0.85


def test_floor_and_seed_schedule():
    # MIN_LR floors the iteration warmdown too, and MIN_LR=0 (every seed preset) leaves it untouched
    assert lr_multiplier(9, 0.0, 10, 10, None, min_lr=0.25) == 0.25
    assert lr_multiplier(9, 0.0, 10, 10, None) == 0.1
    for name in ("seed", "baseline", "seed-plus", "tiny", "debug"):
        t = config.resolve(name, env={}).train
        assert (t.warmdown_frac, t.min_lr, t.train_seq_schedule, t.seq_change_warmup_steps) == (0.0, 0.0, "", 0)
        assert not t.muon_row_normalize and (t.embed_wd, t.embed_beta2, t.scalar_wd, t.scalar_beta2) == (-1,) * 4


def test_frontier_presets_carry_the_column_b_schedule():
    full = config.resolve("frontier", env={}).train
    assert (full.warmdown_frac, full.min_lr, full.grad_clip_norm, full.ema_decay, full.iterations) == \
        (0.85, 0.10, 0.3, 0.9965, 20_000)
    assert (full.muon_momentum_warmup_start, full.muon_momentum, full.muon_momentum_warmup_steps) == (0.92, 0.97, 1500)
    assert full.train_seq_schedule == FRONTIER_PLAN and full.seq_change_warmup_steps == 32
    assert full.micro_batch_seqs * full.train_seq_len == 98_304  # one packed row's worth per rank on 8 GPUs
    for name, steps in (("frontier-tiny", 200), ("frontier-debug", 20)):
        t = config.resolve(name, env={}).train
        assert t.iterations == steps and (t.warmdown_frac, t.min_lr, t.muon_row_normalize) == (0.85, 0.10, True)
        assert t.late_qat_threshold == full.late_qat_threshold == 0.0  # column (b) has no QAT
        assert len(config.parse_seq_schedule(t.train_seq_schedule, t.train_seq_len)) == 3


# ---- context growth ---------------------------------------------------------------------------


def test_seq_schedule_switch_points():
    plan = config.parse_seq_schedule(FRONTIER_PLAN, 3072)
    assert plan == [(0.1, 1024), (0.7, 2048), (1.0, 3072)]
    points = {0.0: 1024, 0.1: 1024, 0.1000001: 2048, 0.5: 2048, 0.7: 2048, 0.7000001: 3072, 1.0: 3072}
    assert {p: seq_len_at(plan, p) for p in points} == points
    assert config.parse_seq_schedule("", 2048) == [(1.0, 2048)]
    assert config.parse_seq_schedule("512@0.5", 512) == [(0.5, 512), (1.0, 512)]  # the last stage runs on
    assert [rewarm_multiplier(s, 10, 4) for s in (10, 11, 12, 13, 14)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert rewarm_multiplier(5, None, 32) == 1.0 and rewarm_multiplier(10, 10, 0) == 1.0


@pytest.mark.parametrize("overrides, match", [
    ({"train_seq_schedule": "1024:0.1"}, "not LEN@END"),
    ({"train_seq_schedule": "1024@0.1,2048@1.0"}, "TRAIN_SEQ_LEN"),  # seed's TRAIN_SEQ_LEN is 2048: ok
    ({"train_seq_schedule": "1024@1.5,2048@1.0"}, "END in"),
    ({"train_seq_schedule": "1000@0.1,2048@1.0"}, r"\[1000\] do not divide"),
    ({"train_seq_schedule": "1024@0.5,2048@0.5"}, "twice"),
])
def test_bad_seq_schedules_are_refused(overrides, match):
    if match == "TRAIN_SEQ_LEN":
        config.resolve("seed", dict(overrides), env={})  # the longest stage is TRAIN_SEQ_LEN: fine
        overrides = {**overrides, "train_seq_len": 1024}
        match = "grows to 2048"
    with pytest.raises(ConfigError, match=match):
        config.resolve("seed", dict(overrides), env={})


def _doc_shards(tmp_path: Path, seed: int = 0, bos: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two train shards of 300 BOS-led documents (lengths 5..300); returns the stream and its doc starts."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[bos], rng.integers(2, 1000, size=int(rng.integers(4, 300)))]) for _ in range(300)]
    stream = np.concatenate(docs).astype(np.int64)
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    cut = len(stream) // 2 + 17  # a shard boundary inside a document, as in the real export
    write_shard(tmp_path / "fineweb_train_000000.bin", stream[:cut])
    write_shard(tmp_path / "fineweb_train_000001.bin", stream[cut:])
    return stream, starts


@pytest.mark.parametrize("world", [1, 2])
def test_loader_serves_growing_context_without_skipping_or_repeating_tokens(tmp_path, world):
    stream, starts = _doc_shards(tmp_path)
    batch, accum = 2048 * world, 2  # 1024 tokens per micro-batch and rank, whatever the length
    loaders = [DistributedTokenLoader(tmp_path, r, world) for r in range(world)]
    lengths = [64] * 3 + [128] * 4 + [256] * 5  # the stages of one run, micro-batch after micro-batch
    pos = 0
    for seq_len in lengths:
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch(batch, seq_len, accum)
            assert x.shape == (1024 // seq_len, seq_len) and y.shape == x.shape
            lo = pos + rank * 1025
            np.testing.assert_array_equal(x.reshape(-1), stream[lo : lo + 1024])  # rows = one contiguous piece
            np.testing.assert_array_equal(y.reshape(-1), stream[lo + 1 : lo + 1025])
            # a BOS in the packed rows is exactly a document start of the stored stream (docs intact)
            flat_bos = np.flatnonzero(x.reshape(-1) == 1) + lo
            np.testing.assert_array_equal(flat_bos, starts[(starts >= lo) & (starts < lo + 1024)])
        pos += world * 1025  # the next micro-step starts right after this one: no gap, no overlap
    assert loaders[0].stream.position + (len(stream) // 2 + 17 if loaders[0].stream.shard_index else 0) == pos


# ---- optimizer ---------------------------------------------------------------------------------


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.w = torch.nn.Linear(8, 12, bias=False)
        self.gain = torch.nn.Parameter(torch.ones(8))

    def param_groups(self):
        return {"matrix": [("w", self.w.weight)], "embed": [("emb", self.emb.weight)],
                "scalar": [("gain", self.gain)], "head": []}


def test_adamw_groups_get_their_own_decay_and_betas():
    muon, adam = build_optimizers(_Toy().param_groups(), config.resolve("frontier", env={}).train).optimizers
    groups = {g["name"]: (g["lr"], g["weight_decay"], g["betas"]) for g in adam.param_groups}
    assert groups == {"embed": (0.03, 0.085, (0.9, 0.99)), "scalar": (0.02, 0.02, (0.9, 0.99))}
    assert isinstance(muon, Muon) and muon.row_normalize
    assert (muon.param_groups[0]["lr"], muon.param_groups[0]["weight_decay"]) == (0.026, 0.095)
    _, seed_adam = build_optimizers(_Toy().param_groups(), config.resolve("seed", env={}).train).optimizers
    assert {g["name"]: (g["weight_decay"], g["betas"]) for g in seed_adam.param_groups} == \
        {"embed": (0.04, (0.9, 0.95)), "scalar": (0.04, (0.9, 0.95))}
    # one knob set, the other inherits the shared ADAM_* values
    t = config.resolve("seed", {"embed_wd": 0.1, "adam_beta2": 0.98}, env={}).train
    _, mixed = build_optimizers(_Toy().param_groups(), t).optimizers
    assert {g["name"]: (g["weight_decay"], g["betas"]) for g in mixed.param_groups} == \
        {"embed": (0.1, (0.9, 0.98)), "scalar": (0.04, (0.9, 0.98))}


@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_row_normalize_feeds_unit_rows_to_newton_schulz(row_normalize):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt = Muon([w], lr=0.01, momentum=0.9, row_normalize=row_normalize, ns_dtype=torch.float32)
    seen: list[torch.Tensor] = []
    opt._orthogonalize = lambda u, coeffs, dtype: (seen.append(u.clone()), torch.zeros_like(u, dtype=dtype))[1]
    grads = [torch.randn(12, 8) * torch.arange(1, 13).float()[:, None] for _ in range(2)]  # rows of unequal size
    buf = torch.zeros(12, 8)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        expected = g + 0.9 * buf  # Nesterov
        if row_normalize:
            expected = expected / expected.norm(dim=1, keepdim=True)
        torch.testing.assert_close(seen[-1], expected)
    norms = seen[-1].norm(dim=1)
    assert torch.allclose(norms, torch.ones(12), atol=1e-6) is row_normalize


# ---- the trainer: growth, re-warmup, logs -------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(offline_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frontier_train_data")
    for path in shard_paths(offline_data, "train"):
        (out / path.name).symlink_to(path)
    write_shard(out / "fineweb_val_000000.bin", np.asarray(read_shard(shard_paths(offline_data, "val")[0]))[:2049])
    shutil.copy(offline_data / "tokenizer.model", out / "tokenizer.model")
    return out


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_trainer_grows_the_context_on_schedule_with_a_rewarmup(small_data, tmp_path):
    cfg = config.resolve("frontier-debug", dict(
        data_path=str(small_data), tokenizer_path=str(small_data / "tokenizer.model"), val_batch_size=4096,
        iterations=20, warmup_steps=1, train_log_every=1, seq_change_warmup_steps=2, ema_decay=0.0), env={})
    result = train(cfg, tmp_path)
    assert result.steps == 20 and result.tokens_seen == 20 * cfg.train.train_batch_tokens
    changes = [(e["step"], e["seq_len"]) for e in _events(tmp_path, "phase") if e["phase"] == "seq_len"]
    # progress = step / 20 (the 600 s cap is far away): 16 through step 2 (0.10), 32 through 14 (0.70), then 64
    assert changes == [(3, 32), (15, 64)]
    train_events = _events(tmp_path, "train")
    assert [e["seq_len"] for e in train_events] == [16] * 3 + [32] * 12 + [64] * 5
    mults = {e["step"]: e["lr_mult"] for e in train_events}  # logged step s ran as step s - 1
    for step, mult in mults.items():
        s = step - 1
        rewarm = rewarm_multiplier(s, 3 if s < 15 else 15, 2) if s >= 3 else 1.0
        assert mult == pytest.approx(_frontier_mult(s / 20) * rewarm, abs=1e-9), step
    assert re.search(r"seq_len:64 step:15 progress:0\.750 rows_per_micro_batch:32", (tmp_path / "train.log").read_text())
    assert json.loads((tmp_path / "train_summary.json").read_text())["seq_len_changes"][0]["step"] == 3


# ---- GPTQ calibration inside the train clock ----------------------------------------------------


def test_calibration_budget_and_its_compliance_rule(tmp_path):
    from pgolf.run import calibration_budget, check_compliance

    cfg = config.resolve("debug", {"max_wallclock_seconds": 4.0, "gptq_reserve_seconds": 1.5}, env={})
    fits = calibration_budget(cfg, 2.6, 1.2)
    assert fits == {"calib_s": 1.2, "calib_batches": 2, "gptq_reserve_s": 1.5, "cap_s": 4.0,
                    "train_plus_calib_s": 3.8, "calib_within_reserve": True, "train_plus_calib_within_cap": True}
    over = calibration_budget(cfg, 2.6, 1.6)
    assert not over["calib_within_reserve"] and not over["train_plus_calib_within_cap"]
    rules = check_compliance(cfg, tmp_path, {"train_plus_calib_s": 4.2, "calib_time_s": 1.6})
    assert rules["calibration_in_train_clock"]["ok"] is False and rules["calibration_in_train_clock"]["limit"] == 4.0
    assert check_compliance(cfg.with_overrides(max_wallclock_seconds=0.0), tmp_path,
                            {"train_plus_calib_s": 4.2}).get("calibration_in_train_clock") is None


def test_run_with_a_small_cap_counts_calibration_on_the_train_clock(pipeline_data, tmp_path):
    from pgolf.cli import main

    run_dir = tmp_path / "cap-run"
    code = main(["run", "--preset", "debug", "--out", str(run_dir), "--data", str(pipeline_data),
                 "--tokenizer-path", str(pipeline_data / "tokenizer.model"), "--run-id", "cap-run",
                 "--iterations", "100000", "--max-wallclock-seconds", "3", "--gptq-reserve-seconds", "1.5",
                 "--warmup-steps", "0", "--eval-mode", "rows"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "wallclock_cap" and summary["train_time_s"] >= 1.5  # stopped at cap - reserve
    calib = summary["calibration"]
    assert calib["calib_s"] == summary["calib_time_s"] > 0 and calib["cap_s"] == 3.0 and calib["calib_batches"] == 2
    assert calib["train_plus_calib_s"] == summary["train_plus_calib_s"] == \
        pytest.approx(summary["train_time_s"] + summary["calib_time_s"], abs=2e-3)
    assert calib["train_plus_calib_within_cap"] is (calib["train_plus_calib_s"] <= 3.0)
    rule = json.loads((run_dir / "compliance.json").read_text())["calibration_in_train_clock"]
    assert rule["value"] == summary["train_plus_calib_s"] and rule["limit"] == 3.0 and rule["enforced"] is False
    log = (run_dir / "train.log").read_text()
    assert re.search(r"gptq_calibration: batches:2 tokens_per_rank:\d+ seconds:[\d.]+ reserve:1.5s "
                     r"train\+calib:[\d.]+s cap:3s within_cap:(yes|NO)", log)
    assert log.index("gptq_calibration:") < log.index("final val_loss")
    (event,) = _events(run_dir, "calibration")
    assert event["calib_s"] == calib["calib_s"]


def test_priming_compiles_one_train_graph_per_context_length(small_data, tmp_path, monkeypatch):
    """Under torch.compile every length is its own graph: all are compiled while priming, none on the clock."""
    from pgolf.model.compiled import Compiled
    from pgolf.train import loop

    def eager_compiled(purpose, fn, setting, device, planned=1, state=None):  # Dynamo without a C++ build
        return Compiled(purpose, fn, planned=planned, state=state, backend="eager")

    monkeypatch.setattr(loop, "maybe_compiled", eager_compiled)
    cfg = config.resolve("frontier-debug", dict(
        data_path=str(small_data), tokenizer_path=str(small_data / "tokenizer.model"), val_batch_size=4096,
        iterations=20, warmup_steps=1, train_log_every=1, late_qat_threshold=0.15), env={})
    result = train(cfg, tmp_path)
    # 3 lengths x (looping off, looping on, looped + late QAT): the frontier has no late QAT, but a run that
    # adds it gets it primed too
    assert result.compiles["train_step"] == 9
    compiles = [e for e in _events(tmp_path, "compile") if e["purpose"] == "train_step"]
    assert [(e["graph"], e["planned"]) for e in compiles] == [(g, 9) for g in range(1, 10)]
    log = (tmp_path / "train.log").read_text()
    assert log.index("compile:train_step graph:9/9") < log.index("step:1/20 ")  # before the clock starts
    for line in ("warmup_step:seq_len_32", "warmup_step:seq_len_64", "warmup_step:qat_seq_len_64"):
        assert line in log
