"""RunSync: incremental rounds, the manifest commit, outages, restarts and signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pgolf.seaweed import LocalSeaweed
from pgolf.store import S3Options, open_store, sha256_file
from pgolf.store.file import FileStore
from pgolf.sync import MANIFEST, RunSync, scan_run_dir
from store_fixtures import (TEST_BUCKET, backend, backend_env, make_run_dir,  # noqa: F401
                            s3_options, seaweed_server)


def manifest_of(store, run_id: str) -> dict:
    return json.loads(store.get_bytes(f"{run_id}/{MANIFEST}"))


def assert_store_matches_folder(store, run: Path) -> dict:
    """The store's manifest lists exactly the folder's files, and every object matches."""
    manifest = manifest_of(store, run.name)
    local = {rel: (run / rel) for rel in scan_run_dir(run)}
    assert [f["path"] for f in manifest["files"]] == sorted(local)
    for f in manifest["files"]:
        assert f["size"] == local[f["path"]].stat().st_size
        assert f["sha256"] == sha256_file(local[f["path"]])
        assert store.get_bytes(f"{run.name}/{f['path']}") == local[f["path"]].read_bytes()
    assert (run / MANIFEST).read_bytes() == store.get_bytes(f"{run.name}/{MANIFEST}")
    return manifest


class RecordingStore(FileStore):
    """A real file:// store that also records the order of writes."""

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


def test_rounds_upload_only_changes_and_final_commits_last(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "runs")
    store = RecordingStore(tmp_path / "store")
    sync = RunSync(run, store, every_seconds=0)
    first = sync.sync_once()
    assert sorted(first.uploaded) == scan_run_dir(run) and first.ok
    assert store.head(f"{run.name}/{MANIFEST}") is None  # not committed by a plain round
    second = sync.sync_once()
    assert second.uploaded == [] and second.skipped == len(first.uploaded)
    with open(run / "train.log", "a") as fh:
        fh.write("step:2/10 train_loss:6.5\n")
    os.utime(run / "summary.json")  # touched but unchanged: re-hashed, not re-sent
    third = sync.sync_once()
    assert third.uploaded == ["train.log"]
    (run / "checkpoint" / "ema.pt").unlink()  # deleted locally: dropped from the store at commit
    store.puts.clear()
    report = sync.final()
    assert report.ok and report.manifest_written and report.deleted == ["checkpoint/ema.pt"]
    assert store.puts[-1] == f"{run.name}/{MANIFEST}"  # the commit marker is written last
    assert store.head(f"{run.name}/checkpoint/ema.pt") is None
    manifest = assert_store_matches_folder(store, run)
    assert manifest["run_id"] == run.name and manifest["status"] == "complete"
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    assert sync.final() is report  # idempotent


def test_background_thread_and_context_manager(tmp_path: Path, backend: str) -> None:
    from store_fixtures import unique_uri

    run = make_run_dir(tmp_path / "runs")
    uri = unique_uri(backend, tmp_path)
    opts = None if backend == "file" else s3_options(backend)
    with RunSync(run, uri, every_seconds=0.05, options=opts) as sync:
        deadline = time.monotonic() + 10
        while sync.store.head(f"{run.name}/summary.json") is None:
            assert time.monotonic() < deadline, "the thread never synced"
            time.sleep(0.02)
        (run / "eval_summary.json").write_text('{"val_bpb": 1.08}')
    assert_store_matches_folder(open_store(uri, opts), run)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_exception_still_commits_and_propagates(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "runs")
    store = FileStore(tmp_path / "store")
    with pytest.raises(ValueError, match="boom"):
        with RunSync(run, store, every_seconds=0):
            raise ValueError("boom")
    assert manifest_of(store, run.name)["status"] == "failed (ValueError)"


def test_store_down_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opts = S3Options(endpoint_url=f"http://127.0.0.1:{port}", access_key="k", secret_key="s",
                     max_attempts=1, connect_timeout=0.5)
    run = make_run_dir(tmp_path / "runs")
    sync = RunSync(run, "s3://b/p", every_seconds=0.05, final_timeout_s=0.5, retry_every_s=0.1,
                   options=opts)
    with sync:
        time.sleep(0.3)
    assert sync.rounds >= 3  # the thread kept trying
    report = sync.final()
    assert not report.ok and not report.manifest_written
    assert "will retry" in caplog.text and "pgolf results push" in caplog.text
    assert not (run / MANIFEST).exists()


def test_server_killed_mid_sync_and_restarted(tmp_path: Path) -> None:
    """SeaweedFS SIGKILLed while the thread syncs, restarted during final(): the commit waits
    for it, re-sends what changed meanwhile, and the manifest is complete and true."""
    server = LocalSeaweed(tmp_path / "weed", bucket=TEST_BUCKET)
    server.start(timeout_s=60)
    try:
        opts = server.options(max_attempts=1, connect_timeout=0.5, read_timeout=5)
        run = make_run_dir(tmp_path / "runs")
        sync = RunSync(run, f"s3://{TEST_BUCKET}/runs", every_seconds=0.05,
                       final_timeout_s=45, retry_every_s=0.2, options=opts).start()
        store = sync.store
        deadline = time.monotonic() + 15
        while store.head(f"{run.name}/artifact.pgz") is None:
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
        assert report.ok and report.manifest_written
        assert_store_matches_folder(store, run)
    finally:
        server.stop()


CHILD = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from pgolf.sync import RunSync
    logging.basicConfig(level=logging.INFO)
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
    manifest = assert_store_matches_folder(store, run)
    assert manifest["status"] == f"interrupted ({signal.Signals(signum).name})"
    assert len([f for f in manifest["files"] if f["path"].startswith("step")]) >= 6
