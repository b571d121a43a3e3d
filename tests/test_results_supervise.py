"""`pgolf results sync -- COMMAND`: the store sync around a command that has none (train_gpt.py).

Real processes and a real file:// store; the faults are real too (a child that fails, a SIGTERM to
the supervisor, a store path that cannot be written).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgolf.cli import main
from pgolf.store.runstore import read_latest
from pgolf.store.file import FileStore

PGOLF = Path(sys.executable).with_name("pgolf")

# A stand-in for train_gpt.py: writes into runs/$RUN_ID/, reports what it was given, exits as told.
CHILD = """
import json, os, pathlib, signal, sys, time
d = pathlib.Path(os.environ.get("RUNS_DIR", "runs")) / os.environ["RUN_ID"]
d.mkdir(parents=True, exist_ok=True)
(d / "seen.json").write_text(json.dumps({k: os.environ.get(k) for k in ("RUN_ID", "RESULTS_URI", "EXTRA")}))
def on_term(signum, frame):
    (d / "got-sigterm").write_text("bye")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
(d / "ready").write_text("1")
if sys.argv[1] == "wait":
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def node(tmp_path, monkeypatch):
    """cwd = a node's workdir; the store is a folder; no RUN_ID/RESULTS_URI from the outer shell."""
    monkeypatch.chdir(tmp_path)
    for name in ("RUN_ID", "RESULTS_URI", "RUNS_DIR", "PRESET", "SEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXTRA", "passed-through")
    return tmp_path


def manifest(store: Path, run_id: str) -> dict:
    return json.loads((store / run_id / "manifest.json").read_text())


def stored(store: Path, run_id: str, path: str) -> bytes:
    """A file of the run's newest committed generation, read back from the store."""
    gen = read_latest(FileStore(store), run_id)
    return FileStore(store).get_bytes(f"{run_id}/{gen.files[path].key}")


def test_the_command_runs_with_the_run_id_and_its_folder_is_committed(node):
    store = node / "store"
    code = main(["results", "sync", "--to", f"file://{store}", "--run-id", "r1", "--", sys.executable, "-c",
                 CHILD, "0"])
    assert code == 0
    seen = json.loads(stored(store, "r1", "seen.json"))
    assert seen == {"RUN_ID": "r1", "RESULTS_URI": "", "EXTRA": "passed-through"}  # it must not sync itself
    m = manifest(store, "r1")
    assert m["status"] == "complete" and {f["path"] for f in m["files"]} == {"seen.json", "ready"}


def test_without_a_run_id_one_is_chosen_and_passed_down(node, monkeypatch):
    monkeypatch.setenv("RESULTS_URI", f"file://{node / 'store'}")
    monkeypatch.setenv("SEED", "42")
    assert main(["results", "sync", "--", sys.executable, "-c", CHILD, "0"]) == 0
    (run_id,) = [p.name for p in (node / "store").iterdir() if not p.name.startswith(".")]
    assert run_id.startswith("seed-s42-") and (node / "runs" / run_id / "manifest.json").is_file()


def test_a_failing_command_keeps_its_exit_code_and_its_files(node):
    store = node / "store"
    assert main(["results", "sync", "--to", f"file://{store}", "--run-id", "r2", "--", sys.executable, "-c",
                 CHILD, "3"]) == 3
    assert manifest(store, "r2")["status"] == "failed (exit 3)" and stored(store, "r2", "seen.json")


def test_no_store_is_an_error_before_the_command_starts(node, capsys):
    assert main(["results", "sync", "--run-id", "r3", "--", sys.executable, "-c", CHILD, "0"]) == 2
    assert "no store to sync to" in capsys.readouterr().err
    assert not (node / "runs").exists()


def test_an_unusable_store_is_an_error_before_the_command_starts(node, capsys):
    (node / "not-a-dir").write_text("a file where the store's folder should be")
    code = main(["results", "sync", "--to", f"file://{node / 'not-a-dir' / 'store'}", "--run-id", "r4",
                 "--", sys.executable, "-c", CHILD, "0"])
    err = capsys.readouterr().err
    assert code == 2 and "is the disk mounted?" in err and not (node / "runs").exists()


def test_an_uncommitted_final_sync_is_an_error_naming_the_local_copy(node, capsys):
    """The store disappears while the command runs (its folder replaced by a file)."""
    store = node / "store"
    breaker = f"import shutil, pathlib; shutil.rmtree({str(store)!r}); pathlib.Path({str(store)!r}).write_text('x')"
    code = main(["results", "sync", "--to", f"file://{store}", "--run-id", "r4", "--timeout", "0.5", "--",
                 "sh", "-c", f"{sys.executable} -c '{CHILD}' 0 && {sys.executable} -c \"{breaker}\""])
    err = capsys.readouterr().err
    assert code == 2 and "r4 finished but its final sync" in err and "runs/r4" in err
    assert "hint: pgolf results push runs/r4" in err


def test_a_run_id_that_holds_a_committed_run_is_refused_before_the_command_starts(node, capsys):
    store = node / "store"
    assert main(["results", "sync", "--to", f"file://{store}", "--run-id", "r6", "--", sys.executable, "-c",
                 CHILD, "0"]) == 0
    before = manifest(store, "r6")
    assert main(["results", "sync", "--to", f"file://{store}", "--run-id", "r6", "--", sys.executable, "-c",
                 CHILD, "0"]) == 2
    assert "run id r6 already holds a committed run" in capsys.readouterr().err
    assert manifest(store, "r6") == before


def test_sigterm_is_passed_to_the_command_then_the_folder_is_committed(node):
    store = node / "store"
    proc = subprocess.Popen([str(PGOLF), "results", "sync", "--to", f"file://{store}", "--run-id", "r5", "--",
                             sys.executable, "-c", CHILD, "wait"], cwd=node, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = node / "runs" / "r5" / "ready"
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert manifest(store, "r5")["status"] == "interrupted (SIGTERM)"
    assert stored(store, "r5", "got-sigterm") == b"bye"  # written by the child after the signal
