"""`pgolf results pull|ls|plot|push`: round trips, resumes, corruption, unsafe keys, the table."""

from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path

import pytest

from pgolf import results
from pgolf.store import runstore
from pgolf.cli import main
from pgolf.errors import DataError, StoreError
from pgolf.store.runstore import MANIFEST, read_latest
from pgolf.store import open_store
from pgolf.store.file import FileStore
from pgolf.store.sync import RunSync
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
    entry = read_latest(store, run.name).files["artifact.pgz"]
    blob = store.root / run.name / entry.key
    st = blob.stat()
    blob.write_bytes(b"\0" * st.st_size)  # bit rot that keeps size and mtime
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = results.pull(store, tmp_path / "results", [run.name], progress=False)
    assert not report.ok and "failed sha256 verification twice" in report.errors[run.name]
    assert store.gets.count(f"{run.name}/{entry.key}") == 2  # fetched again once, then gave up
    assert not (tmp_path / "results" / run.name / "artifact.pgz").exists()
    assert not (tmp_path / "results" / run.name / MANIFEST).exists()  # never marked complete


def test_corrupt_s3_object_cli_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    opts = s3_options("seaweed")
    uri = f"s3://{TEST_BUCKET}/corrupt-{time.time_ns()}"
    run = synced_run(tmp_path, uri, opts)
    store = open_store(uri, opts)
    key = f"{run.name}/{read_latest(store, run.name).files['train.log'].key}"
    store.client.put_object(Bucket=TEST_BUCKET, Key=store._k(key),
                            Body=b"tampered", Metadata={"sha256": "0" * 64})
    for name, value in backend_env("seaweed").items():
        monkeypatch.setenv(name, value)
    code = main(["results", "pull", run.name, "--from", uri, "--to", str(tmp_path / "r"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and all(line.startswith("error: ") for line in err) and len(err) == 2
    assert "sha256" in err[0] and f"{uri}/{key}" in err[0]
    assert err[1].startswith("error: 1 run(s) could not be pulled")


def test_unsafe_manifests_are_refused_and_the_rest_pulled(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    good = synced_run(tmp_path, store, run_id="good")
    sha = "0" * 64
    hostile = {
        "r1": {"files": [{"path": "../../outside.txt", "size": 1, "sha256": sha}]},
        "r2": {"format": 2, "run_id": "r2", "generation": 1, "files": [
            {"path": "ok.txt", "size": 1, "sha256": sha, "key": "a/../../../escape"}]},
        "r3": {"run_id": "someone-else", "files": []},
        "r4": {"files": [{"path": "x", "size": -1, "sha256": sha}]},
        "r5": ["not", "an", "object"],
    }
    for run_id, doc in hostile.items():
        store.put_bytes(f"{run_id}/{MANIFEST}", json.dumps(doc).encode())
    store.put_bytes("r6/manifest.json", b"{truncated")
    report = results.pull(store, tmp_path / "dest", all_runs=True, partial=True, progress=False)
    assert report.runs == ["good"] and set(report.errors) == {"r1", "r2", "r3", "r4", "r5", "r6"}
    assert "unsafe path '../../outside.txt'" in report.errors["r1"]
    assert "unsafe path 'a/../../../escape'" in report.errors["r2"]
    assert "belongs to run 'someone-else'" in report.errors["r3"]
    assert all("\n" not in why for why in report.errors.values())
    assert same_tree(good, tmp_path / "dest" / "good")
    assert not list(tmp_path.glob("**/outside.txt")) and not list(tmp_path.glob("**/escape"))
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["good"]  # no empty folders
    with pytest.raises(StoreError, match="bad run id"):
        results.pull(store, tmp_path / "dest", ["../r1"], progress=False)


def test_status_decides_what_all_takes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    done = synced_run(tmp_path, store, run_id="done")
    running = make_run_dir(tmp_path / "runs", "running")
    RunSync(running, store, every_seconds=0).sync_once()  # committed as "running"
    failed = make_run_dir(tmp_path / "runs", "failed")
    with pytest.raises(ValueError):
        with RunSync(failed, store, every_seconds=0):
            raise ValueError("boom")
    store.put_bytes("uncommitted/train.log@0123456789abcdef", b"no generation names it")
    assert runstore.list_runs(store) == ["done", "failed", "running"]
    report = results.pull(store, tmp_path / "a", all_runs=True, progress=False)
    assert report.runs == ["done"] and report.left_out == {"failed": "failed (ValueError)",
                                                          "running": "running"}
    named = results.pull(store, tmp_path / "a", ["running"], progress=False)
    assert named.statuses == {"running": "running"}  # a named run comes whatever its status
    everything = results.pull(store, tmp_path / "b", all_runs=True, partial=True, progress=False)
    assert everything.runs == ["done", "failed", "running"] and everything.ok
    for run in (done, running, failed):
        assert same_tree(run, tmp_path / "b" / run.name)
    assert [(r.run, r.status) for r in results.collect(tmp_path / "b")] == [
        ("done", "complete"), ("failed", "failed (ValueError)"), ("running", "running")]
    missing = results.pull(store, tmp_path / "c", ["nope"], progress=False)
    assert "no run nope" in missing.errors["nope"]
    quiet = results.pull(store, tmp_path / "c", ["nope"], if_exists=True, progress=False)
    assert quiet.ok and quiet.missing == ["nope"] and not (tmp_path / "c").exists()


# -- ls ---------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_ls_table_fallbacks_status_and_compliance(tmp_path: Path) -> None:
    root = tmp_path / "results"
    a = make_run_dir(root, "a-run")  # summary.json has everything
    (a / MANIFEST).write_text("{}")  # the earlier layout: a manifest meant complete
    ok = {"ok": True, "value": 1, "limit": 2, "how": "x"}
    info = {**ok, "ok": False, "enforced": False}  # an H100 time rule on a CPU run
    write_json(a / "compliance.json", {"bytes": ok, "train_time": info})
    b = root / "b-run"  # no summary: figures come from the per-stage files
    write_json(b / "config.json", {"preset": "tiny", "train": {"seed": 7}})
    write_json(b / "train_summary.json", {"train_time_ms": 12_345})
    write_json(b / "eval_summary.json", {"val_bpb": 1.2001, "eval_time_s": 33.3})
    write_json(b / "compliance.json", {"bytes": ok, "eval_time": {**ok, "ok": False}})
    write_json(b / MANIFEST, {"status": "interrupted (SIGTERM)"})
    (root / "c-run").mkdir()  # nothing at all
    (root / "c-run" / "summary.json").write_text("{not json")
    d = make_run_dir(root, "d-run")
    write_json(d / "summary.json", {"val_bpb": 1.3, "seed": 1})
    write_json(d / MANIFEST, {"status": "complete"})
    rows = results.collect(root)
    assert [r.run for r in rows] == ["a-run", "b-run", "c-run", "d-run"]
    ra, rb, rc, rd = rows
    assert (ra.seed, ra.preset, ra.val_bpb, ra.total_bytes, ra.compliant, ra.status) == \
        (1337, "seed", 1.0821, 15_912_345, True, "complete")
    assert (rb.seed, rb.preset, rb.val_bpb, rb.train_s, rb.eval_s, rb.compliant, rb.status) == \
        (7, "tiny", 1.2001, 12.345, 33.3, False, "interrupted (SIGTERM)")
    assert (rc.seed, rc.val_bpb, rc.compliant, rc.status) == (None, None, None, "no manifest")
    table = results.format_table(rows).splitlines()
    assert table[0].split() == ["run", "seed", "preset", "val_bpb", "bytes", "train_s", "eval_s",
                                "ok", "status"]
    assert table[1].split() == ["a-run", "1337", "seed", "1.0821",
                                "15,912,345", "591.2", "402.7", "✓", "complete"]
    assert table[2].split() == ["b-run", "7", "tiny", "1.2001", "-", "12.3", "33.3", "✗",
                                "interrupted", "(SIGTERM)"]
    assert table[3].split() == ["c-run", "-", "-", "-", "-", "-", "-", "-", "no", "manifest"]
    assert table[5] == ("mean val_bpb 1.1911 ± 0.1541 (sample std, n=2 complete runs; "
                        "1 unfinished run(s) left out)")
    assert json.loads(results.rows_as_json(rows))[1]["status"] == "interrupted (SIGTERM)"


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
    assert "as generation 1 (complete, 6 files" in capsys.readouterr().out
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
