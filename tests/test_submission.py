"""pgolf.submission: the generated train_gpt.py (bundle) and the records folder (build).

The end-to-end test trains the debug preset with the package, builds a records folder from that run,
copies train_gpt.py alone into an empty folder and runs it with pgolf NOT importable (python -I -S
with only the venv's site-packages on sys.path), then compares the two runs' scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pgolf import config as cfgmod
from pgolf.cli import main
from pgolf.errors import BudgetError, ConfigError
from pgolf.submission import build as buildmod
from pgolf.submission import bundle as bundlemod
from pgolf.submission.runs import RunError

SUBMISSION_FIELDS = {
    "name", "author", "github_id", "blurb", "date", "track", "val_bpb", "val_bpb_std", "val_loss",
    "val_loss_std", "n_seeds", "seeds", "bytes_total", "bytes_code", "bytes_code_form", "bytes_code_raw",
    "bytes_code_compressed", "code_minifier", "bytes_model_max", "size_cap_bytes", "hardware", "pytorch_version",
    "cuda_version", "flash_attn_version", "python_version", "pgolf_version", "pgolf_commit",
    "pgolf_source_sha256", "runs_git_commit", "runs_source_sha256", "code_drift", "compliance_failures",
}
SEED_FIELDS = {"seed", "run_id", "val_bpb", "val_loss", "steps", "step_avg_ms", "train_time_s", "eval_time_s",
               "prequant_val_bpb", "postquant_val_bpb", "model_bytes", "code_bytes", "artifact_bytes",
               "bytes_per_token", "compliant"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # fixed, so builds compare across checkouts


# ---------------------------------------------------------------------------------------------
# helpers


def isolated_cmd(*args: str) -> list[str]:
    """python -I -S with only the venv's site-packages: torch/numpy/sentencepiece, no pgolf (the
    editable install lives in a .pth file, which -S never reads; -I drops PYTHONPATH and the cwd)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    boot = f"import sys; sys.path.extend({paths!r}); sys.argv = sys.argv[1:]; "
    if args and args[0] == "-c":
        return [sys.executable, "-I", "-S", "-c", boot + "exec(sys.argv[0])", *args[1:]]
    return [sys.executable, "-I", "-S", "-c",
            boot + "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
    env.update(extra)
    return env


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


@functools.lru_cache(maxsize=8)
def shipped_sha256(cfg_json: str, form: str = "compressed") -> str:
    """sha256 of the train_gpt.py a build (commit COMMIT) ships for runs of this config."""
    text = bundlemod.shipped_text(cfgmod.from_dict(json.loads(cfg_json)), form, commit=COMMIT)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fake_run(root: Path, run_id: str, seed: int, *, cfg: cfgmod.Config | None = None, val_bpb: float = 1.2,
             model_bytes: int = 12_345, ok: bool = True, code_form: str = "compressed") -> Path:
    """A finished run folder as `pgolf launch` runs produce it (no torch needed): it ran the
    train_gpt.py that a build at commit COMMIT ships."""
    cfg = (cfg or cfgmod.resolve("debug", env={})).with_overrides(seed=seed, run_id=run_id)
    d = root / run_id
    d.mkdir(parents=True)
    write_json(d / "config.json", cfg.to_dict())
    with open(d / "artifact.pgz", "wb") as fh:
        fh.write(bytes((seed * 7 + i) % 251 for i in range(min(model_bytes, 4096))))
        fh.truncate(model_bytes)  # sparse: large artifacts cost nothing
    bpt = 2.4
    val_loss = val_bpb * 0.6931471805599453 * bpt
    write_json(d / "summary.json", {
        "run_id": run_id, "seed": seed, "steps": 4900 + seed % 7, "step_avg_ms": 121.25, "val_bpb": val_bpb,
        "val_loss": val_loss, "targets": 1000, "bytes": 2400, "train_plus_calib_s": 598.2, "eval_time_s": 455.1,
        "prequant_val_bpb": val_bpb - 0.01, "postquant_val_bpb": val_bpb + 0.008, "model_bytes": model_bytes,
        "code_bytes": 200_000, "total_bytes": model_bytes + 200_000})
    write_json(d / "environment.json", {
        "gpu_names": ["NVIDIA H100 80GB HBM3"] * 8, "gpu_is_sxm": True, "torch": "2.9.1+cu128", "cuda": "12.8",
        "flash_attn_3": "3.0.0b1", "python": "3.12.3", "git_commit": COMMIT, "world_size": 8,
        "code_form": code_form, "code_file": "/root/sky_workdir/ship/train_gpt.py",
        "code_sha256": shipped_sha256(json.dumps(cfg.to_dict(), sort_keys=True), code_form)})
    write_json(d / "compliance.json", {
        "train_time": {"ok": True, "value": 598.2, "limit": 600.0, "how": "train clock"},
        "eval_time": {"ok": ok, "value": 455.1 if ok else 612.0, "limit": 600.0, "how": "eval clock"},
        "artifact_bytes": {"ok": False, "value": model_bytes + 200_000, "limit": 16_000_000, "how": "raw sources"}})
    (d / "train.log").write_text(f"seed:{seed}\nfinal val_bpb:{val_bpb:.8f}\n")
    return d


def three_runs(root: Path, **kw) -> list[str]:
    for i, (seed, bpb) in enumerate([(42, 1.0599), (0, 1.0612), (1234, 1.0621)]):
        fake_run(root, f"r{i}", seed, val_bpb=bpb, **kw)
    return ["r0", "r1", "r2"]


def do_build(root: Path, out: Path, ids=None, **kw) -> buildmod.BuildResult:
    kw.setdefault("commit", COMMIT)
    return buildmod.build(ids or ["r0", "r1", "r2"], out=out, name="Debug stack", github_id="octocat",
                          search=[root], **kw)


@pytest.fixture(scope="module")
def debug_bundle() -> bundlemod.Bundle:
    return bundlemod.build_bundle(cfgmod.resolve("debug", env={}).to_dict(), commit=COMMIT)


# ---------------------------------------------------------------------------------------------
# the bundle


def test_bundle_is_deterministic_and_headed(debug_bundle):
    again = bundlemod.build_bundle(cfgmod.resolve("debug", env={}).to_dict(), commit=COMMIT)
    assert again.raw == debug_bundle.raw and again.compressed == debug_bundle.compressed
    for text in (debug_bundle.raw, debug_bundle.compressed):
        head = text.splitlines()[0]
        assert f"pgolf {bundlemod.pgolf.__version__}" in head and COMMIT in head and "do not edit" in head
    assert debug_bundle.nbytes("compressed") < debug_bundle.nbytes("raw") // 3


def test_bundle_embeds_the_pipeline_and_nothing_of_the_cli(debug_bundle):
    names = [m.name for m in debug_bundle.modules]
    assert names == sorted(names)
    for needed in ("pgolf", "pgolf.config", "pgolf.errors", "pgolf.run", "pgolf.data.loader", "pgolf.data.bpb"):
        assert needed in names
    assert not [n for n in names if bundlemod._is_excluded(n)]
    assert "torch" in debug_bundle.third_party and "boto3" not in debug_bundle.third_party
    for m in bundlemod.collect_modules():  # every embedded source is the repository's, byte for byte
        rel = Path(*m.name.split(".")[1:])
        path = bundlemod.package_root() / rel / "__init__.py" if m.is_package else (
            bundlemod.package_root() / rel).with_suffix(".py")
        assert m.source == (path.read_text() if path.exists() else "")


def test_module_level_import_of_an_excluded_module_fails_the_build(tmp_path):
    pkg = tmp_path / "pgolf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "run.py").write_text("import pgolf.store.sync\n")
    (pkg / "store").mkdir()
    (pkg / "store" / "__init__.py").write_text("")
    (pkg / "store" / "sync.py").write_text("import boto3\n")
    with pytest.raises(bundlemod.BundleError, match="pgolf.run imports pgolf.store.sync at module level"):
        bundlemod.collect_modules("pgolf.run", root=pkg)
    (pkg / "run.py").write_text("def f():\n    import pgolf.store.sync\n")  # lazy: allowed, not embedded
    assert [m.name for m in bundlemod.collect_modules("pgolf.run", root=pkg)] == ["pgolf", "pgolf.run"]


def test_string_literals_round_trip_awkward_sources():
    for src in ["x = '''a'''\n", "s = '\\\\'\n", "y = \"\"\"q\"\"\" + ''''\n", "z = 1  # ends with quote'",
                "w = '\\r\\n'\nv = '''''' \n"]:
        import ast
        assert ast.literal_eval(bundlemod._string_literal(src)) == (src if src.endswith("\n") else src + "\n")


@pytest.fixture(scope="module")
def forms_dir(tmp_path_factory, debug_bundle) -> Path:
    d = tmp_path_factory.mktemp("forms")
    (d / "raw.py").write_text(debug_bundle.raw, encoding="utf-8")
    (d / "compressed.py").write_text(debug_bundle.compressed, encoding="utf-8")
    return d


PROBE = """
import json, runpy, sys, importlib
g = runpy.run_path(sys.argv[1], run_name="probe")
import pgolf, pgolf.config as c
mods = sorted(g["_SOURCES"])
for name in mods:
    importlib.import_module(name)  # every embedded module imports (minified ones too)
print(json.dumps({"config": c.from_dict(g["DEFAULTS"]).to_json(), "modules": mods, "bundle": pgolf.__bundle__,
                  "file": pgolf.__file__, "size": __import__("os").path.getsize(sys.argv[1])}))
"""


def test_raw_and_compressed_forms_import_and_resolve_identically(forms_dir):
    outs = {}
    for form in ("raw", "compressed"):
        proc = subprocess.run(isolated_cmd("-c", PROBE, f"{form}.py"), cwd=forms_dir, env=clean_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[form] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert outs[form]["bundle"]["form"] == form
        assert outs[form]["bundle"]["code_bytes"] == outs[form]["size"]  # what a run counts as code bytes
        assert outs[form]["file"].startswith(str(forms_dir / f"{form}.py"))  # served from the file
    assert outs["raw"]["config"] == outs["compressed"]["config"]
    assert outs["raw"]["modules"] == outs["compressed"]["modules"]
    assert json.loads(outs["raw"]["config"])["preset"] == "debug"


@pytest.mark.parametrize("env, says", [
    ({"RESULTS_URI": "file:///tmp/nowhere"}, "train_gpt.py does not sync itself; run it as `pgolf results sync"),
    ({"SEED": "abc"}, "SEED='abc' is not a valid int"),
])
def test_the_file_refuses_bad_settings_in_one_line_before_any_work(forms_dir, tmp_path, env, says):
    """No CLI edge in the file, the same `error:` line and exit 2; a RESULTS_URI it cannot honour
    (it carries no store code) is refused on every rank rather than silently not synced."""
    shutil.copy(forms_dir / "compressed.py", tmp_path / "train_gpt.py")
    proc = subprocess.run(isolated_cmd("train_gpt.py"), cwd=tmp_path, env=clean_env(**env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_pgolf_is_not_importable_in_the_isolated_interpreter(tmp_path):
    proc = subprocess.run(isolated_cmd("-c", "import torch, numpy, sentencepiece\nimport pgolf"), cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "No module named 'pgolf'" in proc.stderr


def test_a_module_that_is_not_embedded_fails_loudly(forms_dir):
    code = "import runpy, sys\nrunpy.run_path(sys.argv[1], run_name='x')\nimport pgolf.store.sync"
    proc = subprocess.run(isolated_cmd("-c", code, "raw.py"), cwd=forms_dir, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "pgolf.store is not embedded in this file" in proc.stderr


def test_readme_command_prints_the_compressed_program(tmp_path):
    three_runs(tmp_path / "runs")
    result = do_build(tmp_path / "runs", tmp_path / "rec")
    readme = (result.out / "README.md").read_text()
    cmd = next(line for line in readme.splitlines() if line.startswith("python3 -c"))
    proc = subprocess.run(["bash", "-c", cmd.replace("python3", sys.executable, 1)], cwd=result.out,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == bundlemod.extract_program((result.out / "train_gpt.py").read_text()) + "\n"


# ---------------------------------------------------------------------------------------------
# the records folder


def test_build_writes_every_file_and_field(tmp_path):
    three_runs(tmp_path / "runs")
    out = tmp_path / "records" / "2026-05-01_debug"
    result = do_build(tmp_path / "runs", out, blurb="tiny")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_seed0.log", "train_seed1234.log", "train_seed42.log"]
    for name, size in result.files.items():  # byte counts match the files
        assert (out / name).stat().st_size == size
    sub = json.loads((out / "submission.json").read_text())
    assert SUBMISSION_FIELDS <= set(sub)
    assert sub["date"] == "2026-05-01" and sub["name"] == "Debug stack" and sub["github_id"] == "octocat"
    code = (out / "train_gpt.py").stat().st_size
    assert sub["bytes_code"] == code == result.code_bytes and sub["bytes_code_form"] == "compressed"
    assert sub["bytes_code_compressed"] == code < sub["bytes_code_raw"]
    assert [s["seed"] for s in sub["seeds"]] == [0, 42, 1234]
    for s in sub["seeds"]:
        assert SEED_FIELDS <= set(s)
        model = (tmp_path / "runs" / s["run_id"] / "artifact.pgz").stat().st_size
        assert s["model_bytes"] == model and s["artifact_bytes"] == model + code
    assert sub["bytes_total"] == max(s["artifact_bytes"] for s in sub["seeds"])
    assert sub["val_bpb"] == pytest.approx((1.0599 + 1.0612 + 1.0621) / 3)
    assert sub["val_bpb_std"] == pytest.approx(0.0011060, abs=1e-7)  # sample std (ddof 1)
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3 SXM"
    assert (sub["pytorch_version"], sub["cuda_version"], sub["flash_attn_version"]) == ("2.9.1+cu128", "12.8",
                                                                                          "3.0.0b1")
    assert (out / "train_seed42.log").read_text().startswith("seed:42")
    assert "torch==2.9.1+cu128" in (out / "requirements.txt").read_text().splitlines()
    readme = (out / "README.md").read_text()
    for piece in ("# Debug stack", "| 1234 |", "torchrun --standalone --nproc_per_node=8 train_gpt.py",
                  "## Compliance", "## Environment", f"{code:,} B", "tiny"):
        assert piece in readme


def test_build_is_deterministic(tmp_path):
    three_runs(tmp_path / "runs")
    a = do_build(tmp_path / "runs", tmp_path / "a" / "2026-05-01_x")
    b = do_build(tmp_path / "runs", tmp_path / "b" / "2026-05-01_x")
    for name in a.files:
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name
    do_build(tmp_path / "runs", a.out)  # a rebuild in place is allowed and gives the same bytes
    assert (a.out / "train_gpt.py").read_bytes() == (b.out / "train_gpt.py").read_bytes()


def test_shipped_code_bytes_predicts_the_build_for_any_seed(tmp_path):
    three_runs(tmp_path / "runs")
    result = do_build(tmp_path / "runs", tmp_path / "rec")
    run_cfg = cfgmod.resolve("debug", env={}).with_overrides(seed=99, run_id="x-s99", results_uri="s3://b/p")
    assert bundlemod.shipped_code_bytes(run_cfg, commit=COMMIT) == result.code_bytes
    assert bundlemod.shipped_code_bytes(run_cfg, "raw", commit=COMMIT) == result.code_bytes_raw


def test_raw_form_ships_the_raw_file(tmp_path):
    three_runs(tmp_path / "runs", code_form="raw")
    result = do_build(tmp_path / "runs", tmp_path / "rec", code_form="raw")
    assert result.code_bytes == (result.out / "train_gpt.py").stat().st_size == result.code_bytes_raw
    assert "_add('pgolf.config', '''" in (result.out / "train_gpt.py").read_text()


def test_mixed_configs_are_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "a", 1)
    fake_run(runs, "b", 2, cfg=cfgmod.resolve("debug", env={}).with_overrides(num_layers=3))
    with pytest.raises(ConfigError, match=r"mixed configs: NUM_LAYERS=2 \(a\) vs 3 \(b\)"):
        do_build(runs, tmp_path / "rec", ids=["a", "b"])
    assert not (tmp_path / "rec").exists()
    rc = main(["submission", "build", "a", "b", "--name", "x", "--github-id", "y", "--results", str(runs),
               "--out", str(tmp_path / "rec")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "NUM_LAYERS" in err


def test_per_run_fields_may_differ(tmp_path):
    runs = tmp_path / "runs"
    base = cfgmod.resolve("debug", env={})
    fake_run(runs, "a", 1, cfg=base.with_overrides(results_uri="s3://x/1"))
    fake_run(runs, "b", 2, cfg=base.with_overrides(results_uri="s3://x/2", runs_dir="elsewhere"))
    result = do_build(runs, tmp_path / "rec", ids=["a", "b"])
    assert result.submission["n_seeds"] == 2


def test_over_the_cap_fails_with_the_overage_named(tmp_path):
    both = bundlemod.build_bundle(bundlemod.embedded_defaults(cfgmod.resolve("debug", env={})), commit=COMMIT)
    raw, packed = both.nbytes("raw"), both.nbytes("compressed")
    model = 16_000_000 - (raw + packed) // 2  # fits with the compressed stub, not with the raw file
    runs = tmp_path / "runs"
    fake_run(runs, "a", 1, model_bytes=model)
    fake_run(runs, "b", 2, model_bytes=model - 10_000)
    with pytest.raises(BudgetError) as err:
        do_build(runs, tmp_path / "rec", ids=["a", "b"], code_form="raw", allow_code_drift=True)
    m = re.fullmatch(r"seed 1: model ([\d,]+) \+ code ([\d,]+) = ([\d,]+) B, ([\d,]+) over the 16,000,000 cap",
                     str(err.value))
    assert m, str(err.value)
    got_model, got_code, total, over = (int(g.replace(",", "")) for g in m.groups())
    assert got_model == model and total == model + got_code and over == total - 16_000_000
    assert abs(got_code - raw) < 0.02 * raw  # the raw file (others may be editing the package meanwhile)
    assert not (tmp_path / "rec").exists()
    ok = do_build(runs, tmp_path / "rec2", ids=["a", "b"])
    assert ok.code_form == "compressed" and ok.bytes_total == model + ok.code_bytes <= 16_000_000


def test_failed_compliance_is_refused_unless_allowed(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a", 1)
    fake_run(runs, "b", 2, ok=False)
    with pytest.raises(buildmod.SubmissionError, match="compliance failed: b: eval_time value 612.0"):
        do_build(runs, tmp_path / "rec", ids=["a", "b"])
    result = do_build(runs, tmp_path / "rec", ids=["a", "b"], allow_noncompliant=True)
    assert result.submission["compliance_failures"] == ["b: eval_time value 612.0 limit 600.0"]
    assert "FAIL 612.0" in (result.out / "README.md").read_text()


def test_bad_run_sets_are_refused(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a", 1)
    fake_run(runs, "b", 1)
    with pytest.raises(RunError, match="both have SEED=1"):
        do_build(runs, tmp_path / "rec", ids=["a", "b"])
    with pytest.raises(RunError, match="'nope' not found"):
        do_build(runs, tmp_path / "rec", ids=["a", "nope"])
    (runs / "b" / "summary.json").unlink()
    with pytest.raises(RunError, match="unfinished run"):
        do_build(runs, tmp_path / "rec", ids=["b"])
    fake_run(runs, "c", 3)
    write_json(runs / "c" / "summary.json", {**json.loads((runs / "a" / "summary.json").read_text()),
                                              "model_bytes": 1})
    with pytest.raises(Exception, match="stale metadata"):
        do_build(runs, tmp_path / "rec", ids=["c"])


def test_runs_that_did_not_execute_the_shipped_file_are_refused_by_name(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "a", 1)
    fake_run(runs, "b", 2)
    fake_run(runs, "c", 3)
    result = do_build(runs, tmp_path / "ok", ids=["a", "b", "c"])
    shipped = hashlib.sha256((result.out / "train_gpt.py").read_bytes()).hexdigest()
    assert result.submission["code_sha256"] == shipped == result.submission["runs_code_sha256"]["a"]
    assert f"records the sha256 of the file it executed, `{shipped}`" in (result.out / "README.md").read_text()
    env_b = json.loads((runs / "b" / "environment.json").read_text())
    write_json(runs / "b" / "environment.json", {**env_b, "code_form": "package", "code_file": None})
    env_c = json.loads((runs / "c" / "environment.json").read_text())
    write_json(runs / "c" / "environment.json", {**env_c, "code_sha256": "f" * 64, "source_sha256": "e" * 64})
    with pytest.raises(buildmod.SubmissionError) as err:
        do_build(runs, tmp_path / "rec", ids=["a", "b", "c"])
    assert str(err.value) == (f"2 of 3 run(s) did not run the train_gpt.py this build ships (sha256 {shipped[:12]}): "
                              "b ran the package, not a train_gpt.py; c ran ffffffffffff (its pgolf sources differ)")
    assert not (tmp_path / "rec").exists()
    rc = main(["submission", "build", "a", "b", "c", "--name", "x", "--github-id", "y", "--runs", str(runs),
               "--out", str(tmp_path / "rec")])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err_lines[0].startswith("error: 2 of 3 run(s)") and err_lines[1].startswith("hint:")
    result = do_build(runs, tmp_path / "rec", ids=["a", "b", "c"], allow_code_drift=True)
    readme = (result.out / "README.md").read_text()
    assert result.submission["code_drift"] and "not produced by the shipped train_gpt.py" in readme


def test_the_rebuilt_file_names_the_runs_commit_not_the_checkouts(tmp_path):
    """Runs launched at commit C: a later commit that leaves the sources alone changes nothing."""
    three_runs(tmp_path / "runs")
    result = buildmod.build(["r0", "r1", "r2"], out=tmp_path / "rec", name="n", github_id="g",
                            search=[tmp_path / "runs"])  # no commit given: taken from the runs
    assert COMMIT in (result.out / "train_gpt.py").read_text().splitlines()[0]
    assert not result.submission["code_drift"]


def test_a_log_edited_after_the_run_is_refused(tmp_path):
    import hashlib

    runs = tmp_path / "runs"
    d = fake_run(runs, "a", 1)
    files = [{"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(d.iterdir())]
    write_json(d / "manifest.json", {"run_id": "a", "status": "complete", "files": files})
    assert do_build(runs, tmp_path / "ok", ids=["a"]).submission["n_seeds"] == 1
    (d / "train.log").write_text("seed:1\nfinal val_bpb:1.00000000\n")
    with pytest.raises(RunError, match="a/train.log differs from manifest.json"):
        do_build(runs, tmp_path / "rec", ids=["a"])


def test_out_folder_with_foreign_files_is_refused(tmp_path):
    three_runs(tmp_path / "runs")
    out = tmp_path / "rec"
    out.mkdir()
    (out / "train_seed7.log").write_text("old")
    with pytest.raises(buildmod.SubmissionError, match="train_seed7.log"):
        do_build(tmp_path / "runs", out)


def test_cli_build(tmp_path, capsys):
    three_runs(tmp_path / "runs")
    out = tmp_path / "records" / "2026-05-02_cli"
    rc = main(["submission", "build", "r0", "r1", "r2", "--name", "CLI", "--github-id", "me",
               "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "nothing"), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "code bytes" in text and "bytes_total" in text
    assert json.loads((out / "submission.json").read_text())["name"] == "CLI"


def test_stats_cli_reads_run_folders(tmp_path, capsys):
    three_runs(tmp_path / "runs")
    rc = main(["stats", "r0", "r1", "r2", "--runs", str(tmp_path / "runs"), "--ref-bpb", "1.0810", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["runs"]["bytes_per_token"] == pytest.approx(2.4)
    assert out["improvement_bpb"] == pytest.approx(1.0810 - (1.0599 + 1.0612 + 1.0621) / 3)
    assert out["record"]["holds"] is True


# ---------------------------------------------------------------------------------------------
# end to end: the generated file alone reproduces the package's run


def _main_from_env_or_skip():
    try:
        import pgolf.run as run
    except ImportError as exc:
        pytest.skip(f"pgolf.run is not importable yet ({exc})")
    if not hasattr(run, "main_from_env"):
        pytest.skip("pgolf.run has no main_from_env yet: the single file has nothing to call")
    return run


# The debug preset with 3 steps; non-overlapping scoring windows keep the CPU eval short, and the
# passthrough threshold is lowered so the debug model's small matrices go through GPTQ at all.
E2E_OVERRIDES = {"iterations": 3, "train_log_every": 1, "eval_stride": 64, "passthrough_max_numel": 1024}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, offline_data) -> dict:
    """Train the debug preset with the package, build a records folder from that run, then run its
    train_gpt.py alone (pgolf not importable) with the same seed."""
    run = _main_from_env_or_skip()
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = cfgmod.resolve("debug", env={}, overrides={
        **E2E_OVERRIDES, "seed": 7, "run_id": "pkg-s7", "runs_dir": str(tmp / "runs"),
        "data_path": str(Path(offline_data).resolve()),
        "tokenizer_path": str((Path(offline_data) / "tokenizer.model").resolve())})
    pkg_dir = tmp / "runs" / "pkg-s7"
    pkg = run.pipeline(cfg, pkg_dir)
    rec = tmp / "records" / "2026-05-03_e2e"
    result = buildmod.build(["pkg-s7"], out=rec, name="e2e", github_id="octocat", search=[tmp / "runs"],
                            allow_noncompliant=True, allow_code_drift=True)  # a package run: not a record
    alone = tmp / "alone"
    alone.mkdir()
    shutil.copy(rec / "train_gpt.py", alone / "train_gpt.py")
    proc = subprocess.run(isolated_cmd("train_gpt.py"), cwd=alone, capture_output=True, text=True, timeout=900,
                          env=clean_env(SEED="7", RUN_ID="bundle-s7"))
    return {"cfg": cfg, "pkg": pkg, "pkg_dir": pkg_dir, "result": result, "alone": alone, "proc": proc,
            "bundle_dir": alone / "runs" / "bundle-s7"}


@pytest.mark.slow
def test_bundled_file_alone_reproduces_the_package_run(e2e):
    proc, pkg, pkg_dir = e2e["proc"], e2e["pkg"], e2e["pkg_dir"]
    assert pkg and (pkg_dir / "summary.json").is_file()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads((e2e["bundle_dir"] / "summary.json").read_text())
    assert sorted(p.name for p in e2e["alone"].iterdir()) == ["runs", "train_gpt.py"]
    bundle_cfg = json.loads((e2e["bundle_dir"] / "config.json").read_text())
    want_cfg = e2e["cfg"].to_dict()
    for section in ("model", "train", "quant", "eval"):  # the same config resolved inside the file
        assert bundle_cfg[section] == want_cfg[section], section
    assert got["steps"] == pkg["steps"] == E2E_OVERRIDES["iterations"]
    assert got["val_loss"] == pkg["val_loss"]
    assert got["val_bpb"] == pkg["val_bpb"]
    assert got["model_bytes"] == pkg["model_bytes"] == (pkg_dir / "artifact.pgz").stat().st_size
    assert e2e["result"].code_bytes == (e2e["alone"] / "train_gpt.py").stat().st_size


@pytest.mark.slow
def test_bundled_run_counts_its_own_file_as_code_bytes(e2e):
    got = json.loads((e2e["bundle_dir"] / "summary.json").read_text())
    shipped = (e2e["alone"] / "train_gpt.py").read_bytes()
    assert got["code_bytes"] == len(shipped)
    env = json.loads((e2e["bundle_dir"] / "environment.json").read_text())
    assert env["code_sha256"] == hashlib.sha256(shipped).hexdigest() and env["code_form"] == "compressed"
    pkg_env = json.loads((e2e["pkg_dir"] / "environment.json").read_text())
    assert pkg_env["code_form"] == "package" and pkg_env["code_file"] is None
    assert json.loads((e2e["pkg_dir"] / "summary.json").read_text())["code_bytes"] == len(shipped)  # would ship


@pytest.mark.slow
def test_a_run_of_the_file_is_packaged_without_any_allowance(e2e, tmp_path):
    """The file-alone run executed the shipped file: the build accepts it and ships the same bytes."""
    result = buildmod.build(["bundle-s7"], out=tmp_path / "rec", name="e2e", github_id="octocat",
                            search=[e2e["alone"] / "runs"], allow_noncompliant=True)
    assert not result.submission["code_drift"]
    assert (result.out / "train_gpt.py").read_bytes() == (e2e["alone"] / "train_gpt.py").read_bytes()
    log = (result.out / "train_seed7.log").read_text()
    assert f"Code size: {result.code_bytes} bytes (" in log and "final val_loss:" in log
