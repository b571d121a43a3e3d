"""`pgolf results pull|ls|plot|push`: round trips, resumes, corruption, unsafe keys, the table."""

from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path

import pytest

from pgolf import results
from pgolf.cli import main
from pgolf.errors import DataError, StoreError
from pgolf.store import ChecksumMismatch, open_store
from pgolf.store.file import FileStore
from pgolf.sync import MANIFEST, RunSync
from store_fixtures import (TEST_BUCKET, backend, backend_env, make_run_dir,  # noqa: F401
                            s3_options, unique_uri)


def same_tree(a: Path, b: Path) -> bool:
    """Byte-for-byte identical trees (every file compared by content, not stat)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def synced_run(tmp_path: Path, uri: str, opts=None, run_id: str = "seed-s1-20261126T000000-0001"
               ) -> Path:
    run = make_run_dir(tmp_path / "runs", run_id)
    assert RunSync(run, uri, every_seconds=0, options=opts).final().ok
    return run


def test_round_trip_is_byte_identical_and_resumable(tmp_path: Path, backend: str) -> None:
    uri = unique_uri(backend, tmp_path)
    opts = None if backend == "file" else s3_options(backend)
    run = synced_run(tmp_path, uri, opts)
    dest = tmp_path / "results"
    report = results.pull(uri, dest, all_runs=True, progress=False, options=opts)
    assert report.runs == [run.name] and report.downloaded == 6 and report.skipped == 0
    assert same_tree(run, dest / run.name)
    again = results.pull(uri, dest, [run.name], progress=False, options=opts)
    assert (again.downloaded, again.skipped) == (0, 6)  # resumed: nothing fetched twice
    (dest / run.name / "artifact.pgz").write_bytes(b"truncated")  # a broken local copy
    (dest / run.name / "train.log").unlink()
    third = results.pull(uri, dest, [run.name], progress=False, options=opts)
    assert (third.downloaded, third.skipped) == (2, 4)
    assert same_tree(run, dest / run.name)


class CountingStore(FileStore):
    def __init__(self, root: Path):
        super().__init__(root)
        self.gets: list[str] = []

    def get_file(self, key, path):
        self.gets.append(key)
        return super().get_file(key, path)


def test_corrupt_object_is_fetched_again_then_reported(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    run = synced_run(tmp_path, store)
    blob = store.root / run.name / "artifact.pgz"
    st = blob.stat()
    blob.write_bytes(b"\0" * st.st_size)  # bit rot that keeps size and mtime
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ChecksumMismatch, match="failed sha256 verification twice"):
        results.pull(store, tmp_path / "results", [run.name], progress=False)
    assert store.gets.count(f"{run.name}/artifact.pgz") == 2  # fetched again once, then gave up
    assert not (tmp_path / "results" / run.name / "artifact.pgz").exists()
    assert not (tmp_path / "results" / run.name / MANIFEST).exists()  # never marked complete


def test_corrupt_s3_object_cli_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    opts = s3_options("seaweed")
    uri = f"s3://{TEST_BUCKET}/corrupt-{time.time_ns()}"
    run = synced_run(tmp_path, uri, opts)
    store = open_store(uri, opts)
    store.client.put_object(Bucket=TEST_BUCKET, Key=store._k(f"{run.name}/train.log"),
                            Body=b"tampered", Metadata={"sha256": "0" * 64})
    for name, value in backend_env("seaweed").items():
        monkeypatch.setenv(name, value)
    code = main(["results", "pull", run.name, "--from", uri, "--to", str(tmp_path / "r"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "sha256" in err[-1]
    assert f"{uri}/{run.name}/train.log" in err[-1]


def test_unsafe_manifest_paths_are_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    evil = {"run_id": "r1", "files": [{"path": "../../outside.txt", "size": 1, "sha256": "0" * 64}]}
    store.put_bytes(f"r1/{MANIFEST}", json.dumps(evil).encode())
    with pytest.raises(StoreError, match="unsafe path '../../outside.txt'"):
        results.pull(store, tmp_path / "dest", ["r1"], progress=False)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "dest" / "r1").exists()
    with pytest.raises(StoreError, match="bad run id"):
        results.pull(store, tmp_path / "dest", ["../r1"], progress=False)


def test_unsafe_store_keys_are_refused_in_partial_mode(tmp_path: Path) -> None:
    opts = s3_options("moto")
    uri = f"s3://{TEST_BUCKET}/unsafe-{time.time_ns()}"
    store = open_store(uri, opts)
    store.put_bytes("r2/ok.txt", b"fine")
    store.client.put_object(Bucket=TEST_BUCKET, Key=store._k("r2") + "/a/../../escape",
                            Body=b"x")  # legal in S3, a path escape on disk
    with pytest.raises(StoreError, match="unsafe key"):
        results.pull(uri, tmp_path / "dest", ["r2"], partial=True, progress=False, options=opts)
    assert not (tmp_path / "escape").exists()


def test_runs_without_manifest_need_partial(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    done = synced_run(tmp_path, store, run_id="done")
    running = make_run_dir(tmp_path / "runs", "running")
    RunSync(running, store, every_seconds=0).sync_once()  # uploaded, never committed
    assert results.list_runs(store) == ["done"]
    assert results.list_runs(store, complete_only=False) == ["done", "running"]
    report = results.pull(store, tmp_path / "a", all_runs=True, progress=False)
    assert report.runs == ["done"]
    with pytest.raises(StoreError, match="no manifest.json.*--partial"):
        results.pull(store, tmp_path / "a", ["running"], progress=False)
    report = results.pull(store, tmp_path / "b", all_runs=True, partial=True, progress=False)
    assert report.runs == ["done", "running"] and report.partial_runs == ["running"]
    assert same_tree(running, tmp_path / "b" / "running")
    assert same_tree(done, tmp_path / "b" / "done")


# -- ls ---------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_ls_table_fallbacks_and_compliance(tmp_path: Path) -> None:
    root = tmp_path / "results"
    a = make_run_dir(root, "a-run")  # summary.json has everything
    (a / MANIFEST).write_text("{}")
    ok = {"ok": True, "value": 1, "limit": 2, "how": "x"}
    write_json(a / "compliance.json", {"bytes": ok, "train_time": ok})
    b = root / "b-run"  # no summary: figures come from the per-stage files
    write_json(b / "config.json", {"preset": "tiny", "train": {"seed": 7}})
    write_json(b / "train_summary.json", {"train_time_ms": 12_345})
    write_json(b / "eval_summary.json", {"val_bpb": 1.2001, "eval_time_s": 33.3})
    write_json(b / "compliance.json", {"bytes": ok, "eval_time": {**ok, "ok": False}})
    (root / "c-run").mkdir()  # nothing at all
    (root / "c-run" / "summary.json").write_text("{not json")
    rows = results.collect(root)
    assert [r.run for r in rows] == ["a-run", "b-run", "c-run"]
    ra, rb, rc = rows
    assert (ra.seed, ra.preset, ra.val_bpb, ra.total_bytes, ra.compliant, ra.complete) == \
        (1337, "seed", 1.0821, 15_912_345, True, True)
    assert (rb.seed, rb.preset, rb.val_bpb, rb.train_s, rb.eval_s, rb.compliant) == \
        (7, "tiny", 1.2001, 12.345, 33.3, False)
    assert (rc.seed, rc.val_bpb, rc.compliant) == (None, None, None)
    table = results.format_table(rows).splitlines()
    assert table[0].split() == ["run", "seed", "preset", "val_bpb", "bytes", "train_s", "eval_s",
                                "ok"]
    assert table[1].split() == ["a-run", "1337", "seed", "1.0821",
                                "15,912,345", "591.2", "402.7", "✓"]
    assert table[2].split() == ["b-run", "(partial)", "7", "tiny", "1.2001", "-", "12.3", "33.3",
                                "✗"]
    assert table[3].split() == ["c-run", "(partial)", "-", "-", "-", "-", "-", "-", "-"]
    assert table[4] == "mean val_bpb 1.1411 ± 0.0834 (sample std, n=2)"


def test_ls_cost_column_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "results"
    write_json(root / "r1" / "summary.json", {"val_bpb": 1.1, "cost_usd": 3.456})
    write_json(root / "r2" / "summary.json", {"val_bpb": 1.2})
    assert main(["results", "ls", "--dir", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-1] == "cost_usd" and out[1].split()[-1] == "3.46"
    assert out[2].split()[-1] == "-"
    assert main(["results", "ls", "--dir", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["cost_usd"]) for r in rows] == [("r1", 3.456), ("r2", None)]
    assert main(["results", "ls", "--dir", str(tmp_path / "missing")]) == 2


# -- plot -------------------------------------------------------------------------------------------


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "results"
    make_run_dir(root, "run-a")
    b = make_run_dir(root, "run-b")
    with open(b / "metrics.jsonl", "a") as fh:
        fh.write("not json\n" + json.dumps({"event": "phase", "name": "quantize"}) + "\n")
    out = tmp_path / "plot.png"
    assert main(["results", "plot", "--dir", str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1320, 495)  # 12 x 4.5 in at 110 dpi
    curves = results.load_curves(b)
    assert len(curves.train) == 10 and curves.val == [(1.0, 2.31)]
    with pytest.raises(DataError, match="nothing to plot"):
        results.plot(tmp_path / "empty", ["x"])


# -- CLI pull/push against the real SeaweedFS, credentials from the environment --------------------


def test_cli_push_then_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in backend_env("seaweed").items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{TEST_BUCKET}/cli-{time.time_ns()}"
    run = make_run_dir(tmp_path / "runs", "cli-run")
    assert main(["results", "push", str(run), "--to", uri]) == 0
    assert "manifest.json last" in capsys.readouterr().out
    monkeypatch.setenv("RESULTS_URI", uri)  # --from defaults to $RESULTS_URI
    assert main(["results", "pull", "--all", "--to", str(tmp_path / "res"), "--no-progress"]) == 0
    assert "pulled 1 run(s)" in capsys.readouterr().out
    assert same_tree(run, tmp_path / "res" / "cli-run")


def test_cli_wrong_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    env = backend_env("seaweed")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code = main(["results", "pull", "--all", "--from", f"s3://{TEST_BUCKET}/x", "--to",
                 str(tmp_path / "r"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == (f"error: S3 rejected the credentials for s3://{TEST_BUCKET} "
                                    "(SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID/"
                                    "AWS_SECRET_ACCESS_KEY")
    assert "wrong-secret-value" not in captured.out + captured.err
    assert env["AWS_SECRET_ACCESS_KEY"] not in captured.out + captured.err
