"""`pgolf data ...`: the commands end to end, and one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.data.bpb import val_target_bytes
from pgolf.data.loader import load_val_tokens
from pgolf.data.shards import write_shard


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("hint:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_offline_then_inspect_prints_a_sane_table(offline_data, capsys):
    rc, out, _ = run(capsys, "data", "offline", "--out", str(offline_data))  # cached: returns at once
    assert rc == 0 and "offline dataset ready" in out
    rc, out, _ = run(capsys, "data", "inspect", str(offline_data))
    assert rc == 0
    header, *rows, leak = out.strip().splitlines()
    assert header.split() == ["split", "shards", "tokens", "bytes", "bytes/token"]
    assert leak.startswith("leakage check (doc-hash: 100 val docs vs every doc of 3 train shards): 0 of 100")
    for row in rows:
        split, shards, tokens, nbytes, bpt = row.split()
        assert split in ("train", "val") and int(shards.replace(",", "")) >= 1
        assert 2.0 < float(bpt) < 5.0


def test_inspect_json_counts_the_bpb_denominator(offline_data, capsys):
    rc, out, _ = run(capsys, "data", "inspect", str(offline_data), "--json",
                     "--tokenizer", str(offline_data / "tokenizer.model"))
    assert rc == 0
    info = json.loads(out)
    assert set(info) == {"train", "val", "leakage_check"} and set(info["val"]) == {"shards", "tokens", "bytes"}
    assert info["leakage_check"]["ok"] is True and info["leakage_check"]["overlapping_docs"] == 0
    tokens = load_val_tokens(offline_data)
    assert info["val"]["tokens"] == tokens.size
    assert info["val"]["bytes"] == int(val_target_bytes(offline_data, tokens, offline_data / "tokenizer.model").sum())


def test_inspect_without_tokenizer_and_with_sidecar(tmp_path, capsys):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 6, 7]))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([1, 5, 6]))
    rc, out, _ = run(capsys, "data", "inspect", str(tmp_path), "--json")
    info = json.loads(out)
    assert rc == 0 and info["train"] == {"shards": 1, "tokens": 3, "bytes": None}
    assert info["val"] == {"shards": 1, "tokens": 4, "bytes": None}
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.array([0, 4, 2, 3]))
    rc, out, _ = run(capsys, "data", "inspect", str(tmp_path), "--json")
    assert json.loads(out)["val"]["bytes"] == 9


def test_build_command(offline_data, tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    with open(offline_data / "docs.jsonl", encoding="utf-8") as fh:
        for i, line in zip(range(12), fh):
            (texts / f"doc{i:02d}.txt").write_text(json.loads(line)["text"], encoding="utf-8")
    out = tmp_path / "ds"
    rc, stdout, _ = run(capsys, "data", "build", "--text", str(texts), "--out", str(out),
                        "--tokenizer", str(offline_data / "tokenizer.model"), "--val-docs", "2")
    assert rc == 0 and "val 2 docs" in stdout and "train 10 docs" in stdout
    assert (out / "manifest.json").is_file() and (out / "fineweb_val_000000.bin").is_file()


def test_build_caseops_command(offline_data, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    with open(offline_data / "docs.jsonl", encoding="utf-8") as fh:
        docs.write_text("".join(line for _, line in zip(range(60), fh)), encoding="utf-8")
    out = tmp_path / "ds"
    rc, stdout, _ = run(capsys, "data", "build", "--text", str(docs), "--out", str(out), "--vocab", "512",
                        "--val-docs", "5", "--caseops")
    assert rc == 0 and "CaseOps with val byte sidecar" in stdout and "0 of 5 val docs found in train" in stdout
    assert (out / "fineweb_val_bytes_000000.bin").is_file()
    rc, stdout, _ = run(capsys, "data", "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert rc == 0 and info["train"]["bytes"] is None  # no train sidecar: a CaseOps byte table would lie
    originals = [json.loads(line)["text"] for line in docs.read_text(encoding="utf-8").splitlines()[:5]]
    assert info["val"]["bytes"] == sum(len(d.encode("utf-8")) for d in originals)


def test_corrupt_shard_is_one_line(tmp_path, capsys):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.array([1, 2, 3]))
    path.write_bytes(b"\x00" * 4 + path.read_bytes()[4:])
    rc, _, err = run(capsys, "data", "inspect", str(tmp_path))
    assert_one_line_error(rc, err, str(path), "wrong magic 0")


@pytest.mark.parametrize("argv, needles", [
    (["data", "inspect", "/nonexistent/dir"], ["/nonexistent/dir is not a folder"]),
    (["data", "fetch", "--variant", "gpt2", "--out", "{tmp}/f"], ["unknown variant 'gpt2'"]),
    (["data", "fetch", "--source", "ftp://x", "--out", "{tmp}/f"], ["unknown --source"]),
    (["data", "build", "--text", "{tmp}/missing.txt", "--out", "{tmp}/b"], ["does not exist"]),
    (["data", "push", "{tmp}", "--to", "file://{tmp}/store"], ["has no manifest.json"]),
    (["data", "push", "{tmp}"], ["no destination"]),
])
def test_errors_exit_2_in_one_line(argv, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DATA_URI", raising=False)
    rc, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert_one_line_error(rc, err, *needles)


def test_real_entry_point_has_no_traceback(tmp_path):
    code = f"import sys; from pgolf.cli import main; sys.exit(main(['data', 'inspect', {str(tmp_path)!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fineweb_val_*.bin" in proc.stderr and "pgolf data offline" in proc.stderr


def test_data_cli_imports_nothing_heavy():
    code = ("import sys, pgolf.cli.data; "
            "print(sorted(m for m in ('torch', 'numpy', 'sentencepiece', 'boto3', 'huggingface_hub') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]"
