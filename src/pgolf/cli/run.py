"""`pgolf run`: train -> calibrate -> quantize -> evaluate, into one run folder (and the store)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pgolf.cli.common import add_config_flags, resolve_config


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("run", help="a whole record attempt: train, quantize, evaluate, sync",
                       description="Run every stage into runs/<run_id>/ (under torchrun on GPUs).")
    p.add_argument("--data", dest="cfg_data_path", default=None, help="dataset folder (DATA_PATH)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: RUNS_DIR/<run_id>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    add_config_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pgolf import dist
    from pgolf.run import pipeline

    cfg = resolve_config(args)
    run_dir = args.out or Path(cfg.run.runs_dir) / dist.resolve_run_id(cfg)
    summary = pipeline(cfg, run_dir, resume=args.resume)
    if summary:
        info = summary.get("informational_failures") or []
        note = f" ({', '.join(info)} over the 8xH100 limit: information only on this device)" \
            if info else ""
        print(f"run folder: {run_dir}")
        print(f"val_bpb {summary['val_bpb']:.6f}  total_bytes {summary['total_bytes']:,}  "
              f"compliance {'ok' if summary['compliant'] else 'FAILED (see compliance.json)'}{note}")
    return 0 if not summary or summary["compliant"] else 1
