"""Depth recurrence in the training loop: the switch at ENABLE_LOOPING_AT, logged, and what ships looped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf import config
from data_fixtures import cut_val
from pgolf.train import train
from pgolf.train.schedule import training_progress

VAL_ROWS, SEQ = 16, 64


def test_training_progress_is_the_clock_that_ends_first():
    assert training_progress(7, 0.0, 20, None) == pytest.approx(0.35)  # CPU presets: steps
    assert training_progress(100, 210_000.0, 20_000, 600_000.0) == pytest.approx(0.35)  # 600 s runs: the clock
    assert training_progress(10, 900.0, 10, 600.0) == 1.0  # clamped
    assert training_progress(3, 0.0, 0, None) == 0.0


@pytest.fixture(scope="module")
def small_caseops(offline_caseops_data: Path, tmp_path_factory) -> Path:
    return cut_val(offline_caseops_data, tmp_path_factory.mktemp("small_caseops"), VAL_ROWS * SEQ + 1)


def frontier_debug(data: Path, **overrides) -> config.Config:
    return config.resolve("frontier-debug", dict(data_path=str(data), tokenizer_path=str(data / "tokenizer.model"),
                                                 val_batch_size=1024, **overrides), env={})


def test_frontier_debug_switches_looping_on_at_35_percent(small_caseops, tmp_path):
    cfg = frontier_debug(small_caseops, iterations=6, train_log_every=1)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    log = (run_dir / "train.log").read_text()
    # steps done / 6 first reaches 0.35 after 3 steps (2/6 = 0.33): step 4 is the first looped one
    assert "looping:enabled step:4 train_frac:0.5000 slots:5" in log
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("phase") == "looping"] == [4]
    assert json.loads((run_dir / "train_summary.json").read_text())["looping_step"] == 4


def test_a_run_that_ends_before_the_switch_ships_looped(small_caseops, tmp_path):
    cfg = frontier_debug(small_caseops, iterations=2, enable_looping_at=0.9)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert "looping:enabled step:3 end_of_training slots:5" in (run_dir / "train.log").read_text()


def _looping_ddp_rank(rank: int, rdv: str, out: str) -> None:
    import torch
    import torch.distributed as tdist

    from pgolf.model.compiled import Compiled
    from pgolf.model import build_model
    from pgolf.train.loop import data_parallel

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    cfg = config.resolve("frontier-debug", {}, env={}).model
    torch.manual_seed(0)
    model, ref = build_model(cfg, "cpu"), build_model(cfg, "cpu")
    ref.load_state_dict(model.state_dict())
    step = Compiled("ddp_loop_step", model.loss, planned=2, state=lambda: {"looping": model.looping},
                    backend="aot_eager")
    ddp = data_parallel(model, step, torch.device("cpu"))
    g = torch.Generator().manual_seed(rank)
    x, y = (torch.randint(0, cfg.vocab_size, (4, 64), generator=g) for _ in range(2))
    worst, unused = [], []
    for looping in (False, False, True, True):  # the used set changes at the switch
        model.set_looping(looping)
        ref.set_looping(looping)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        ddp(x, y).backward()
        ref.loss(x, y).backward()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            if b.grad is None:
                unused.append(name)
                continue
            tdist.all_reduce(b.grad)
            b.grad /= 2
            worst.append(float((a.grad - b.grad).abs().max() / (b.grad.abs().max() + 1e-12)))
    if rank == 0:
        Path(out).write_text(json.dumps({"graphs": step.graphs, "worst": max(worst), "unused": sorted(set(unused))}))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_params_a_pass_leaves_unused(tmp_path):
    """2 gloo ranks, frontier-debug under DDP around the compiled step: looping off then on (two graphs).
    No parameter is ever left without a gradient (the lane lambdas of layers < PARALLEL_START_LAYER and
    the skips an unlooped pass does not reach are rows of used tensors), so plain DDP serves both
    passes, and the gradients average like the flat all-reduce."""
    import torch.multiprocessing as mp

    out = tmp_path / "out.json"
    mp.start_processes(_looping_ddp_rank, args=(str(tmp_path / "rdv"), str(out)), nprocs=2, start_method="spawn")
    result = json.loads(out.read_text())
    assert result["graphs"] == 2 and result["worst"] < 1e-4, result
    assert result["unused"] == []
