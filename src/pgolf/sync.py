"""Keep a run folder mirrored in the object store while training runs, and commit it at the end.

    with RunSync(run_dir, cfg.run.results_uri, every_seconds=30) as sync:
        train(...)                       # a background thread uploads changed files every 30 s
    # leaving the block (normally, by exception, or by SIGTERM/SIGINT) runs sync.final():
    # one last upload, then manifest.json (every file's path, size, sha256) is written LAST,
    # locally and in the store, as the commit marker: manifest present <=> run folder complete.

Store layout: `<uri>/<run_id>/<relative path>`. A re-sync skips files whose (size, sha256) did not
change since they were uploaded (a local cache; the stat is checked first so unchanged files are
not even re-hashed). Temp files (`*.tmp*`) and dotfiles are never uploaded: our writers create
`.<name>.tmp-<uuid>` and rename, so a half-written file is never seen under its final name.

A store that is down never raises into training: each round logs one warning and the next round
tries again; final() retries until its deadline, then logs an error and returns a report with
ok=False (the run folder is intact locally; `pgolf results push RUN_DIR` uploads it later).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable

from pgolf.errors import StoreError
from pgolf.fileio import atomic_write_bytes
from pgolf.store import (ObjectStore, S3Options, StoreUnavailable, open_store, sha256_bytes,
                         sha256_file, validate_key)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SNAPSHOT_MAX_BYTES = 32 * 1024 * 1024  # smaller files are read once into memory: hash == upload
WARN_EVERY_S = 120.0  # during an outage, repeat the warning at most this often


@dataclass(frozen=True)
class Uploaded:
    """What the store holds for one file, plus the local stat it was taken from."""

    size: int
    sha256: str
    mtime_ns: int


@dataclass
class SyncReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: int = 0
    deleted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> one-line reason
    manifest_written: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def is_syncable(rel: str) -> bool:
    """Skip dotfiles/dot-folders (temp files `.x.tmp-*`), `*.tmp*` names and the manifest."""
    parts = rel.split("/")
    if rel == MANIFEST or any(p.startswith(".") or ".tmp" in p for p in parts):
        return False
    try:
        validate_key(rel)
    except StoreError:
        log.warning("not syncing %r: not a safe object key", rel)
        return False
    return True


def scan_run_dir(run_dir: Path) -> list[str]:
    """Relative POSIX paths of the regular files to sync, sorted. Symlinks are not followed."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, run_dir)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            if os.path.islink(os.path.join(dirpath, name)) or not is_syncable(rel):
                continue
            out.append(rel)
    return sorted(out)


def build_manifest(run_id: str, files: dict[str, Uploaded], status: str) -> dict[str, Any]:
    entries = [{"path": p, "size": u.size, "sha256": u.sha256} for p, u in sorted(files.items())]
    return {"run_id": run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": status, "total_bytes": sum(u.size for u in files.values()),
            "files": entries}


class RunSync:
    """Mirror `run_dir` to `<uri>/<run_id>/` every `every_seconds`; final() commits it.

    `uri` is a store URI (`s3://bucket/prefix`, `file:///dir`) or an opened ObjectStore.
    `every_seconds <= 0` disables the thread (only final() uploads). `final_timeout_s` bounds
    how long final() keeps retrying a store that is down.
    """

    def __init__(self, run_dir: str | Path, uri: str | ObjectStore, *, run_id: str | None = None,
                 every_seconds: float = 30.0, final_timeout_s: float = 60.0,
                 retry_every_s: float = 2.0, options: S3Options | None = None):
        self.run_dir = Path(run_dir)
        self.run_id = run_id or self.run_dir.resolve().name
        if "/" in self.run_id:
            raise StoreError(f"run id {self.run_id!r} contains '/': use one path segment")
        validate_key(self.run_id)
        self.store: ObjectStore = open_store(uri, options) if isinstance(uri, str) else uri
        self.every_seconds = every_seconds
        self.final_timeout_s = final_timeout_s
        self.retry_every_s = retry_every_s
        self.uploaded: dict[str, Uploaded] = {}
        self.rounds = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._final: SyncReport | None = None
        self._prev_handlers: dict[int, Any] = {}
        self._failing_since: float | None = None
        self._in_final = False
        self._last_warning = 0.0

    def key(self, rel: str) -> str:
        return f"{self.run_id}/{rel}"

    # -- one round -----------------------------------------------------------------------------

    def sync_once(self) -> SyncReport:
        """Upload new or changed files now. Never raises: failures are in report.failed."""
        t0 = time.monotonic()
        report = SyncReport()
        with self._lock:
            try:
                rels = scan_run_dir(self.run_dir) if self.run_dir.is_dir() else []
            except OSError as exc:
                report.failed["."] = f"cannot scan {self.run_dir}: {exc}"
                rels = []
            for rel in rels:
                try:
                    if self._sync_file(rel):
                        report.uploaded.append(rel)
                    else:
                        report.skipped += 1
                except FileNotFoundError:
                    continue  # removed between the scan and the read (a rotated checkpoint)
                except StoreUnavailable as exc:
                    # Every other file would wait out the same timeout: end the round now.
                    report.failed[rel] = str(exc)
                    break
                except (StoreError, OSError) as exc:
                    report.failed[rel] = str(exc).splitlines()[0] if str(exc) else repr(exc)
                except Exception as exc:  # never into training
                    report.failed[rel] = f"{type(exc).__name__}: {exc}"
            self.rounds += 1
        report.seconds = time.monotonic() - t0
        self._log_round(report)
        return report

    def _log_round(self, report: SyncReport) -> None:
        """One warning when an outage starts, then at most one per WARN_EVERY_S, so a store that
        is down for an hour does not flood train.log; one line when it comes back."""
        now = time.monotonic()
        if report.failed:
            if self._failing_since is None or now - self._last_warning >= WARN_EVERY_S:
                rel, why = next(iter(report.failed.items()))
                log.warning("sync of %s to %s: %d file(s) failed, will retry (%s: %s)",
                            self.run_id, self.store.uri, len(report.failed), rel, why)
                self._last_warning = now
            if self._failing_since is None:
                self._failing_since = now
            return
        if self._failing_since is not None:
            log.info("store %s reachable again after %.0f s", self.store.uri,
                     now - self._failing_since)
            self._failing_since = None
        if report.uploaded:
            log.info("synced %d file(s) of %s to %s in %.1f s", len(report.uploaded),
                     self.run_id, self.store.uri, report.seconds)

    def _sync_file(self, rel: str) -> bool:
        """Upload one file if its content changed since the last upload. True if uploaded."""
        path = self.run_dir / rel
        st = path.stat()
        prev = self.uploaded.get(rel)
        if prev and prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns:
            return False
        if st.st_size <= SNAPSHOT_MAX_BYTES:
            # Growing logs: hash and upload the very same snapshot of bytes.
            data = path.read_bytes()
            sha = sha256_bytes(data)
            if not (prev and prev.size == len(data) and prev.sha256 == sha):
                self.store.put_bytes(self.key(rel), data)
            uploaded = prev is None or prev.sha256 != sha or prev.size != len(data)
            self.uploaded[rel] = Uploaded(len(data), sha, st.st_mtime_ns)
            return uploaded
        sha = sha256_file(path)
        if prev and prev.size == st.st_size and prev.sha256 == sha:
            self.uploaded[rel] = Uploaded(st.st_size, sha, st.st_mtime_ns)
            return False
        info = self.store.put_file(self.key(rel), path)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or info.sha256 != sha:
            self.uploaded.pop(rel, None)  # changed while uploading: send again next round
            return True
        self.uploaded[rel] = Uploaded(st.st_size, sha, st.st_mtime_ns)
        return True

    # -- the thread ----------------------------------------------------------------------------

    def start(self) -> "RunSync":
        if self.every_seconds > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"runsync-{self.run_id}",
                                            daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # sync_once already catches; belt and braces for the thread
                log.exception("sync round failed")
            if self._stop.wait(self.every_seconds):
                return

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # -- the commit ----------------------------------------------------------------------------

    def final(self, status: str = "complete") -> SyncReport:
        """Last sync, then manifest.json last (locally and in the store). Idempotent; never
        raises. Retries a failing store every retry_every_s until final_timeout_s."""
        if self._final is not None:
            return self._final
        self._in_final = True
        self.stop(timeout_s=self.final_timeout_s)  # outside the lock: the thread may hold it
        with self._lock:
            if self._final is not None:
                return self._final
            deadline = time.monotonic() + self.final_timeout_s
            while True:
                report = self._final_attempt(status)
                if report.ok or time.monotonic() + self.retry_every_s > deadline:
                    break
                time.sleep(self.retry_every_s)
            if report.ok:
                log.info("run %s committed to %s/%s (%d files, manifest.json last)", self.run_id,
                         self.store.uri, self.run_id, len(self.uploaded))
            else:
                log.error("final sync of %s to %s incomplete after %.1f s (%d failed, e.g. %s); "
                          "the run folder is intact: pgolf results push %s --to %s",
                          self.run_id, self.store.uri, self.final_timeout_s, len(report.failed),
                          next(iter(report.failed.values())), self.run_dir, self.store.uri)
            self._final = report
            return report

    def _final_attempt(self, status: str) -> SyncReport:
        report = self.sync_once()
        if not report.ok:
            return report
        try:
            self._reconcile(report)
            if report.ok:
                manifest = build_manifest(self.run_id, self.uploaded, status)
                data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
                atomic_write_bytes(self.run_dir / MANIFEST, data)
                self.store.put_bytes(self.key(MANIFEST), data)
                report.manifest_written = True
        except (StoreError, OSError) as exc:
            report.failed[MANIFEST] = str(exc)
        except Exception as exc:  # final() promises not to raise into the caller
            report.failed[MANIFEST] = f"{type(exc).__name__}: {exc}"
        return report

    def _reconcile(self, report: SyncReport) -> None:
        """Before committing: drop objects of files deleted locally, and re-send any file the
        store lost (a server restarted without its data), so the manifest never lies."""
        local = set(scan_run_dir(self.run_dir)) if self.run_dir.is_dir() else set()
        for rel in sorted(set(self.uploaded) - local):
            self.store.delete(self.key(rel))
            del self.uploaded[rel]
            report.deleted.append(rel)
        remote = {o.key[len(self.run_id) + 1:]: o.size
                  for o in self.store.list(self.run_id + "/")}
        lost = [rel for rel, up in self.uploaded.items() if remote.get(rel) != up.size]
        if lost:
            log.warning("store is missing %d file(s) of %s (e.g. %s): uploading again",
                        len(lost), self.run_id, lost[0])
            for rel in lost:
                del self.uploaded[rel]
            again = self.sync_once()
            report.uploaded += again.uploaded
            report.failed.update(again.failed)

    # -- exits and signals ---------------------------------------------------------------------

    def install_signal_handlers(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
                                ) -> bool:
        """On SIGTERM/SIGINT: final(), then hand the signal to the previous handler (SIGINT ->
        KeyboardInterrupt; SIGTERM default -> the process dies by SIGTERM, exit code 143/-15).
        Only possible from the main thread; returns False (and logs) elsewhere."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("RunSync signal handlers need the main thread; not installed")
            return False
        for signum in signums:
            self._prev_handlers[signum] = signal.signal(signum, self._on_signal)
        return True

    def restore_signal_handlers(self) -> None:
        for signum, prev in self._prev_handlers.items():
            signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
        self._prev_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._in_final:  # a second signal while committing: let the commit finish
            log.warning("%s received again during the final sync; still committing", name)
            return
        log.warning("%s received: final sync of %s before exiting", name, self.run_id)
        self.final(status=f"interrupted ({name})")
        prev = self._prev_handlers.get(signum, signal.SIG_DFL)
        self.restore_signal_handlers()
        if callable(prev):
            handler: Callable[[int, FrameType | None], Any] = prev
            handler(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> "RunSync":
        self.start()
        self.install_signal_handlers()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None or (exc_type is SystemExit and getattr(exc, "code", 0) in (0, None)):
            status = "complete"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "interrupted (KeyboardInterrupt)"
        else:
            status = f"failed ({exc_type.__name__})"
        try:
            self.final(status)
        finally:
            self.restore_signal_handlers()
        return False
