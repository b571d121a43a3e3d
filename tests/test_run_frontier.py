"""`pgolf run --preset frontier-debug` end to end on CaseOps text, synced to a real S3 server (SeaweedFS):
every frontier element on, original bytes through the sidecar, the leakage check, the store copy whole."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pgolf.cli import main
from data_fixtures import cut_val
from store_fixtures import TEST_BUCKET, backend_env

VAL_TOKENS = 4_000


@pytest.fixture(scope="module")
def caseops_cut(offline_caseops_data: Path, tmp_path_factory) -> Path:
    """The CaseOps corpus with its val split (and sidecar) cut, so a whole run takes seconds."""
    return cut_val(offline_caseops_data, tmp_path_factory.mktemp("caseops_cut"), VAL_TOKENS)


@pytest.fixture(scope="module")
def frontier_run(caseops_cut: Path, tmp_path_factory) -> tuple[Path, str, int]:
    mp = pytest.MonkeyPatch()
    for name, value in backend_env("seaweed").items():
        mp.setenv(name, value)
    root = tmp_path_factory.mktemp("frontier")
    uri = f"s3://{TEST_BUCKET}/frontier-{time.time_ns()}"
    run_dir = root / "runs" / "frontier-e2e"
    code = main(["run", "--preset", "frontier-debug", "--out", str(run_dir), "--data", str(caseops_cut),
                 "--tokenizer-path", str(caseops_cut / "tokenizer.model"), "--results-uri", uri,
                 "--run-id", "frontier-e2e", "--iterations", "8", "--sync-every-seconds", "0"])
    yield run_dir, uri, code
    mp.undo()


@pytest.mark.slow
def test_frontier_debug_runs_whole_and_compliant(frontier_run):
    run_dir, _, code = frontier_run
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    rules = json.loads((run_dir / "compliance.json").read_text())
    assert summary["compliant"] and all(r["ok"] for r in rules.values() if r["enforced"]), rules
    assert summary["eval_mode"] == "lora_ttt" and summary["targets"] == VAL_TOKENS - 1
    # CaseOps bpb divides by the ORIGINAL bytes: the sidecar's, never the transformed text's
    src = summary["byte_source"]
    assert src["source"] == "sidecar" and src["caseops_tokenizer"] is True
    assert rules["bytes_are_original"]["ok"] and src["sidecar_bytes"] == summary["bytes"]
    assert rules["val_not_trained_on"]["ok"] and summary["leakage_check"]["ok"] is True
    train = json.loads((run_dir / "train_summary.json").read_text())
    assert train["looping_step"] is not None  # depth recurrence switched on mid-run
    assert [c["seq_len"] for c in train["seq_len_changes"]] == [32, 64]  # context grew 16 -> 32 -> 64
    assert summary["total_bytes"] == summary["model_bytes"] + summary["code_bytes"]


@pytest.mark.slow
def test_the_store_holds_the_whole_run(frontier_run, tmp_path, monkeypatch):
    run_dir, uri, _ = frontier_run
    for name, value in backend_env("seaweed").items():
        monkeypatch.setenv(name, value)
    assert main(["results", "pull", "frontier-e2e", "--from", uri, "--to", str(tmp_path), "--no-progress"]) == 0
    pulled = tmp_path / "frontier-e2e"
    local = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    remote = {p.relative_to(pulled): p.read_bytes() for p in pulled.rglob("*") if p.is_file()}
    assert local.keys() == remote.keys() and all(local[k] == remote[k] for k in local)
