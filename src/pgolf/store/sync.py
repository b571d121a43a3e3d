"""Keep a run folder mirrored in the object store while it runs, as committed generations.

    sync = RunSync(run_dir, uri, every_seconds=30, deadline_s=25, resume=False)
    sync.attach()        # before any work: probe the store; refuse a run id that holds a run
    with sync:           # a thread uploads changed files and commits a "running" generation
        train(...)       # whenever something changed, every 30 s
    # leaving the block (normally, by an exception, or by SIGTERM/SIGINT) runs final(status):
    # one last round and a generation with the end status, within deadline_s; it never raises.

The store layout and why a kill at any instant loses nothing: `pgolf.store.runstore`. manifest.json in
the run folder is the newest generation this folder committed; it is written before the store's
copy, so a folder is never behind the store it came from.

A round uploads only files whose (size, mtime) changed and whose content is not already stored
(files under 32 MiB are read once, so the hash is of the bytes sent, even for a growing train.log).
Temp files (`*.tmp*`) and dotfiles are never uploaded: writers create `.<name>.tmp-<uuid>` and
rename, so a half-written file is never seen under its final name.

A store that is down never raises into training: a round logs one warning and the next round tries
again. final() stops at its deadline (a spot VM gets 30 s to 2 min after the preemption notice),
even when a store call hangs, and reports which files the store does not hold; the run folder is
intact and `pgolf results push RUN_DIR` commits it later.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable

from pgolf.errors import ConfigError, StoreError
from pgolf.fileio import atomic_write_bytes
from pgolf.store.runstore import (COMPLETE, GENERATIONS, KEEP_GENERATIONS, MANIFEST, RUNNING, FileEntry,
                            Generation, RunIdTaken, check_run_id, check_store, generation_key,
                            new_generation, new_lineage, object_key, parse_generation, read_latest)
from pgolf.store import (ChecksumMismatch, ObjectStore, PreconditionFailed, S3Options,
                         StoreUnavailable, open_store, sha256_bytes, sha256_file, validate_key)

log = logging.getLogger(__name__)

SNAPSHOT_MAX_BYTES = 32 * 1024 * 1024  # smaller files are read once into memory: hash == upload
WARN_EVERY_S = 120.0  # during an outage, repeat the warning at most this often
TRANSIENT = (StoreUnavailable, ChecksumMismatch, OSError)  # worth another try before the deadline


@dataclass
class SyncReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: int = 0
    dropped: list[str] = field(default_factory=list)  # committed before, deleted locally since
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> one-line reason
    permanent: bool = False  # a failure that retrying cannot fix (credentials, bucket, 2 writers)
    generation: int | None = None  # the generation this folder's content is committed as
    unsynced: list[str] = field(default_factory=list)  # local files the store lacks, when not ok
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


def read_local_generation(run_dir: Path, run_id: str | None = None) -> Generation | None:
    """The generation a run folder last committed (or was pulled as), from its manifest.json."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    return parse_generation(run_id or Path(run_dir).name, path.read_bytes(), str(path))


def folder_status(run_dir: Path) -> str:
    """The status to commit for a folder pushed by hand: complete when the pipeline got to
    summary.json, else the end status its last commit recorded, else interrupted."""
    if (Path(run_dir) / "summary.json").is_file():
        return COMPLETE
    try:
        local = read_local_generation(Path(run_dir))
    except StoreError:
        local = None
    if local is not None and local.status not in (RUNNING, COMPLETE):
        return local.status
    return "interrupted"


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__


class RunSync:
    """Mirror `run_dir` to `<uri>/<run_id>/` every `every_seconds`; final() commits the end.

    `uri` is a store URI (`s3://bucket/prefix`, `file:///dir`) or an opened ObjectStore.
    `every_seconds <= 0` disables the thread (only final() uploads). `deadline_s` bounds final().
    `resume=True` may continue a run the store already holds, if this folder is a copy of it.
    """

    def __init__(self, run_dir: str | Path, uri: str | ObjectStore, *, run_id: str | None = None,
                 every_seconds: float = 30.0, deadline_s: float = 25.0,
                 retry_every_s: float = 1.0, options: S3Options | None = None,
                 resume: bool = False):
        if not (math.isfinite(every_seconds) and math.isfinite(deadline_s) and deadline_s > 0):
            raise ConfigError(f"sync every {every_seconds} s with a {deadline_s} s deadline: both "
                              "must be finite and the deadline > 0 (SYNC_EVERY_SECONDS, "
                              "SYNC_DEADLINE_SECONDS)")
        self.run_dir = Path(run_dir)
        self.run_id = check_run_id(run_id or self.run_dir.resolve().name)
        self.store: ObjectStore = open_store(uri, options) if isinstance(uri, str) else uri
        self.every_seconds = every_seconds
        self.deadline_s = deadline_s
        self.retry_every_s = retry_every_s
        self.resume = resume
        self.files: dict[str, FileEntry] = {}  # local files as last uploaded by this process
        self._stat: dict[str, tuple[int, int]] = {}  # (size, mtime_ns) each entry was read at
        self.local: set[str] = set()  # the last scan
        self.seen: set[str] = set()  # every path this process found locally
        self.base: dict[str, FileEntry] = {}  # the committed generation this run continues
        self.remote_keys: set[str] = set()  # object keys (under <run_id>/) known to exist
        self.committed: list[Generation] = []  # the newest KEEP_GENERATIONS, oldest first
        self.next_number = 1
        self.lineage = new_lineage()
        self.attached = False
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

    @property
    def report(self) -> SyncReport | None:
        """final()'s report, once it ran."""
        return self._final

    # -- before any work -----------------------------------------------------------------------

    def attach(self) -> None:
        """Probe the store, then read what it holds of this run id. Raises a one-line StoreError
        when the store is unusable, when a new run would reuse a committed run's id, or when a
        resumed folder is not a copy of the newest committed generation."""
        if self.attached:
            return
        check_store(self.store)
        stored = read_latest(self.store, self.run_id)
        local = read_local_generation(self.run_dir, self.run_id) if self.resume else None
        where = f"{self.store.uri}/{self.run_id}"
        if stored is not None:
            if not self.resume:
                raise RunIdTaken(f"run id {self.run_id} already holds a committed run in {where} "
                                 f"({stored.describe()}): choose another RUN_ID, or pass "
                                 "--resume to continue that run")
            if local is None or local.lineage != stored.lineage or local.number < stored.number:
                have = "no manifest.json" if local is None else local.describe()
                raise StoreError(f"--resume: {self.run_dir} ({have}) is not a copy of the newest "
                                 f"committed generation of {where} ({stored.describe()}): pull it "
                                 f"first (pgolf results pull {self.run_id} --from "
                                 f"{self.store.uri} --to {self.run_dir.parent})")
            self.base = dict(stored.files)
            self.committed = [stored]
        if local is not None:
            self.lineage = local.lineage or self.lineage
            self.next_number = local.number + 1
        if stored is not None:
            self.lineage = stored.lineage or self.lineage
            self.next_number = max(self.next_number, stored.number + 1)
        prefix = self.run_id + "/"
        self.remote_keys = {o.key[len(prefix):] for o in self.store.list(prefix)}
        self.attached = True

    # -- one round -----------------------------------------------------------------------------

    def sync_once(self, status: str = RUNNING) -> SyncReport:
        """Upload new or changed files, then commit a generation if anything changed.
        Never raises: failures are in report.failed."""
        t0 = time.monotonic()
        with self._lock:
            report = self._round_and_commit(status)
            self.rounds += 1
        report.seconds = time.monotonic() - t0
        self._log_round(report)
        return report

    def _round_and_commit(self, status: str) -> SyncReport:
        report = SyncReport()
        try:
            self.attach()
            self._upload_changed(report)
            if report.ok:
                self._commit(status, report)
        except PreconditionFailed as exc:
            report.failed[MANIFEST] = (f"another process committed generation "
                                       f"{self.next_number} of {self.run_id} first: two writers "
                                       f"for one run id ({_one_line(exc)})")
            report.permanent = True
        except TRANSIENT as exc:
            report.failed.setdefault(MANIFEST, _one_line(exc))
        except StoreError as exc:
            report.failed.setdefault(MANIFEST, _one_line(exc))
            report.permanent = True
        except Exception as exc:  # never into training
            report.failed.setdefault(MANIFEST, f"{type(exc).__name__}: {exc}")
        return report

    def _upload_changed(self, report: SyncReport) -> None:
        rels = scan_run_dir(self.run_dir) if self.run_dir.is_dir() else []
        self.local = set(rels)
        self.seen.update(rels)
        for rel in rels:
            try:
                if self._sync_file(rel):
                    report.uploaded.append(rel)
                else:
                    report.skipped += 1
            except FileNotFoundError:
                self.local.discard(rel)  # removed between the scan and the read
            except StoreUnavailable as exc:
                report.failed[rel] = _one_line(exc)  # every other file would wait out the same
                break                                # timeout: end the round now
            except StoreError as exc:
                report.failed[rel] = _one_line(exc)
                report.permanent = report.permanent or not isinstance(exc, ChecksumMismatch)
            except OSError as exc:
                report.failed[rel] = _one_line(exc)

    def _sync_file(self, rel: str) -> bool:
        """Make the store hold this file's current content under its own key. True if sent."""
        path = self.run_dir / rel
        st = path.stat()
        stat = (st.st_size, st.st_mtime_ns)
        if self._stat.get(rel) == stat and rel in self.files:
            return False
        if st.st_size <= SNAPSHOT_MAX_BYTES:
            data = path.read_bytes()  # growing logs: hash and send the very same bytes
            sha = sha256_bytes(data)
            entry = FileEntry(rel, len(data), sha, object_key(rel, sha))
            sent = entry.key not in self.remote_keys
            if sent:
                self.store.put_bytes(self.key(entry.key), data)
            complete = len(data) == st.st_size
        else:
            sha = sha256_file(path)
            entry = FileEntry(rel, st.st_size, sha, object_key(rel, sha))
            sent = entry.key not in self.remote_keys
            if sent:
                info = self.store.put_file(self.key(entry.key), path)
                if info.sha256 != sha:  # replaced between our hash and the upload: next round
                    self.store.delete(self.key(entry.key))
                    return True
            complete = (path.stat().st_size, path.stat().st_mtime_ns) == stat
        self.remote_keys.add(entry.key)
        self.files[rel] = entry
        if complete:
            self._stat[rel] = stat
        else:
            self._stat.pop(rel, None)  # changed while read: look again next round
        return sent

    def _commit(self, status: str, report: SyncReport) -> None:
        """Write the next generation if the folder or the status changed, then clean up."""
        newest = self.committed[-1] if self.committed else None
        if newest is None and not self._candidate():
            return  # nothing written yet: no generation, and no folder made for a writer to find
        if newest is not None and newest.status == status and newest.files == self._candidate():
            report.generation = newest.number  # nothing new: not even a listing
            return
        prefix = self.run_id + "/"
        listing = {o.key[len(prefix):]: o.size for o in self.store.list(prefix)}
        lost = sorted(rel for rel in self.local if rel in self.files
                      and listing.get(self.files[rel].key) != self.files[rel].size)
        if lost:  # the store lost objects (a server restarted without its data): send again
            log.warning("store is missing %d file(s) of %s (e.g. %s): uploading again",
                        len(lost), self.run_id, lost[0])
            for rel in lost:
                self.remote_keys.discard(self.files[rel].key)
                self._stat.pop(rel, None)
            self._upload_changed(report)
            if not report.ok:
                return
            listing = {o.key[len(prefix):]: o.size for o in self.store.list(prefix)}
        files = self._candidate()
        for rel, entry in list(files.items()):
            if rel not in self.local and listing.get(entry.key) != entry.size:
                log.warning("the store lost %s of %s (committed earlier, not in this folder)",
                            rel, self.run_id)
                del files[rel]
        if newest is not None:
            report.dropped = sorted(set(newest.files) - set(files))
            if newest.status == status and newest.files == files:
                report.generation = newest.number
                return
        gen = new_generation(self.run_id, self.next_number, status, self.lineage, files)
        atomic_write_bytes(self.run_dir / MANIFEST, gen.raw)  # the folder first: never behind
        self.store.put_bytes(self.key(generation_key(gen.number)), gen.raw, if_absent=True)
        self.store.put_bytes(self.key(MANIFEST), gen.raw)
        self.committed = (self.committed + [gen])[-KEEP_GENERATIONS:]
        self.next_number = gen.number + 1
        report.generation = gen.number
        self._collect_garbage(listing)

    def _candidate(self) -> dict[str, FileEntry]:
        """The next generation's files: this folder's, plus committed files it never had."""
        files = {rel: e for rel, e in self.base.items() if rel not in self.seen}
        files.update((rel, self.files[rel]) for rel in self.local if rel in self.files)
        return files

    def _collect_garbage(self, listing: dict[str, int]) -> None:
        """Delete what the kept generations do not name: old generation files first, so a
        generation file never names a deleted object. Best effort: a failure waits for the
        next commit."""
        keep = {MANIFEST} | {generation_key(g.number) for g in self.committed}
        keep |= {e.key for g in self.committed for e in g.files.values()}
        stale = sorted((k for k in listing if k not in keep),
                       key=lambda k: (not k.startswith(GENERATIONS + "/"), k))
        for rel in stale:
            try:
                self.store.delete(self.key(rel))
            except (StoreError, OSError) as exc:
                log.debug("clean-up of %s/%s postponed: %s", self.run_id, rel, exc)
                return
            self.remote_keys.discard(rel)

    def pending(self) -> list[str]:
        """Local files whose current content the newest committed generation does not hold.
        Safe to call while another thread is stuck in a store call."""
        newest = dict(self.committed[-1].files) if self.committed else {}
        files, stats = dict(self.files), dict(self._stat)
        out = []
        for rel in scan_run_dir(self.run_dir) if self.run_dir.is_dir() else []:
            try:
                st = (self.run_dir / rel).stat()
            except OSError:
                continue
            entry = newest.get(rel)
            if entry is None or files.get(rel) != entry or stats.get(rel) != (st.st_size,
                                                                              st.st_mtime_ns):
                out.append(rel)
        return out

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
            log.info("synced %d file(s) of %s to %s in %.1f s (generation %s)",
                     len(report.uploaded), self.run_id, self.store.uri, report.seconds,
                     report.generation)

    # -- the thread ----------------------------------------------------------------------------

    def start(self) -> "RunSync":
        self.attach()
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
        """Last round and a generation with `status`, within deadline_s even if a store call
        hangs. Idempotent; never raises; report.unsynced names what the store lacks."""
        if self._final is not None:
            return self._final
        self._in_final = True
        self._stop.set()
        deadline = time.monotonic() + self.deadline_s
        box: list[SyncReport] = []
        worker = threading.Thread(target=lambda: box.append(self._final_work(status, deadline)),
                                  name=f"runsync-final-{self.run_id}", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()) + 0.2)
        if box:
            report = box[0]
        else:  # a store call is still hanging: leave it behind (a daemon thread)
            report = SyncReport(failed={MANIFEST: f"the store did not answer within "
                                                  f"{self.deadline_s:g} s"})
            report.unsynced = self.pending()
        self._final = report
        self._log_final(report)
        return report

    def _final_work(self, status: str, deadline: float) -> SyncReport:
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            report = SyncReport(failed={MANIFEST: "a background upload is stuck in a store call"})
            report.unsynced = self.pending()
            return report
        try:
            t0 = time.monotonic()
            while True:
                report = self._round_and_commit(status)
                if report.ok or report.permanent or \
                        time.monotonic() + self.retry_every_s > deadline:
                    break
                time.sleep(self.retry_every_s)
            report.seconds = time.monotonic() - t0
            if not report.ok:
                report.unsynced = self.pending()
            return report
        finally:
            self._lock.release()

    def _log_final(self, report: SyncReport) -> None:
        where = f"{self.store.uri}/{self.run_id}"
        if report.ok:
            newest = self.committed[-1] if self.committed else None
            log.info("run %s committed to %s: %s", self.run_id, where,
                     newest.describe() if newest else "nothing to commit")
            return
        missing = report.unsynced
        shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        log.error("final sync of %s to %s did not commit within %g s (%s): %d file(s) not in the "
                  "store%s; the run folder is intact at %s: pgolf results push %s --to %s",
                  self.run_id, where, self.deadline_s, next(iter(report.failed.values())),
                  len(missing), f" ({shown})" if missing else "", self.run_dir.resolve(),
                  self.run_dir.resolve(), self.store.uri)

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
            if signal.getsignal(signum) == signal.SIG_IGN:  # nohup, or a background job: keep ignoring it
                continue
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
