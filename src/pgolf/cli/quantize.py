"""`pgolf quantize CHECKPOINT [--out ARTIFACT] [--bits N] [--method gptq|rtn] [--calib train|self] [--compare]`

CHECKPOINT is a run folder (defaults: its checkpoint/model.pt, config.json, checkpoint/hessians.pt,
artifact.pgz, quant_report.json) or a model.pt file (then pass --config CONFIG.json or --preset; the
Hessians are read from hessians.pt beside it, and the artifact and report go next to --out).
The config is config.json (or the preset < env) with this command's flags on top.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pgolf.cli.common import add_config_flags
from pgolf.errors import BudgetError, ConfigError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint into artifact.pgz (+ quant_report.json)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder or model.pt")
    p.add_argument("--out", type=Path, default=None, help="artifact path (default: RUN/artifact.pgz)")
    p.add_argument("--report", type=Path, default=None, help="report path (default: quant_report.json beside --out)")
    p.add_argument("--config", type=Path, default=None, help="config.json to use (default: RUN/config.json)")
    p.add_argument("--bits", type=int, default=None, help="MATRIX_BITS for block matrices (5..8)")
    p.add_argument("--method", choices=("gptq", "rtn"), default=None, help="QUANT_METHOD")
    p.add_argument("--calib", choices=("train", "self"), default=None,
                   help="(re)collect Hessians first from train data or self-generated text (off the train clock)")
    p.add_argument("--code-bytes", type=int, default=None, help="code bytes to count (default: the train_gpt.py `pgolf submission build` would ship for this config)")
    p.add_argument("--compare", action="store_true",
                   help="quantize the same checkpoint several ways and print bytes and val_bpb of each")
    p.add_argument("--max-val-tokens", type=int, default=None, help="--compare: score only this many val tokens")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    add_config_flags(p)
    p.set_defaults(func=run)


def _paths(args):
    target = Path(args.checkpoint)
    if target.is_dir():
        ckpt = target / "checkpoint" / "model.pt"
        out = args.out or target / "artifact.pgz"
        config_path = args.config or (target / "config.json")
    elif target.suffix in (".pt", ".pth") or target.is_file():
        ckpt = target
        out = args.out or target.parent / "artifact.pgz"
        config_path = args.config
    else:
        raise ConfigError(f"{target} is neither a run folder nor a checkpoint file; pass RUN_DIR or path/to/model.pt")
    report = args.report or out.parent / "quant_report.json"
    return target if target.is_dir() else None, ckpt, ckpt.parent / "hessians.pt", Path(out), Path(report), config_path


def _config(args, config_path):
    from pgolf import config as cfgmod
    from pgolf.cli.common import resolve_config

    explicit = {"matrix_bits": args.bits, "quant_method": args.method, "calib_source": args.calib}
    if config_path is not None and Path(config_path).is_file() and not args.preset:
        overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
        overrides.update({k: v for k, v in explicit.items() if v is not None})
        return cfgmod.apply_overrides(cfgmod.load(config_path), overrides)
    if config_path is not None and not Path(config_path).is_file() and not args.preset:
        raise ConfigError(f"config {config_path} not found; pass --config CONFIG.json or --preset NAME")
    if config_path is None and not args.preset:
        raise ConfigError("a bare checkpoint needs --config CONFIG.json or --preset NAME to build its model")
    return resolve_config(args, **explicit)


def run(args: argparse.Namespace) -> int:
    from pgolf.quantize import quantize_checkpoint
    from pgolf.quantize.compare import compare_methods, format_compare
    from pgolf.quantize.calibrate import calibrate_checkpoint
    from pgolf.quantize.report import TensorRow, format_table

    run_dir, ckpt, hess, out, report, config_path = _paths(args)
    cfg = _config(args, config_path)
    if args.compare:
        if run_dir is None:
            raise ConfigError("--compare needs a run folder (RUN_DIR with checkpoint/model.pt)")
        rows = compare_methods(cfg, run_dir, max_val_tokens=args.max_val_tokens, code_bytes=args.code_bytes)
        print(json.dumps(rows, indent=2) if args.json else format_compare(rows))
        return 0
    if args.calib:
        res = calibrate_checkpoint(cfg, ckpt, hess)
        print(f"calibration: {res.n_hessians} Hessians, {res.tokens:,} tokens ({res.source}), {res.seconds:.1f}s "
              "(outside the train clock)", file=sys.stderr)
    try:
        result = quantize_checkpoint(cfg, ckpt, out, report, hessians_path=hess, code_bytes=args.code_bytes)
    except BudgetError:
        if report.is_file():  # the files exist: show what was written before the one-line error
            data = json.loads(report.read_text())
            rows = [TensorRow(**r) for r in data["tensors"]]
            print(json.dumps(data, indent=2) if args.json else format_table(rows))
        raise
    if args.json:
        print(report.read_text(), end="")
    else:
        print(format_table(result.rows))
        print(f"model {result.model_bytes:,} B ({result.layout}+{result.compressor}) + code {result.code_bytes:,} B "
              f"= {result.total_bytes:,} B of {result.size_cap_bytes:,} ({result.size_cap_bytes - result.total_bytes:,} left)")
        print(f"artifact: {result.artifact_path}\nreport:   {result.report_path}")
    return 0
