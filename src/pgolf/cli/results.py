"""`pgolf results pull|ls|plot|push|sync` and `pgolf store up|down|env|status`.

No boto3/matplotlib at module level: handlers import pgolf.results / pgolf.store.seaweed, which import
the heavy libraries only where they are used.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_RESULTS_DIR = "results"
DEFAULT_STORE_DIR = ".store"


def _results_uri(explicit: str | None) -> str:
    if explicit:
        return explicit
    from pgolf import config as cfgmod
    from pgolf.errors import ConfigError

    uri = cfgmod.resolve().run.results_uri
    if not uri:
        raise ConfigError("no store given and RESULTS_URI is empty: pass --from s3://bucket/prefix"
                          " (local store: eval \"$(pgolf store env)\")")
    return uri


def cmd_pull(args: argparse.Namespace) -> int:
    from pgolf import results

    from pgolf.store import S3Options

    # a server that accepts connections and never answers: every request gives up within timeout
    per_try = max(0.5, args.timeout / 3)
    options = S3Options(max_attempts=3, connect_timeout=min(5.0, per_try), read_timeout=per_try)
    report = results.pull(_results_uri(args.source), args.dest, args.run_ids,
                          all_runs=args.all, partial=args.partial, if_exists=args.if_exists,
                          progress=not args.no_progress, options=options)
    print(f"pulled {len(report.runs)} run(s) into {args.dest}: {report.downloaded} file(s) "
          f"downloaded ({report.bytes_downloaded / 1e6:.1f} MB), {report.skipped} already "
          f"present, {report.refetched} re-fetched after a checksum mismatch")
    unfinished = [f"{run} ({status})" for run, status in report.statuses.items()
                  if status != "complete"]
    if unfinished:
        print(f"not complete: {', '.join(unfinished)}")
    if report.left_out:
        print(f"left out {len(report.left_out)} unfinished run(s) (--partial pulls them): "
              + ", ".join(f"{run} ({status})" for run, status in report.left_out.items()))
    if report.missing:
        print(f"not in the store: {', '.join(report.missing)}")
    for run_id, why in report.errors.items():
        print(f"error: skipped run {run_id}: {why}", file=sys.stderr)
    if report.errors:
        print(f"error: {len(report.errors)} run(s) could not be pulled; the others were",
              file=sys.stderr)
        return 1
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from pgolf import results

    rows = results.collect(args.dir)
    print(results.rows_as_json(rows) if args.json else results.format_table(rows))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pgolf import results

    print(results.plot(args.dir, args.run_ids, args.out))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from pgolf.errors import StoreError
    from pgolf.store.sync import RunSync, folder_status

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise StoreError(f"no run folder {run_dir}: give runs/<run_id>")
    sync = RunSync(run_dir, _results_uri(args.dest), run_id=args.run_id, every_seconds=0,
                   deadline_s=args.timeout, resume=True)
    sync.attach()
    report = sync.final(status=folder_status(run_dir))
    if not report.ok:
        raise StoreError(f"push of {run_dir} did not commit: {len(report.unsynced)} file(s) not "
                         f"in the store, e.g. {next(iter(report.failed.values()))}")
    print(f"pushed {run_dir} to {sync.store.uri}/{sync.run_id} as generation "
          f"{report.generation} ({sync.committed[-1].status}, {len(sync.committed[-1].files)} "
          f"files, {len(report.uploaded)} uploaded)")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from pgolf import config as cfgmod
    from pgolf.results.supervise import supervise

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    cfg = cfgmod.resolve()  # RUN_ID, RUNS_DIR, RESULTS_URI, SYNC_EVERY_SECONDS, PRESET, SEED as the command sees them
    return supervise(command, uri=args.dest or cfg.run.results_uri, run_id=args.run_id or cfg.run.run_id,
                     runs_dir=cfg.run.runs_dir, env=cfgmod.environment(), cfg_for_id=cfg,
                     every_seconds=cfg.run.sync_every_seconds,
                     deadline_s=args.timeout or cfg.run.sync_deadline_seconds)


def cmd_store_up(args: argparse.Namespace) -> int:
    from pgolf.store.seaweed import LocalSeaweed

    server = LocalSeaweed(args.dir)
    st = server.start(timeout_s=args.timeout)
    print(f"local store up: S3 at {st.endpoint} (pid {st.pid}), bucket {server.bucket}, "
          f"data in {server.data_dir}")
    print('point pgolf and boto3 at it: eval "$(pgolf store env)"')
    return 0


def cmd_store_down(args: argparse.Namespace) -> int:
    from pgolf.store.seaweed import LocalSeaweed

    stopped = LocalSeaweed(args.dir).stop()
    print("local store stopped" if stopped else "local store was not running")
    return 0


def cmd_store_env(args: argparse.Namespace) -> int:
    from pgolf.store.seaweed import LocalSeaweed

    # The one place a secret is printed: the user's own local store, for `eval "$(...)"`.
    for name, value in LocalSeaweed(args.dir).env().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_store_status(args: argparse.Namespace) -> int:
    from pgolf.store.seaweed import LocalSeaweed

    server = LocalSeaweed(args.dir)
    st = server.state()
    if st is None:
        print(f"local store not running (data dir {server.data_dir})", file=sys.stdout)
        return 1
    print(f"local store running: S3 at {st.endpoint} (pid {st.pid}), data in {server.data_dir}")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    res = sub.add_parser("results", help="pull, list and plot run folders from the store")
    rsub = res.add_subparsers(dest="results_command", metavar="ACTION", required=True)

    p = rsub.add_parser("pull", help="download run folders (resumable, sha256-verified)")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID")
    p.add_argument("--all", action="store_true",
                   help="every complete run (with --partial: every run, whatever its status)")
    p.add_argument("--from", dest="source", metavar="URI", help="store URI (default $RESULTS_URI)")
    p.add_argument("--to", dest="dest", default=DEFAULT_RESULTS_DIR, metavar="DIR",
                   help=f"destination folder (default {DEFAULT_RESULTS_DIR}/)")
    p.add_argument("--partial", action="store_true",
                   help="with --all: also runs that are running, interrupted or failed (a named "
                        "run is pulled whatever its status)")
    p.add_argument("--if-exists", action="store_true",
                   help="a named run the store does not hold is not an error (resume scripts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a silent store may stall one request, retries included "
                        "(default 30; a slow transfer that keeps sending is not cut)")
    p.set_defaults(func=cmd_pull)

    p = rsub.add_parser("ls", help="table of pulled runs: val_bpb, bytes, times, compliance")
    p.add_argument("--dir", default=DEFAULT_RESULTS_DIR, help="results folder")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_ls)

    p = rsub.add_parser("plot", help="PNG of train loss and val_bpb vs train time")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="default: every run in --dir")
    p.add_argument("--dir", default=DEFAULT_RESULTS_DIR, help="results folder")
    p.add_argument("--out", default=None, help="PNG path (default <dir>/plot.png)")
    p.set_defaults(func=cmd_plot)

    p = rsub.add_parser("push", help="upload one run folder now and commit its manifest")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", dest="dest", metavar="URI", help="store URI (default $RESULTS_URI)")
    p.add_argument("--run-id", default=None, help="default: the folder's name")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="deadline in seconds for the whole push (default 60)")
    p.set_defaults(func=cmd_push)

    p = rsub.add_parser("sync", help="run a command that writes runs/<run_id>/, syncing that folder meanwhile",
                        description="Runs COMMAND (e.g. torchrun ... train_gpt.py, which carries no store code) "
                                    "with RUN_ID set, mirrors runs/<run_id>/ to the store every "
                                    "SYNC_EVERY_SECONDS and commits it (a final generation) when COMMAND ends, "
                                    "however it ends. Exits with COMMAND's code, or 2 if the commit failed.")
    p.add_argument("--to", dest="dest", metavar="URI", help="store URI (default $RESULTS_URI)")
    p.add_argument("--run-id", default=None, help="default: $RUN_ID, else <preset>-s<seed>-<UTC>-<hex>")
    p.add_argument("--timeout", type=float, default=None,
                   help="deadline in seconds for the final sync (default $SYNC_DEADLINE_SECONDS, 25)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=cmd_sync)

    st = sub.add_parser("store", help="the local SeaweedFS S3 server (default results store)")
    ssub = st.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    for name, func, text in (("up", cmd_store_up, "start it in the background"),
                             ("down", cmd_store_down, "stop it"),
                             ("env", cmd_store_env, "print export lines for eval"),
                             ("status", cmd_store_status, "is it running?")):
        p = ssub.add_parser(name, help=text)
        p.add_argument("--dir", default=DEFAULT_STORE_DIR,
                       help=f"data, credentials and pid folder (default {DEFAULT_STORE_DIR}/)")
        if name == "up":
            p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")
        p.set_defaults(func=func)
