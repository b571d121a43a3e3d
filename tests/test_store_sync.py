"""RunSync: incremental rounds, committed generations, outages, restarts and signals."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pgolf.errors import ConfigError, StoreError
from pgolf.store.runstore import MANIFEST, Generation, RunIdTaken, parse_generation, read_latest
from pgolf.store.seaweed import LocalSeaweed
from pgolf.store import S3Options, StoreUnavailable, open_store, sha256_file
from pgolf.store.file import FileStore
from pgolf.store.sync import RunSync, scan_run_dir
from store_fixtures import (TEST_BUCKET, backend, backend_env, make_run_dir,  # noqa: F401
                            s3_options, seaweed_server)


def assert_store_matches_folder(store, run: Path) -> Generation:
    """The newest generation lists exactly the folder's files, every object holds those bytes,
    and the folder's manifest.json is the store's pointer, byte for byte."""
    gen = read_latest(store, run.name)
    assert gen is not None
    local = {rel: (run / rel) for rel in scan_run_dir(run)}
    assert sorted(gen.files) == sorted(local)
    for entry in gen.files.values():
        data = local[entry.path].read_bytes()
        assert (entry.size, entry.sha256) == (len(data), sha256_file(local[entry.path]))
        assert entry.key == f"{entry.path}@{entry.sha256[:16]}"
        assert store.get_bytes(f"{run.name}/{entry.key}") == data
    assert (run / MANIFEST).read_bytes() == store.get_bytes(f"{run.name}/{MANIFEST}") == gen.raw
    return gen


class RecordingStore(FileStore):
    """A real file:// store that also records every write, in order."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.puts: list[str] = []

    def put_bytes(self, key, data, **kw):
        self.puts.append(key)
        return super().put_bytes(key, data, **kw)

    def put_file(self, key, path, **kw):
        self.puts.append(key)
        return super().put_file(key, path, **kw)


def test_scan_skips_temp_dot_and_manifest(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    (run / ".train.log.tmp-1a2b").write_text("half")
    (run / "artifact.pgz.tmp").write_text("half")
    (run / ".hidden").mkdir()
    (run / ".hidden" / "x").write_text("x")
    (run / MANIFEST).write_text("{}")
    os.symlink(run / "train.log", run / "link.log")
    assert scan_run_dir(run) == ["artifact.pgz", "checkpoint/ema.pt", "config.json",
                                 "metrics.jsonl", "summary.json", "train.log"]


def test_rounds_commit_generations_and_never_overwrite_an_object(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "runs")
    store = RecordingStore(tmp_path / "store")
    sync = RunSync(run, store, every_seconds=0)
    first = sync.sync_once()
    assert sorted(first.uploaded) == scan_run_dir(run) and first.ok and first.generation == 1
    assert store.puts[-2:] == [f"{run.name}/generations/000001.json", f"{run.name}/{MANIFEST}"]
    assert read_latest(store, run.name).status == "running"
    second = sync.sync_once()  # nothing changed: nothing sent, no new generation
    assert second.uploaded == [] and second.skipped == len(first.uploaded)
    assert second.generation == 1
    with open(run / "train.log", "a") as fh:
        fh.write("step:2/10 train_loss:6.5\n")
    os.utime(run / "summary.json")  # touched but unchanged: re-hashed, not re-sent
    third = sync.sync_once()
    assert third.uploaded == ["train.log"] and third.generation == 2
    (run / "checkpoint" / "ema.pt").unlink()  # deleted locally: dropped by the next generation
    report = sync.final()
    assert report.ok and report.generation == 3 and report.dropped == ["checkpoint/ema.pt"]
    assert store.puts[-1] == f"{run.name}/{MANIFEST}"  # the pointer is written last
    gen = assert_store_matches_folder(store, run)
    assert (gen.number, gen.status, gen.lineage) == (3, "complete", sync.lineage)
    assert sync.final() is report  # idempotent
    # Only the newest two generations and the objects they name are kept...
    keys = {o.key for o in store.list(run.name + "/")}
    assert {k for k in keys if "/generations/" in k} == {f"{run.name}/generations/000002.json",
                                                         f"{run.name}/generations/000003.json"}
    named = {f"{run.name}/{e.key}" for n in (2, 3) for e in parse_generation(
        run.name, store.get_bytes(f"{run.name}/generations/{n:06d}.json"), "g").files.values()}
    assert keys == named | {f"{run.name}/generations/000002.json",
                            f"{run.name}/generations/000003.json", f"{run.name}/{MANIFEST}"}
    # ...and no key but the pointer was ever written twice: a committed object never changes.
    objects = [k for k in store.puts if not k.endswith(MANIFEST)]
    assert len(objects) == len(set(objects))


def test_resume_carries_committed_files_and_refuses_a_stale_or_foreign_folder(tmp_path: Path
                                                                              ) -> None:
    store = FileStore(tmp_path / "store")
    run = make_run_dir(tmp_path / "runs")
    assert RunSync(run, store, every_seconds=0).final("interrupted (SIGTERM)").ok
    first = read_latest(store, run.name)
    node = tmp_path / "node" / run.name  # a fresh node pulled it, then lost one file
    shutil.copytree(run, node)
    (node / "artifact.pgz").unlink()
    (node / "train.log").write_text("resumed\n")
    report = RunSync(node, store, every_seconds=0, resume=True).final()
    gen = read_latest(store, run.name)
    assert report.ok and (gen.number, gen.status, gen.lineage) == (2, "complete", first.lineage)
    assert gen.files["artifact.pgz"] == first.files["artifact.pgz"]  # carried, not dropped
    assert store.get_bytes(f"{run.name}/{gen.files['artifact.pgz'].key}") == \
        (run / "artifact.pgz").read_bytes()
    stale = tmp_path / "stale" / run.name  # still generation 1: the store moved on
    shutil.copytree(run, stale)
    with pytest.raises(StoreError, match="is not a copy of the newest committed generation"):
        RunSync(stale, store, every_seconds=0, resume=True).attach()
    foreign = tmp_path / "foreign" / run.name
    foreign.mkdir(parents=True)
    (foreign / MANIFEST).write_bytes(gen.raw.replace(gen.lineage.encode(), b"0" * 16))
    with pytest.raises(StoreError, match="is not a copy"):
        RunSync(foreign, store, every_seconds=0, resume=True).attach()
    with pytest.raises(RunIdTaken, match="already holds a committed run"):
        RunSync(foreign, store, every_seconds=0).attach()


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    """Credentials revoked mid-run: the end commit stops at the first answer, long before its
    deadline, and says why."""
    uri = f"s3://{TEST_BUCKET}/perm-{time.time_ns()}"
    run = make_run_dir(tmp_path / "runs")
    sync = RunSync(run, uri, every_seconds=0, deadline_s=30, options=s3_options("seaweed"))
    assert sync.sync_once().ok
    good = s3_options("seaweed")
    sync.store = open_store(uri, S3Options(endpoint_url=good.endpoint_url, access_key=good.access_key,
                                           secret_key="revoked", max_attempts=1))
    (run / "summary.json").write_text('{"val_bpb": 1.0}')
    t0 = time.monotonic()
    report = sync.final()
    assert not report.ok and report.permanent and time.monotonic() - t0 < 10
    assert "rejected the credentials" in next(iter(report.failed.values()))
    assert "summary.json" in report.unsynced


def test_background_thread_and_context_manager(tmp_path: Path, backend: str) -> None:
    from store_fixtures import unique_uri

    run = make_run_dir(tmp_path / "runs")
    uri = unique_uri(backend, tmp_path)
    opts = None if backend == "file" else s3_options(backend)
    with RunSync(run, uri, every_seconds=0.05, options=opts) as sync:
        deadline = time.monotonic() + 10
        while read_latest(sync.store, run.name) is None:
            assert time.monotonic() < deadline, "the thread never committed"
            time.sleep(0.02)
        (run / "eval_summary.json").write_text('{"val_bpb": 1.08}')
    assert assert_store_matches_folder(open_store(uri, opts), run).status == "complete"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_exception_still_commits_and_propagates(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "runs")
    store = FileStore(tmp_path / "store")
    with pytest.raises(ValueError, match="boom"):
        with RunSync(run, store, every_seconds=0):
            raise ValueError("boom")
    assert read_latest(store, run.name).status == "failed (ValueError)"


def test_store_down_at_start_fails_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opts = S3Options(endpoint_url=f"http://127.0.0.1:{port}", access_key="k", secret_key="s",
                     max_attempts=1, connect_timeout=0.5)
    run = make_run_dir(tmp_path / "runs")
    with pytest.raises(StoreUnavailable, match="cannot reach the S3 endpoint"):
        RunSync(run, "s3://b/p", options=opts).attach()
    with pytest.raises(ConfigError, match="finite"):
        RunSync(run, "s3://b/p", every_seconds=math.inf, options=opts)


def test_server_killed_mid_sync_and_restarted(tmp_path: Path) -> None:
    """SeaweedFS SIGKILLed while the thread syncs, restarted during final(): the commit waits
    for it, re-sends what changed meanwhile, and the manifest is complete and true."""
    server = LocalSeaweed(tmp_path / "weed", bucket=TEST_BUCKET)
    server.start(timeout_s=60)
    try:
        opts = server.options(max_attempts=1, connect_timeout=0.5, read_timeout=5)
        run = make_run_dir(tmp_path / "runs")
        sync = RunSync(run, f"s3://{TEST_BUCKET}/runs", every_seconds=0.05,
                       deadline_s=45, retry_every_s=0.2, options=opts).start()
        store = sync.store
        deadline = time.monotonic() + 15
        while read_latest(store, run.name) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.kill()
        for i in range(5):  # training goes on while the store is down
            with open(run / "train.log", "a") as fh:
                fh.write(f"step:{i + 2}/10 train_loss:6.{i}\n")
            (run / f"checkpoint/step{i}.bin").write_bytes(os.urandom(10_000))
            time.sleep(0.05)
        (run / "eval_summary.json").write_text('{"val_bpb": 1.0821}')
        restarter = threading.Timer(1.0, server.start)
        restarter.start()
        report = sync.final()
        restarter.join()
        assert report.ok and report.generation is not None
        assert_store_matches_folder(store, run)
    finally:
        server.stop()


CHILD = textwrap.dedent("""
    import logging, signal, sys, time
    from pathlib import Path
    from pgolf.store.sync import RunSync
    logging.basicConfig(level=logging.INFO)
    # Python keeps SIGINT ignored when it starts ignored (a suite run as a background job): this child
    # stands for a foreground run, so it takes SIGINT as one does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run, uri = Path(sys.argv[1]), sys.argv[2]
    run.mkdir(parents=True)
    with RunSync(run, uri, every_seconds=0.1) as sync:
        step = 0
        while True:  # a stand-in training loop, stopped only by the signal
            (run / f"step{step:04d}.txt").write_text(f"loss {step}")
            with open(run / "train.log", "a") as fh:
                fh.write(f"step:{step}\\n")
            if step == 5:
                print("ready", flush=True)
            step += 1
            time.sleep(0.02)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_child_commits_files_so_far(tmp_path: Path, signum: int) -> None:
    seaweed_server()
    uri = f"s3://{TEST_BUCKET}/child-{time.time_ns()}"
    run = tmp_path / "runs" / "child-run"
    env = {"PATH": os.environ["PATH"], **backend_env("seaweed"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run), uri], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signum, err  # re-raised: the parent sees death by that signal
    store = open_store(uri, s3_options("seaweed"))
    gen = assert_store_matches_folder(store, run)
    assert gen.status == f"interrupted ({signal.Signals(signum).name})"
    assert len([p for p in gen.files if p.startswith("step")]) >= 6


def test_an_ignored_signal_stays_ignored(tmp_path: Path) -> None:
    """Under nohup or as a background job SIGINT is ignored: RunSync must not take it over (a Ctrl-C
    meant for the shell would then commit an "interrupted" run that goes on training)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sync = RunSync(make_run_dir(tmp_path), f"file://{tmp_path / 'store'}", every_seconds=0)
        assert sync.install_signal_handlers()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == sync._on_signal
        sync.restore_signal_handlers()
    finally:
        signal.signal(signal.SIGINT, previous)

