"""`pgolf evaluate PATH --mode rows|sliding|ttt|lora_ttt`: score an artifact (or an unquantized checkpoint).

PATH is a run folder (its artifact.pgz and config.json), an artifact file, or a *.pt checkpoint.
Config: the run folder's config.json (PATH, or the folder holding the weights, or its parent) unless
--preset is given; an artifact outside a run folder (or with --preset) brings its own model and eval
settings, so `pgolf evaluate X.pgz --data D --tokenizer T` needs nothing else. Then env vars, then
flags. The artifact is checked against the model, tokenizer and data before it is loaded. Outputs go
to --out, else to that run folder. Under torchrun every rank runs the same command; rank 0 writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pgolf.cli.common import add_config_flags

if TYPE_CHECKING:
    from pgolf.config import Config


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("evaluate", help="score the artifact: rows, sliding window or score-first TTT",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", type=Path, metavar="ARTIFACT",
                   help="run folder, artifact file, or *.pt checkpoint")
    p.add_argument("--mode", choices=("rows", "sliding", "ttt", "lora_ttt"), help="evaluation mode (default: EVAL_MODE)")
    p.add_argument("--data", type=Path, help="folder of fineweb_val_*.bin shards (DATA_PATH)")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model for byte counts (TOKENIZER_PATH)")
    p.add_argument("--per-token-out", type=Path, metavar="FILE.npz",
                   help="audit file: nll (float32, nats) and bytes (int32) of every target, in order")
    p.add_argument("--checkpoint", type=Path, metavar="MODEL.pt",
                   help="evaluate unquantized weights (torch state dict) instead of the artifact")
    p.add_argument("--out", type=Path, metavar="DIR", help="where eval_summary.json goes (default: the run folder)")
    p.add_argument("--summary-name", default="eval_summary.json", help="summary file name inside the run folder")
    add_config_flags(p)
    p.set_defaults(func=run)


def config_of_artifact(meta: dict, base: "Config") -> "Config":
    """`base` with the artifact's own model and eval settings (its format-2 meta); env and flags
    apply after. Here, not in pgolf.quantize.meta: the CLI's job, so it stays out of train_gpt.py."""
    import dataclasses

    from pgolf import config as cfgmod
    from pgolf.errors import ArtifactError

    if not meta.get("model"):
        raise ArtifactError("the artifact does not describe its model; evaluate it from its run folder or with --preset")
    known = {f.name for section in (base.model, base.eval) for f in dataclasses.fields(section)}
    values = {k: v for k, v in {**meta.get("eval", {}), **meta["model"]}.items() if k in known}
    return cfgmod.apply_overrides(base, values)


def run(args: argparse.Namespace) -> int:
    from pgolf import config as cfgmod
    from pgolf.errors import ConfigError

    path: Path | None = args.path
    checkpoint: Path | None = args.checkpoint
    artifact: Path | None = None
    if path is None and checkpoint is None:
        raise ConfigError("pgolf evaluate needs an ARTIFACT (run folder, artifact file or *.pt) or --checkpoint")
    if path is not None and path.is_dir():
        artifact = None if checkpoint else path / "artifact.pgz"
    elif path is not None and path.suffix in (".pt", ".pth") and checkpoint is None:
        checkpoint = path
    elif path is not None:
        artifact = path
    # the run folder: PATH itself, or the folder holding the weights (or its parent, for checkpoint/model.pt)
    weights = path if path is not None else checkpoint
    assert weights is not None
    near = [weights] if weights.is_dir() else [weights.parent, weights.parent.parent]
    run_folder = next((d for d in near if (d / "config.json").is_file()), None)
    run_dir = args.out or run_folder or near[0]

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    explicit = {"eval_mode": args.mode, "data_path": args.data, "tokenizer_path": args.tokenizer}
    overrides.update({k: str(v) for k, v in explicit.items() if v is not None})
    if args.preset is None and run_folder is not None:
        base = cfgmod.load(run_folder / "config.json")
    elif artifact is not None and checkpoint is None:
        from pgolf.quantize.artifact import read_artifact

        preset = cfgmod.resolve(args.preset or cfgmod.env_flag("PRESET") or None, env={})
        base = config_of_artifact(read_artifact(artifact).meta, preset)
    else:
        base = cfgmod.resolve(args.preset or cfgmod.env_flag("PRESET") or None, env={})
    cfg = cfgmod.apply_overrides(cfgmod.apply_overrides(base, cfgmod.env_overrides()), overrides)

    from pgolf.evaluate import evaluate

    result = evaluate(cfg, run_dir, artifact_path=artifact, mode=cfg.eval.eval_mode,
                      per_token_out=args.per_token_out, checkpoint=checkpoint, summary_name=args.summary_name)
    print(f"mode:{result.mode} val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
          f"targets:{result.targets} eval_time:{result.eval_time_s:.1f}s ttt_steps:{result.ttt_steps} "
          f"guard:{'fired' if result.guard_fired else 'no'}")
    return 0
