"""`pgolf submission build` (a records folder from finished runs) and `pgolf stats` (Welch t-test).

Neither imports torch: both read run folders (summary.json, config.json, ...) only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEARCH_HELP = "folder of pulled results (pgolf results pull), searched before --runs"


def _search(args: argparse.Namespace) -> list[Path]:
    return [Path(p) for p in (args.results, args.runs) if p]


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("submission", help="build a records/ folder from finished runs",
                       description="Records folders for the challenge, generated from run folders.")
    ssub = p.add_subparsers(dest="submission_command", metavar="SUBCOMMAND", required=True)
    b = ssub.add_parser(
        "build", help="README, submission.json, logs, requirements and the generated train_gpt.py",
        description="Write records/track_10min_16mb/<date>_<slug>/ from runs that share one config "
                    "(apart from SEED/RUN_ID). Fails if any seed's model + code bytes exceed 16,000,000.")
    b.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="run folder names (or paths)")
    b.add_argument("--name", required=True, help="submission name (submission.json name, README title)")
    b.add_argument("--github-id", required=True, help="your GitHub ID")
    b.add_argument("--author", default=None, help="author name (default: the GitHub ID)")
    b.add_argument("--blurb", default="", help="one-paragraph summary for submission.json and the README")
    b.add_argument("--out", type=Path, default=None,
                   help="records folder (default: records/track_10min_16mb/<date>_<name slug>)")
    b.add_argument("--date", default=None, help="YYYY-MM-DD (default: from --out's name, else today UTC)")
    b.add_argument("--results", default="results", help=SEARCH_HELP)
    b.add_argument("--runs", default="runs", help="local runs folder")
    b.add_argument("--code-form", choices=["compressed", "raw"], default="compressed",
                   help="which train_gpt.py ships and is counted (default: compressed stub)")
    b.add_argument("--allow-noncompliant", action="store_true",
                   help="build even if a run failed a compliance rule (non-record folder; listed in README)")
    b.add_argument("--allow-code-drift", action="store_true",
                   help="build even if a run did not execute the train_gpt.py this build ships "
                        "(sha256 in its environment.json): a non-record folder, the README says so")
    b.set_defaults(func=_build)

    s = sub.add_parser(
        "stats", help="one-sided Welch t-test of runs against a reference, in nats per token",
        description="Tests the README's record rule (>= 0.005 nats better at p < 0.01) and the "
                    "leaderboard progression rule (better at p < 0.25). bpb values convert to nats with "
                    "the runs' measured bytes per token.")
    s.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="the runs under test")
    s.add_argument("--bpb", nargs="+", type=float, default=None,
                   help="val_bpb values instead of run IDs (needs --bytes-per-token)")
    s.add_argument("--nats", nargs="+", type=float, default=None, help="val_loss values instead of run IDs")
    s.add_argument("--bytes-per-token", type=float, default=None,
                   help="validation bytes per token (default: measured from the runs)")
    ref = s.add_argument_group("reference (one of)")
    ref.add_argument("--ref-runs", nargs="+", default=None, metavar="RUN_ID", help="another set of runs")
    ref.add_argument("--ref-bpb", type=float, default=None, help="reference mean val_bpb")
    ref.add_argument("--ref-nats", type=float, default=None, help="reference mean val_loss (nats/token)")
    ref.add_argument("--ref-std", type=float, default=0.0, help="reference std, same unit (default 0)")
    ref.add_argument("--ref-n", type=int, default=1, help="reference number of seeds (default 1)")
    s.add_argument("--margin", type=float, default=None, help="record margin in nats (default 0.005)")
    s.add_argument("--results", default="results", help=SEARCH_HELP)
    s.add_argument("--runs", default="runs", help="local runs folder")
    s.add_argument("--json", action="store_true", help="print the comparison as JSON")
    s.set_defaults(func=_stats)


def _build(args: argparse.Namespace) -> int:
    from pgolf.submission.build import build

    result = build(args.run_ids, out=args.out, name=args.name, github_id=args.github_id, author=args.author,
                   blurb=args.blurb, search=_search(args), code_form=args.code_form, date=args.date,
                   allow_noncompliant=args.allow_noncompliant, allow_code_drift=args.allow_code_drift)
    sub = result.submission
    print(f"records folder: {result.out}")
    for name, size in sorted(result.files.items()):
        print(f"  {name:<24} {size:>12,} B")
    compressed = f", compressed {result.code_bytes_compressed:,}" if result.code_bytes_compressed else ""
    print(f"code bytes {result.code_bytes:,} ({result.code_form}; raw {result.code_bytes_raw:,}{compressed})")
    print(f"val_bpb {sub['val_bpb']:.5f} ± {sub['val_bpb_std']:.5f} over {sub['n_seeds']} seeds; "
          f"bytes_total {result.bytes_total:,} of {sub['size_cap_bytes']:,}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pgolf.submission import stats
    from pgolf.submission.runs import load_runs

    search = _search(args)
    given = sum(x is not None and x != [] for x in (args.run_ids or None, args.bpb, args.nats))
    if given != 1:
        raise stats.StatsError("give the runs under test as RUN_IDs, or --bpb values, or --nats values (one of)")
    refs = sum(x is not None for x in (args.ref_runs, args.ref_bpb, args.ref_nats))
    if refs != 1:
        raise stats.StatsError("give one reference: --ref-runs, --ref-bpb or --ref-nats")

    bpt = args.bytes_per_token
    if args.run_ids:
        runs = load_runs(args.run_ids, search)
        measured = sum(r.bytes_per_token for r in runs) / len(runs)
        bpt = bpt or measured
        sample = stats.Sample.of("runs", [r.val_loss for r in runs], bpt)
    elif args.nats:
        sample = stats.Sample.of("runs", args.nats, bpt)
    else:
        if not bpt:
            raise stats.StatsError("--bpb values need --bytes-per-token to convert to nats")
        sample = stats.Sample.of("runs", [stats.nats_from_bpb(v, bpt) for v in args.bpb], bpt)

    if args.ref_runs:
        ref_runs = load_runs(args.ref_runs, search)
        ref_bpt = sum(r.bytes_per_token for r in ref_runs) / len(ref_runs)
        reference = stats.Sample.of("reference", [r.val_loss for r in ref_runs], ref_bpt)
    elif args.ref_nats is not None:
        reference = stats.Sample("reference", args.ref_nats, args.ref_std, args.ref_n, (), bpt)
    else:
        if not bpt:
            raise stats.StatsError("--ref-bpb needs the runs' bytes per token (run IDs or --bytes-per-token)")
        reference = stats.Sample("reference", stats.nats_from_bpb(args.ref_bpb, bpt),
                                 stats.nats_from_bpb(args.ref_std, bpt), args.ref_n, (), bpt)
    margin = stats.RECORD_MARGIN_NATS if args.margin is None else args.margin
    result = stats.compare(sample, reference, margin=margin)
    print(json.dumps(result.to_dict(), indent=2) if args.json else stats.format_comparison(result))
    return 0
