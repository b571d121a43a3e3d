"""`pgolf results sync -- COMMAND`: run a command that writes runs/<run_id>/ and keep that folder in
the store while it runs, then commit it (a final generation) however the command ends.

The generated train_gpt.py carries no store code (every byte of it counts against the 16,000,000 B
cap), so on the node the sync runs around it, from the installed package:

    pgolf results sync -- torchrun --standalone --nproc_per_node=8 ship/train_gpt.py

The run id is RUN_ID, else `<preset>-s<seed>-<UTC>-<hex>` chosen here and passed down as RUN_ID, so
both processes name the same folder. The command gets RESULTS_URI="" (it must not try to sync
itself). SIGTERM/SIGINT are forwarded to the command; the final sync runs after it exits, within
SYNC_DEADLINE_SECONDS (the store layout and its guarantees: pgolf.store.runstore). Exit code:
the command's (128 + signal when a signal ended it), else non-zero when the final sync did not commit.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Mapping, Sequence

from pgolf.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Supervised:
    returncode: int  # the command's exit code; 128 + N when signal N ended it
    run_dir: Path
    committed: bool  # the final sync wrote manifest.json to the store
    status: str  # the manifest's status


def exit_code(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_synced(command: Sequence[str], run_dir: Path, uri: str, *, run_id: str,
               env: Mapping[str, str], every_seconds: float = 30.0,
               deadline_s: float = 25.0) -> Supervised:
    """Run `command` with `env` (+ RUN_ID, RESULTS_URI=""), mirroring `run_dir` to `uri` meanwhile.
    The store is probed, and a run id that holds a committed run refused, before it starts."""
    from pgolf.store.sync import RunSync

    if not command:
        raise ConfigError("pgolf results sync needs a command after `--`, e.g. -- torchrun ... train_gpt.py")
    sync = RunSync(run_dir, uri, run_id=run_id, every_seconds=every_seconds, deadline_s=deadline_s)
    sync.attach()
    child_env = {**env, "RUN_ID": run_id, "RESULTS_URI": ""}
    try:
        proc = subprocess.Popen(list(command), env=child_env)
    except OSError as exc:
        raise ConfigError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from None
    log.info("running %s; syncing %s to %s/%s every %.0f s", " ".join(command), run_dir, sync.store.uri,
             run_id, every_seconds)
    sync.start()
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        log.warning("%s received: passing it to %s, then the final sync", signal.Signals(signum).name, command[0])
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        returncode = exit_code(proc.wait())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if returncode == 0:
        status = "complete"
    elif received:
        status = f"interrupted ({signal.Signals(received[0]).name})"
    else:
        status = f"failed (exit {returncode})"
    report = sync.final(status)
    return Supervised(returncode, Path(run_dir), report.ok and report.generation is not None, status)


def supervise(command: Sequence[str], *, uri: str, run_id: str | None, runs_dir: str, env: Mapping[str, str],
              cfg_for_id: object, every_seconds: float, deadline_s: float) -> int:
    """The CLI's verb: resolve the run id, run, and turn an uncommitted final sync into an error."""
    from pgolf.runid import check_run_id, make_run_id

    if not uri:
        raise ConfigError("no store to sync to: set RESULTS_URI or pass --to s3://bucket/prefix")
    run_id = check_run_id(run_id) if run_id else make_run_id(cfg_for_id)
    run_dir = Path(runs_dir) / run_id
    result = run_synced(command, run_dir, uri, run_id=run_id, env=env, every_seconds=every_seconds,
                        deadline_s=deadline_s)
    if result.returncode != 0:
        log.error("%s exited %d; what it wrote is in %s and in %s/%s (%s)", command[0], result.returncode,
                  run_dir, uri, run_id, "committed" if result.committed else "NOT committed")
        return result.returncode
    if not result.committed:
        raise StoreError(f"{run_id} finished but its final sync to {uri} did not commit; the run folder is "
                         f"intact in {run_dir}", hint=f"pgolf results push {run_dir} --to {uri}")
    return 0
