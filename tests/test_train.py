"""The training stage (pgolf.train, pgolf.cli train) on the real debug model, CPU only.

Runs use the offline corpus' train shards and a 32-row slice of its val shard (so validation costs
well under a second); every run is a few steps of the `debug` preset.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import cut_val
from pgolf import config
from pgolf.data.shards import write_shard
from pgolf.errors import ConfigError, DataError, TrainingError
from pgolf.train import distributed_context, train
from pgolf.train.schedule import grad_accum_steps, lr_multiplier, train_cap_ms
from pgolf.train.state import EMA

REPO = Path(__file__).resolve().parents[1]
VAL_ROWS, SEQ = 32, 64  # the debug preset's TRAIN_SEQ_LEN is 64


@pytest.fixture(scope="module")
def small_data(offline_data: Path, tmp_path_factory) -> Path:
    """The offline corpus' train shards (linked) + the first 32 rows of its val stream."""
    return cut_val(offline_data, tmp_path_factory.mktemp("small_data"), VAL_ROWS * SEQ + 1)


def _cfg(data: Path, **overrides) -> config.Config:
    base = dict(data_path=str(data), tokenizer_path=str(data / "tokenizer.model"), val_batch_size=4096)
    return config.resolve("debug", {**base, **overrides}, env={})


def _events(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [e for e in events if kind is None or e["event"] == kind]


def _losses(run_dir: Path) -> list[float]:
    return [e["train_loss"] for e in _events(run_dir, "train")]


# ---- schedule and layout (pure functions) -------------------------------------------------------


def test_lr_multiplier_over_a_10_step_warmdown():
    # ITERATIONS=10, WARMDOWN_ITERS=10, no wallclock cap: linear from 1 to 1/10, one value per step
    mults = [lr_multiplier(s, 0.0, 10, 10, None) for s in range(10)]
    assert mults == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    # ITERATIONS=20: flat for the first 10 steps, then the same ramp
    mults = [lr_multiplier(s, 0.0, 20, 10, None) for s in range(20)]
    assert mults == pytest.approx([1.0] * 10 + [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert lr_multiplier(5, 0.0, 10, 0, None) == 1.0  # WARMDOWN_ITERS=0: no decay


def test_lr_multiplier_by_wallclock():
    # 100 ms per step, cap 2,000 ms, WARMDOWN_ITERS=5 -> warmdown = the last 500 ms
    cap = train_cap_ms(3.0, 1.0)
    assert cap == 2000.0
    mults = [lr_multiplier(s, 100.0 * s, 10_000, 5, cap) for s in range(14, 21)]
    assert mults == pytest.approx([1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert lr_multiplier(0, 0.0, 10_000, 5, cap) == 1.0
    assert train_cap_ms(0.0, 8.0) is None
    # both clocks: the smaller multiplier wins (iterations 18 ends before the cap here)
    assert lr_multiplier(16, 1600.0, 18, 5, cap) == pytest.approx(min(2 / 5, 0.8))


def test_grad_accum_keeps_the_global_batch():
    assert grad_accum_steps(786_432, 8, 48, 2048) == 1
    assert grad_accum_steps(786_432, 1, 48, 2048) == 8
    assert grad_accum_steps(786_432, 2, 48, 2048) == 4
    with pytest.raises(ConfigError, match=r"TRAIN_BATCH_TOKENS=786432 .*WORLD_SIZE=3 .*MICRO_BATCH_SEQS=48"):
        grad_accum_steps(786_432, 3, 48, 2048)


def test_ema_matches_a_hand_computed_average():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(lin, 0.9)
    for value in ([3.0, 0.0], [5.0, -2.0]):
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([value]))
        ema.update(lin)
    # 0.81 * w0 + 0.09 * w1 + 0.1 * w2
    expected = [0.81 * 1 + 0.09 * 3 + 0.1 * 5, 0.81 * 2 + 0.09 * 0 + 0.1 * -2]
    assert ema.state_dict()["weight"].tolist() == [pytest.approx(expected)]


def test_distributed_context_single_process():
    rank, world, local, device = distributed_context("cpu")
    assert (rank, world, local, device.type) == (0, 1, 0, "cpu")


def test_run_id_format_and_override():
    from pgolf.runid import make_run_id

    cfg = config.resolve("tiny", env={})
    rid = make_run_id(cfg, now=dt.datetime(2026, 3, 1, 12, 30, 5, tzinfo=dt.timezone.utc))
    assert re.fullmatch(r"tiny-s1337-20260301T123005-[0-9a-f]{4}", rid), rid
    assert make_run_id(cfg.with_overrides(run_id="mine-1")) == "mine-1"
    with pytest.raises(ConfigError, match="RUN_ID"):
        make_run_id(cfg.with_overrides(run_id="../escape"))


# ---- the loop on the debug model -----------------------------------------------------------------


def test_cli_train_runs_end_to_end_and_loss_falls_within_30_steps(small_data, tmp_path):
    from pgolf.cli import main

    out = tmp_path / "run"
    argv = ["train", "--preset", "debug", "--data", str(small_data), "--out", str(out),
            "--tokenizer-path", str(small_data / "tokenizer.model"), "--iterations", "30",
            "--val-loss-every", "15", "--train-log-every", "1", "--val-batch-size", "4096"]
    assert main(argv) == 0

    for name in ("train.log", "metrics.jsonl", "config.json", "train_summary.json", "checkpoint/model.pt"):
        assert (out / name).is_file(), name
    log = (out / "train.log").read_text().splitlines()
    assert log[1] == "hyperparameters:" and "num_layers:2" in log and "iterations:30" in log
    assert any(re.fullmatch(r"step:30/30 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms", x)
               for x in log)
    assert any(re.fullmatch(r"step:30/30 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms "
                            r"step_avg:\d+\.\d{2}ms", x) for x in log)
    assert any(x.startswith("peak memory allocated: ") and x.endswith(" MiB reserved: 0 MiB") for x in log)
    assert any(x.startswith("post_ema val_loss:") for x in log)

    losses = _losses(out)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < losses[0] - 0.8, losses  # ~6.93 (ln 1024) -> ~5.6
    vals = [e for e in _events(out, "val") if "phase" not in e]
    assert [v["step"] for v in vals] == [0, 15, 30]
    assert vals[0]["val_loss"] == pytest.approx(np.log(1024), abs=0.1)
    assert vals[2]["val_loss"] < vals[0]["val_loss"] - 0.8
    assert vals[2]["val_bpb"] < vals[0]["val_bpb"]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 2048 and not summary["stopped_early"]
    assert summary["last_val_bpb"] == _events(out, "val")[-1]["val_bpb"]  # post-EMA: the shipped weights
    assert summary["val_files_read_by_training"] == 0
    assert summary["train_time_ms"] == pytest.approx(summary["step_avg_ms"] * 30)

    from pgolf.model import build_model

    weights = torch.load(out / "checkpoint" / "model.pt", weights_only=True)
    cfg = config.load(out / "config.json")
    assert list(weights) == list(build_model(cfg.model, "cpu").state_dict())
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())


def test_wallclock_cap_stops_training_organically(small_data, tmp_path):
    cfg = _cfg(small_data, iterations=10_000, max_wallclock_seconds=3.0, gptq_reserve_seconds=1.0,
               train_log_every=1, warmup_steps=0)
    result = train(cfg, tmp_path)
    assert result.stopped_early and result.stop_reason == "wallclock_cap"
    assert 1 <= result.steps < 10_000
    # the cap is MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS = 2 s; the tripping step is the last
    assert result.train_time_ms >= 2000.0
    assert result.train_time_ms < 2000.0 + 2 * result.step_avg_ms + 1000.0
    log = (tmp_path / "train.log").read_text()
    assert re.search(rf"stopping_early: wallclock_cap train_time:\d+ms step:{result.steps}/10000", log)
    train_events = _events(tmp_path, "train")
    assert train_events[-1]["step"] == result.steps
    if result.steps > 1:  # the wallclock warmdown had begun (5 x step_avg covers the whole 2 s)
        assert train_events[-1]["lr_mult"] < 1.0


def test_lr_schedule_and_late_qat_switch_in_the_trainer(small_data, tmp_path, monkeypatch):
    from pgolf.model import GPT

    calls: list[bool] = []
    original = GPT.set_qat
    monkeypatch.setattr(GPT, "set_qat", lambda self, on: (calls.append(on), original(self, on))[1])
    cfg = _cfg(small_data, iterations=10, warmdown_iters=10, max_wallclock_seconds=0.0,
               late_qat_threshold=0.35, train_log_every=1, warmup_steps=0, ema_decay=0.0)
    train(cfg, tmp_path)
    events = _events(tmp_path, "train")
    assert [e["lr_mult"] for e in events] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    # the first step run with mult < 0.35 is step 8 (mult 0.3): QAT is on from there
    assert [e["qat"] for e in events] == [False] * 7 + [True] * 3
    (qat,) = [e for e in _events(tmp_path, "phase") if e["phase"] == "late_qat"]
    assert qat["step"] == 8 and qat["lr_mult"] == pytest.approx(0.3)
    assert calls == [True, False]  # on at step 8; off again before the fp32 export
    assert "late_qat:enabled step:8 lr_mult:0.3000" in (tmp_path / "train.log").read_text()


def test_exported_ema_is_the_hand_computed_average_of_live_weights(small_data, tmp_path):
    from pgolf.model import build_model
    from pgolf.train.loop import seed_everything

    common = dict(warmdown_iters=0, max_wallclock_seconds=0.0)  # LR mult 1: step k is the same in every run
    train(_cfg(small_data, iterations=1, ema_decay=0.0, **common), tmp_path / "a")
    train(_cfg(small_data, iterations=2, ema_decay=0.0, **common), tmp_path / "b")
    train(_cfg(small_data, iterations=2, ema_decay=0.75, **common), tmp_path / "c")
    cfg = _cfg(small_data)
    seed_everything(cfg.train.seed)
    w0 = build_model(cfg.model, "cpu").state_dict()
    w1 = torch.load(tmp_path / "a" / "checkpoint" / "model.pt", weights_only=True)
    w2 = torch.load(tmp_path / "b" / "checkpoint" / "model.pt", weights_only=True)
    ema = torch.load(tmp_path / "c" / "checkpoint" / "model.pt", weights_only=True)
    d = 0.75
    changed = 0
    for name, value in ema.items():
        expected = d * d * w0[name] + d * (1 - d) * w1[name] + (1 - d) * w2[name]
        torch.testing.assert_close(value, expected.float(), rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(w1[name], w2[name])
    assert changed > 10  # the live weights really moved between the steps


def test_compile_priming_leaves_no_trace(small_data, tmp_path):
    """WARMUP_STEPS real steps run, then weights, optimizer state and loader position are restored."""
    common = dict(iterations=3, max_wallclock_seconds=0.0, train_log_every=1)
    train(_cfg(small_data, warmup_steps=0, **common), tmp_path / "cold")
    train(_cfg(small_data, warmup_steps=2, **common), tmp_path / "primed")
    assert _losses(tmp_path / "primed") == _losses(tmp_path / "cold")
    (priming,) = [e for e in _events(tmp_path / "primed", "phase") if e["phase"] == "priming"]
    assert priming["steps"] == 2
    assert "warmup_step:2/2" in (tmp_path / "primed" / "train.log").read_text()


def test_resume_follows_the_uninterrupted_trajectory_bit_exactly(small_data, tmp_path):
    common = dict(iterations=4, warmdown_iters=2, max_wallclock_seconds=0.0, train_log_every=1)
    straight = tmp_path / "straight"
    train(_cfg(small_data, **common), straight)

    cut = tmp_path / "cut"
    cfg = _cfg(small_data, checkpoint_every_seconds=1e-6, **common)
    partial = train(cfg, cut, interrupt_after_step=2)
    assert partial.stop_reason == "interrupted" and (cut / "checkpoint" / "state.pt").is_file()
    assert not (cut / "checkpoint" / "model.pt").exists()
    # what a process killed a moment after that checkpoint had already logged: a resume rewrites
    # these steps, so it cuts them first instead of logging them twice
    with open(cut / "train.log", "a") as log, open(cut / "metrics.jsonl", "a") as metrics:
        log.write("step:3/4 train_loss:9.9 train_time:1ms step_avg:1ms\n")
        metrics.write('{"event": "train", "step": 3, "train_loss": 9.9, "train_time_ms": 1}\n')
    train(cfg, cut, resume=True)

    assert [e["step"] for e in _events(cut, "train")] == [1, 2, 3, 4]
    assert (cut / "train.log").read_text().count("step:3/4 train_loss") == 1
    assert _losses(cut) == _losses(straight)  # bit-exact on CPU
    a = torch.load(straight / "checkpoint" / "model.pt", weights_only=True)
    b = torch.load(cut / "checkpoint" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(e["phase"] == "resume" and e["step"] == 2 for e in _events(cut, "phase"))


def test_resume_refuses_a_different_model(small_data, tmp_path):
    cfg = _cfg(small_data, iterations=2, checkpoint_every_seconds=1e-6, max_wallclock_seconds=0.0)
    train(cfg, tmp_path, interrupt_after_step=1)
    with pytest.raises(TrainingError, match="MODEL_DIM was 64"):
        train(cfg.with_overrides(model_dim=32, num_heads=2), tmp_path, resume=True)
    with pytest.raises(TrainingError, match="state.pt does not exist"):
        train(cfg, tmp_path / "nowhere", resume=True)


def test_non_finite_loss_stops_with_a_clear_error_after_logging(small_data, tmp_path, monkeypatch):
    from pgolf.model import GPT

    original = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, reduction="mean"):
        out = original(self, idx, targets, reduction)
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 2 and self.training else out

    monkeypatch.setattr(GPT, "forward", poisoned)
    cfg = _cfg(small_data, iterations=5, warmup_steps=0, train_log_every=1)
    with pytest.raises(TrainingError, match=r"train loss is nan at step 2"):
        train(cfg, tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert "step:1/5 train_loss:" in log and "step:2/5 train_loss:nan" in log
    errors = _events(tmp_path, "error")
    assert errors and errors[0]["step"] == 2
    assert not (tmp_path / "checkpoint" / "model.pt").exists()


def test_bad_shard_or_tokenizer_is_refused_before_the_first_step(small_data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    tokens = np.arange(4096) % 1000
    tokens[3000] = 1500  # an id the 1024-row embedding does not have
    write_shard(bad / "fineweb_train_000000.bin", tokens)
    shutil.copy(small_data / "fineweb_val_000000.bin", bad)
    with pytest.raises(DataError, match=r"token id 1500 >= VOCAB_SIZE=1024"):
        train(_cfg(bad, tokenizer_path=str(small_data / "tokenizer.model")), tmp_path / "r1")
    assert not _events(tmp_path / "r1", "train")

    # VOCAB_SIZE may exceed the tokenizer (padding), but ids past the tokenizer mean another one made the data
    with pytest.raises(DataError, match=r"token id 1500 but the tokenizer .* has only 1024 pieces"):
        train(_cfg(bad, tokenizer_path=str(small_data / "tokenizer.model"), vocab_size=2048), tmp_path / "r3")

    with pytest.raises(DataError, match=r"has 1024 pieces but VOCAB_SIZE=512"):
        train(_cfg(small_data, vocab_size=512), tmp_path / "r2")
    assert not _events(tmp_path / "r2", "train")


def test_two_gloo_ranks_follow_the_single_process_accumulated_trajectory(small_data, tmp_path):
    """torchrun, 2 processes x 1 micro-batch == 1 process x 2 accumulated micro-batches."""
    common = ["--iterations", "4", "--micro-batch-seqs", "16", "--train-log-every", "1", "--warmup-steps", "0"]
    single = tmp_path / "single"
    cfg = _cfg(small_data, iterations=4, micro_batch_seqs=16, train_log_every=1, warmup_steps=0)
    one = train(cfg, single)
    assert one.grad_accum_steps == 2

    double = tmp_path / "double"
    fields = config.field_types()
    env = {k: v for k, v in os.environ.items() if k.lower() not in fields and k != "PRESET"}
    env.update(OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = torchrun + ["-m", "pgolf.cli", "train", "--preset", "debug", "--data", str(small_data),
                      "--tokenizer-path", str(small_data / "tokenizer.model"), "--out", str(double),
                      "--val-batch-size", "4096", *common]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    setup = [e for e in _events(double, "phase") if e["phase"] == "setup"][0]
    assert setup["world_size"] == 2 and setup["grad_accum_steps"] == 1
    # same tokens and the same math: gradients are (g_a + g_b) / 2 either way (halving is exact in
    # fp32), Muon's shared buffer adds exact zeros, so the trajectories are bit-identical on CPU;
    # only the val sums are added in another order (float64), hence the tolerance there
    assert _losses(double) == _losses(single)
    val_1 = _events(single, "val")[-1]["val_loss"]
    val_2 = _events(double, "val")[-1]["val_loss"]
    assert val_2 == pytest.approx(val_1, abs=1e-9)


def test_cli_resume_needs_a_run_folder(capsys):
    from pgolf.cli import main

    assert main(["train", "--preset", "debug", "--resume"]) == 2
    assert "--resume needs the run folder" in capsys.readouterr().err


def _compiled_ddp_rank(rank: int, rdv: str, out: str) -> None:
    import json as _json

    import torch.distributed as tdist

    from pgolf.bench import at_shape
    from pgolf.model.compiled import Compiled
    from pgolf.model import build_model
    from pgolf.train.loop import data_parallel

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    cfg = at_shape("seed-plus", "tiny")
    torch.manual_seed(0)
    model, ref = build_model(cfg.model, "cpu"), build_model(cfg.model, "cpu")
    ref.load_state_dict(model.state_dict())
    step = Compiled("ddp_train_step", model.loss, backend="aot_eager")  # Dynamo + AOTAutograd, no C++ build
    ddp = data_parallel(model, step, torch.device("cpu"), bucket_cap_mb=1.0)  # 3 MB of grads: 3 buckets
    g = torch.Generator().manual_seed(rank)
    x, y = (torch.randint(0, cfg.model.vocab_size, (4, 256), generator=g) for _ in range(2))
    for _ in range(3):  # DDP re-buckets after its first step (and reports it after the next)
        model.zero_grad(set_to_none=True)
        ddp(x, y).backward()
    ref.loss(x, y).backward()
    for p in ref.parameters():  # the previous trainer's average: all-reduce after the whole backward
        tdist.all_reduce(p.grad)
        p.grad /= 2
    worst = max(float((a.grad - b.grad).abs().max() / (b.grad.abs().max() + 1e-12))
                for a, b in zip(model.parameters(), ref.parameters()))
    sizes = ddp._get_ddp_logging_data().get("rebuilt_bucket_sizes", "")
    if rank == 0:
        Path(out).write_text(_json.dumps({"graphs": step.graphs, "worst": worst, "buckets": sizes.count(",") + 1}))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_compiled_step_under_ddp_averages_like_the_flat_all_reduce(tmp_path):
    """2 gloo ranks: DDP around the fullgraph-compiled step (Dynamo splits it at the 3 bucket boundaries so
    the all-reduces run during backward) gives the flat average's gradients, from one graph."""
    import json as _json

    import torch.multiprocessing as mp

    out = tmp_path / "out.json"
    mp.start_processes(_compiled_ddp_rank, args=(str(tmp_path / "rdv"), str(out)), nprocs=2, start_method="spawn")
    result = _json.loads(out.read_text())
    assert result["graphs"] == 1 and result["buckets"] == 3
    assert result["worst"] < 1e-4, result
