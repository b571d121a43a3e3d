"""Fault injection: real `pgolf run` processes against a real SeaweedFS, killed, stopped, misled.

Each test is a reproduction from issue 13, done the way a user would meet it:
- nothing lost: a run killed (SIGTERM or SIGKILL) at every phase boundary and resumed on a fresh
  "node" until done ends bit-identical to an uninterrupted run; so does sky/long.yaml's own run
  block after a SIGKILL; a reused run id never touches the run that holds it; a final sync that
  cannot commit (the store SIGSTOPped) exits non-zero within its deadline and names the local copy;
- told the truth: wrong credentials, a mistyped bucket, a moved store and a missing mount fail
  before any training; hostile manifests are skipped one line each while the rest is pulled;
- bad values: one line, before any work; a real EFBIG mid-run is one line too.
Runs use the debug preset on 40K tokens, 6 steps, a checkpoint every step and short deadlines.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pgolf import results
from pgolf.cli import main
from pgolf.store.runstore import MANIFEST, read_latest
from pgolf.store.seaweed import LocalSeaweed
from pgolf.store import open_store
from pgolf.store.sync import RunSync
from store_fixtures import TEST_BUCKET, backend_env, make_run_dir, s3_options

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PHASES = ("train", "calibrate", "quantize", "eval_postquant", "eval")


def run_env(data: Path, uri: str, server: LocalSeaweed | None = None, **extra: str) -> dict:
    """The environment of a child `pgolf`: the store's credentials and a small, deterministic run
    (no wallclock cap: the schedule depends on steps only; a checkpoint after every step)."""
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(data.parent), "OMP_NUM_THREADS": "1",
           **(server.env() if server else backend_env("seaweed")),
           "RESULTS_URI": uri, "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "tokenizer.model"),
           "ITERATIONS": "6", "MAX_WALLCLOCK_SECONDS": "0", "CHECKPOINT_EVERY_SECONDS": "0.001",
           "EVAL_MODE": "rows", "COMPRESSOR": "zlib", "SYNC_EVERY_SECONDS": "0.2",
           "SYNC_DEADLINE_SECONDS": "10"}
    env.update(extra)
    return env


def start(argv: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants at once, as when the VM goes away: torchrun starts
    its workers in a session of their own, so a process-group kill would miss them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_for(proc: subprocess.Popen, ready, timeout_s: float = 240) -> bool:
    """Poll until ready() (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if ready():
            return True
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.02)
    return False


def phase_done(log: Path, phase: str):
    return lambda: f"phase:{phase} seconds:" in log.read_text(errors="replace")


def outputs(run: Path) -> dict:
    """What an interrupted and resumed run must reproduce exactly."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = torch.load(run / "checkpoint" / "model.pt", weights_only=True)
    return {"artifact": (run / "artifact.pgz").read_bytes(),
            "per_token": (run / "eval_per_token.npz").read_bytes(),
            "weights": {k: v.numpy().tobytes() for k, v in weights.items()},
            "val_bpb": json.loads((run / "eval_summary.json").read_text())["val_bpb"],
            "train": [(e["step"], e["train_loss"]) for e in events if e["event"] == "train"],
            "phases": [e["phase"] for e in events if e["event"] == "phase" and e["phase"] in PHASES]}


@pytest.fixture(scope="module")
def reference(pipeline_data: Path, tmp_path_factory) -> dict:
    """The same run, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    uri = f"s3://{TEST_BUCKET}/ref-{time.time_ns()}"
    env = run_env(pipeline_data, uri)
    proc = subprocess.run([str(BIN / "pgolf"), "run", "--preset", "debug", "--out",
                           str(root / "runs" / "faulty")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = outputs(root / "runs" / "faulty")
    assert out["phases"] == list(PHASES) and [s for s, _ in out["train"]] == [1, 2, 3, 4, 5, 6]
    return out


def assert_same_result(run: Path, reference: dict) -> None:
    got = outputs(run)
    assert got["train"] == reference["train"]  # every step once, the same losses
    assert got["phases"] == reference["phases"]  # every pipeline phase once
    for name in ("artifact", "per_token", "weights", "val_bpb"):
        assert got[name] == reference[name], name
    steps = [line.split()[0] for line in (run / "train.log").read_text().splitlines()
             if " train_loss:" in line]
    assert len(steps) == len(set(steps)) == 6  # no step logged twice


# -- nothing lost ------------------------------------------------------------------------------


KILLS = [("checkpoint", signal.SIGKILL), ("train", signal.SIGTERM), ("calibrate", signal.SIGKILL),
         ("quantize", signal.SIGTERM), ("eval_postquant", signal.SIGKILL), ("eval", signal.SIGKILL)]


def test_killed_at_every_phase_boundary_and_resumed_until_done(pipeline_data, reference, tmp_path):
    """Each attempt runs on a fresh node: pull the newest generation (as sky/long.yaml does),
    `pgolf run --resume`, and is killed at the next boundary; the last one finishes."""
    uri = f"s3://{TEST_BUCKET}/kills-{time.time_ns()}"
    env = run_env(pipeline_data, uri)
    store = open_store(uri, s3_options("seaweed"))
    resumed_from = []
    for attempt, (phase, sig) in enumerate(KILLS + [(None, None)]):
        node = tmp_path / f"node{attempt}"
        pulled = results.pull(store, node / "runs", ["faulty"], if_exists=True, progress=False)
        assert pulled.ok, pulled.errors  # every committed generation can be pulled
        run = node / "runs" / "faulty"
        resume = (run / MANIFEST).is_file()
        assert resume == (attempt > 0)
        if resume:
            resumed_from.append(json.loads((run / MANIFEST).read_text())["status"])
        log = node / "pgolf.log"
        proc = start([str(BIN / "pgolf"), "run", "--preset", "debug", "--out", str(run)]
                     + ["--resume"] * resume, env, node, log)
        if phase is None:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        ready = (lambda: (run / "checkpoint" / "state.pt").is_file()) if phase == "checkpoint" \
            else phase_done(log, phase)
        if wait_for(proc, ready):
            kill_tree(proc.pid, sig)
        code = proc.wait(timeout=120)
        assert code in (-sig, 0) or phase == "eval", (phase, code, log.read_text()[-3000:])
        assert "Traceback" not in log.read_text()
    assert any(s.startswith("interrupted (SIGTERM)") for s in resumed_from)  # a SIGTERM committed
    assert_same_result(run, reference)
    gen = read_latest(store, "faulty")
    assert gen.status == "complete" and gen.raw == (run / MANIFEST).read_bytes()
    final = tmp_path / "final"
    pulled = subprocess.run([str(BIN / "pgolf"), "results", "pull", "--all", "--from", uri,
                             "--to", str(final), "--no-progress"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert_same_result(final / "faulty", reference)


def checkpoint_committed(runs: Path, uri: str) -> bool:
    store = open_store(uri, s3_options("seaweed"))
    for run in runs.glob("*") if runs.is_dir() else []:
        gen = read_latest(store, run.name)
        if gen is not None and "checkpoint/state.pt" in gen.files:
            return True
    return False


def test_sky_long_yaml_resumes_after_a_sigkill(pipeline_data, reference, tmp_path):
    """sky/long.yaml's own run block, on one CPU "node" with torchrun: killed mid-training (the
    VM is gone), then run again on a fresh node, which pulls the run back and finishes it."""
    task = yaml.safe_load((REPO / "sky" / "long.yaml").read_text())
    uri = f"s3://{TEST_BUCKET}/long-{time.time_ns()}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = run_env(pipeline_data, uri, PRESET="debug", SEED="1337", RUN_ID="",
                  SKYPILOT_TASK_ID="sky-managed-2026_pgolf-long_1", SKYPILOT_NUM_NODES="1",
                  SKYPILOT_NUM_GPUS_PER_NODE="1", SKYPILOT_NODE_RANK="0",
                  SKYPILOT_NODE_IPS="127.0.0.1", MASTER_PORT=port)
    runs = []
    for attempt in (0, 1):
        node = tmp_path / f"node{attempt}"
        (node / "sky").mkdir(parents=True)
        (node / "sky" / "node.sh").symlink_to(REPO / "sky" / "node.sh")
        log = node / "run.log"
        proc = start(["bash", "-c", task["run"]], env, node, log)
        if attempt == 0:  # gone once the store holds a checkpoint (a commit every 0.2 s)
            assert wait_for(proc, lambda: checkpoint_committed(node / "runs", uri))
            kill_tree(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        else:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            assert "--resume" in log.read_text() or "resume:" in log.read_text()
        runs.append(node / "runs")
    (run,) = [p for p in runs[1].iterdir() if p.is_dir()]
    assert run.name.startswith("debug-s1337-long-")
    assert "resume" in {json.loads(line).get("phase") for line in
                        (run / "metrics.jsonl").read_text().splitlines()}
    assert_same_result(run, reference)


def test_a_reused_run_id_never_touches_the_run_that_holds_it(pipeline_data, tmp_path, monkeypatch,
                                                            capsys):
    uri = f"s3://{TEST_BUCKET}/reuse-{time.time_ns()}"
    for name, value in backend_env("seaweed").items():
        monkeypatch.setenv(name, value)
    held = make_run_dir(tmp_path / "runs", "X")
    assert RunSync(held, uri, every_seconds=0).final().ok
    store = open_store(uri, s3_options("seaweed"))
    before = {o.key: o.etag for o in store.list("X/")}
    pointer = store.get_bytes(f"X/{MANIFEST}")
    common = ["--preset", "debug", "--data", str(pipeline_data), "--tokenizer-path",
              str(pipeline_data / "tokenizer.model"), "--results-uri", uri]
    other = tmp_path / "other" / "X"

    def refused(argv: list[str], message: str) -> None:
        assert main(["run", *argv, *common]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err

    refused(["--out", str(other)], "run id X already holds a committed run")  # issue's repro
    refused(["--out", str(other), "--resume"], "--resume: no run folder")
    refused(["--out", str(held)], "already holds a run (artifact.pgz")  # the local folder too
    other.mkdir(parents=True)
    (other / "train.log").write_text("someone else's run\n")
    refused(["--out", str(other), "--resume"], "is not a copy of the newest committed generation")
    assert {o.key: o.etag for o in store.list("X/")} == before
    assert store.get_bytes(f"X/{MANIFEST}") == pointer
    assert sorted(p.name for p in other.iterdir()) == ["train.log"]


def test_a_store_stopped_at_the_end_exits_nonzero_within_the_deadline(pipeline_data, tmp_path):
    """SIGSTOP the server once training is done: the run still evaluates, its final sync gives up
    after SYNC_DEADLINE_SECONDS, names what the store lacks and where the folder is, and exits
    non-zero; pull gives up within its timeout; after SIGCONT, push commits the folder."""
    server = LocalSeaweed(tmp_path / "weed", bucket=TEST_BUCKET)
    server.start(timeout_s=60)
    try:
        uri = f"s3://{TEST_BUCKET}/runs"
        env = run_env(pipeline_data, uri, server, SYNC_DEADLINE_SECONDS="3")
        run = tmp_path / "runs" / "stalled"
        log = tmp_path / "run.log"
        proc = start([str(BIN / "pgolf"), "run", "--preset", "debug", "--out", str(run)], env,
                     tmp_path, log)
        assert wait_for(proc, phase_done(log, "train"))
        os.killpg(server.state().pid, signal.SIGSTOP)
        try:
            assert wait_for(proc, phase_done(log, "eval"))
            t_eval = time.monotonic()
            code = proc.wait(timeout=60)
            took = time.monotonic() - t_eval
            text = log.read_text()
            assert code == 2 and took < 3 + 4, (code, took, text[-2000:])
            last = text.strip().splitlines()[-1]
            assert last.startswith("error: the results of run stalled did not reach") and \
                f"pgolf results push {run.resolve()} --to {uri}" in last
            assert re.search(r"did not commit within 3 s \(.*\): \d+ file\(s\) not in the store "
                             r"\(artifact\.pgz, ", text)  # what the store lacks
            assert "Traceback" not in text
            t0 = time.monotonic()
            pull = subprocess.run([str(BIN / "pgolf"), "results", "pull", "--all", "--from", uri,
                                   "--to", str(tmp_path / "r"), "--timeout", "3"], env=env,
                                  capture_output=True, text=True, timeout=60)
            assert pull.returncode == 2 and time.monotonic() - t0 < 15, pull.stderr
            assert pull.stderr.strip().splitlines()[-1].startswith("error: cannot reach")
        finally:
            os.killpg(server.state().pid, signal.SIGCONT)
        push = subprocess.run([str(BIN / "pgolf"), "results", "push", str(run), "--to", uri],
                              env=env, capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        gen = read_latest(open_store(uri, server.options()), "stalled")
        assert gen.status == "complete" and sorted(gen.files) == sorted(
            p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()
            and p.name != MANIFEST)
    finally:
        server.stop()


# -- told the truth before any work -----------------------------------------------------------


def store_cases(tmp_path: Path) -> list[tuple[str, dict, str]]:
    env = backend_env("seaweed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    return [
        (f"s3://{TEST_BUCKET}/runs", {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"},
         "S3 rejected the credentials"),
        ("s3://pgolf-tset/runs", env, "bucket s3://pgolf-tset does not exist"),
        (f"s3://{TEST_BUCKET}/runs", {**env, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed}"},
         "cannot reach the S3 endpoint"),
        (f"file://{tmp_path}/not-mounted/results", {}, "neither"),
    ]


@pytest.mark.parametrize("case", range(4), ids=["credentials", "bucket", "moved", "mount"])
def test_an_unusable_store_fails_before_training(case, pipeline_data, tmp_path, monkeypatch,
                                                 capsys):
    uri, env, message = store_cases(tmp_path)[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    out = tmp_path / "runs" / "r"
    t0 = time.monotonic()
    code = main(["run", "--preset", "debug", "--out", str(out), "--data", str(pipeline_data),
                 "--tokenizer-path", str(pipeline_data / "tokenizer.model"), "--results-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert time.monotonic() - t0 < 20 and not out.exists()
    assert "wrong-secret-value" not in err[0]
    admin = open_store(f"s3://{TEST_BUCKET}", s3_options("seaweed"))
    assert "pgolf-tset" not in [b["Name"] for b in admin.client.list_buckets()["Buckets"]]


def test_pull_all_skips_hostile_manifests_one_line_each(tmp_path, monkeypatch, capsys):
    for name, value in backend_env("seaweed").items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{TEST_BUCKET}/hostile-{time.time_ns()}"
    good = make_run_dir(tmp_path / "runs", "good")
    assert RunSync(good, uri, every_seconds=0).final().ok
    store = open_store(uri, s3_options("seaweed"))
    store.put_bytes(f"bad/{MANIFEST}", b'{"files": [{"path": "../../x", "size": 1}]}')
    store.put_bytes(f"worse/{MANIFEST}", b"\xff\xfe not json")
    code = main(["results", "pull", "--all", "--partial", "--from", uri, "--to",
                 str(tmp_path / "res"), "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and len(err) == 3, err
    assert err[0].startswith("error: skipped run bad: ") and err[1].startswith(
        "error: skipped run worse: ")
    assert "pulled 1 run(s)" in captured.out
    assert (tmp_path / "res" / "good" / "summary.json").is_file()
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["good"]


# -- bad values: one line, before any work ---------------------------------------------------


BAD = [({"TTT_LR": "nan"}, "TTT_LR=nan is not a finite number"),
       ({"MATRIX_LR": "inf"}, "MATRIX_LR=inf is not a finite number"),
       ({"EVAL_BATCH_SEQS": "0"}, "EVAL_BATCH_SEQS=0 is out of range"),
       ({"TTT_BATCH_SEQS": "0"}, "TTT_BATCH_SEQS=0 is out of range"),
       ({"GPTQ_BLOCK_SIZE": "0"}, "GPTQ_BLOCK_SIZE=0 is out of range"),
       ({"CALIB_BATCHES": "0"}, "CALIB_BATCHES=0 is out of range"),
       ({"TRAIN_BATCH_TOKENS": "0"}, "TRAIN_BATCH_TOKENS=0 is out of range"),
       ({"MODEL_DIM": "1e9"}, "MODEL_DIM=1000000000 is out of range"),
       ({"SEED": "1e30"}, "SEED=1e+30 is out of range"),
       ({"SYNC_EVERY_SECONDS": "inf"}, "SYNC_EVERY_SECONDS=inf is not a finite number"),
       ({"RUN_ID": "r" * 300}, "is not a safe folder name"),
       ({"MODEL_DIM": "16384", "NUM_HEADS": "128", "NUM_KV_HEADS": "64", "NUM_LAYERS": "64"},
        "the model cannot fit"),
       ({"DATA_PATH": "/nonexistent/shards"}, "no train shards"),
       ({"TOKENIZER_PATH": "/nonexistent.model"}, "tokenizer /nonexistent.model not found")]


@pytest.mark.parametrize("env, message", BAD, ids=lambda v: next(iter(v)) if isinstance(v, dict)
                         else None)
def test_bad_values_fail_in_one_line_before_any_work(env, message, pipeline_data, tmp_path,
                                                     monkeypatch, capsys):
    monkeypatch.setenv("DATA_PATH", str(pipeline_data))
    monkeypatch.setenv("TOKENIZER_PATH", str(pipeline_data / "tokenizer.model"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["run", "--preset", "debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where, message", [("file", "Not a directory (ENOTDIR)"),
                                            ("long", "use a shorter run id or folder name")])
def test_os_errors_at_the_cli_edge_are_one_line(where, message, pipeline_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "run" if where == "file" else tmp_path / ("d" * 300) / "run"
    code = main(["run", "--preset", "debug", "--out", str(out), "--data", str(pipeline_data),
                 "--tokenizer-path", str(pipeline_data / "tokenizer.model"), "--iterations", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_file_size_limit_mid_run_is_one_line(pipeline_data, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 300 KB (EFBIG), as a full disk would
    (ENOSPC): the checkpoint write fails mid-run and the CLI says so in one line."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "pgolf"), "run", "--preset", "debug", "--out",
                           str(tmp_path / "runs" / "full"), "--data", str(pipeline_data),
                           "--tokenizer-path", str(pipeline_data / "tokenizer.model"),
                           "--iterations", "2", "--checkpoint-every-seconds", "0.001"],
                          env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("error: File too large (EFBIG): ") and "ulimit -f" in last
    assert (tmp_path / "runs" / "full" / "train.log").is_file()  # what was written stays
