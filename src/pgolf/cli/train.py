"""`pgolf train`: the training stage alone, into one run folder.

    pgolf train --preset tiny                                   # 2 CPU cores, a few minutes
    torchrun --standalone --nproc_per_node=8 -m pgolf.cli train --preset seed --data DIR
    pgolf train --out runs/X --resume                           # continue from runs/X/checkpoint/state.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pgolf.cli.common import add_config_flags, resolve_config


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("train", help="train a model into a run folder (checkpoint/model.pt)",
                       description="Train into runs/<run_id>/ (train.log, metrics.jsonl, checkpoint/, "
                                   "train_summary.json). Under torchrun every rank runs this command.")
    p.add_argument("--data", dest="cfg_data_path", default=None, help="dataset folder (DATA_PATH)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: RUNS_DIR/<run_id>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's checkpoint/state.pt (needs --out or RUN_ID)")
    add_config_flags(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pgolf import dist
    from pgolf.errors import ConfigError
    from pgolf.train import train

    cfg = resolve_config(args)
    if args.resume and args.out is None and not cfg.run.run_id:
        raise ConfigError("--resume needs the run folder: pass --out runs/<run_id> or set RUN_ID")
    run_dir = args.out or Path(cfg.run.runs_dir) / dist.resolve_run_id(cfg)
    result = train(cfg, run_dir, resume=args.resume)
    if dist.distributed_context(cfg.train.device).is_main:
        val = f"  val_bpb {result.last_val_bpb:.4f}" if result.last_val_bpb is not None else ""
        print(f"run folder: {run_dir}")
        print(f"steps {result.steps}  train_time {result.train_time_ms / 1000:.1f}s  "
              f"step_avg {result.step_avg_ms:.1f}ms{val}  weights {result.checkpoint_path}")
    dist.shutdown()
    return 0
