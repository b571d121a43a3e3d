"""The `pgolf` command. Thin: parse arguments, resolve one Config, call a stage.

Each command group lives in its own module here (`data`, `train`, `quantize`, `evaluate`,
`run`, `results`, `launch`, `submission`), and none of them imports torch, boto3 or SkyPilot at module level, so
`pgolf --help` and `pgolf results ls` start fast on a machine without them.
"""

from __future__ import annotations

import argparse
import errno
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
    except OSError as exc:  # a full disk, a read-only or missing folder: one line, no traceback
        if args.debug:
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


OS_HINTS = {
    errno.ENOSPC: "free disk space or write elsewhere (--out / RUNS_DIR)",
    errno.EDQUOT: "free disk space or write elsewhere (--out / RUNS_DIR)",
    errno.EFBIG: "the file size limit (ulimit -f) or the file system refused a large file",
    errno.EROFS: "choose a writable folder (--out / RUNS_DIR)",
    errno.EACCES: "choose a folder you may write to, or fix its permissions",
    errno.EPERM: "choose a folder you may write to, or fix its permissions",
    errno.ENAMETOOLONG: "use a shorter run id or folder name",
    errno.ENOTDIR: "a path component is a file, not a folder",
}


def describe_os_error(exc: OSError) -> str:
    """`<what> (<errno name>): <path>: <what to do>` from an OSError."""
    what = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno or 0, "")
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
    hint = OS_HINTS.get(exc.errno or 0)
    return (f"{what}{f' ({name})' if name else ''}{f': {paths}' if paths else ''}"
            f"{f': {hint}' if hint else ''}")


def entrypoint() -> None:
    sys.exit(main())
