"""The `pgolf` command. Thin: parse arguments, resolve one Config, call a stage.

Each command group lives in its own module here (`data`, `train`, `quantize`, `evaluate`,
`run`, `results`, `launch`, `submission`), and none of them imports torch, boto3 or SkyPilot at module level, so
`pgolf --help` and `pgolf results ls` start fast on a machine without them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pgolf import __version__
from pgolf.errors import PgolfError


def build_parser() -> argparse.ArgumentParser:
    from pgolf.cli import data, evaluate, launch, quantize, results, run, submission, train

    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter Golf launch harness")
    parser.add_argument("--version", action="version", version=f"pgolf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (data, train, quantize, evaluate, run, results, launch, submission):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except PgolfError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())
