"""`pgolf launch`: plans, the dry run (offline, secrets masked), and a real launch against a fake
SkyPilot API (the cloud is the one edge we cannot reach from a test).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf import config as cfgmod
from pgolf.cloud import launch as lib
from pgolf.cli import main

REPO = Path(__file__).resolve().parents[1]
RECORD = str(REPO / "sky" / "record.yaml")
SECRET = "AKIA-SUPER-SECRET-VALUE-123"
RUN_ID = re.compile(r"^seed-s(\d+)-\d{8}T\d{6}-[0-9a-f]{4}$")
IMAGE = "ghcr.io/acme/pgolf:cu128-torch2.9.1-fa3-abc1234"
CODE = "c" * 64  # a CODE_SHA256 value, for plans built without generating the file


@pytest.fixture
def cloud_env(sky_home, monkeypatch, tmp_path):
    """A user's shell: temp HOME (sky writes ~/.sky), AWS keys, RESULTS_URI, a user name, and a
    workdir whose sky/ is the repository's (so ship/train_gpt.py is written there, not in the repo)."""
    monkeypatch.setenv("HOME", str(sky_home))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-2")
    monkeypatch.setenv("RESULTS_URI", "s3://acme-results/runs")
    monkeypatch.delenv("DATA_URI", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("TTT_LR", raising=False)
    monkeypatch.setenv("LOGNAME", "Ada.Lovelace")
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    (workdir / "sky").symlink_to(REPO / "sky")
    monkeypatch.chdir(workdir)
    return workdir


def shipped_in(workdir: Path) -> tuple[int, str]:
    data = (workdir / lib.SHIP_PATH).read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


# --- pure helpers ---------------------------------------------------------------------------------


def test_cluster_name_is_user_and_seed():
    assert lib.cluster_name("Ada.Lovelace", 1337) == "pgolf-ada-lovelace-s1337"
    assert lib.cluster_name("", 42) == "pgolf-user-s42"


@pytest.mark.parametrize("image, ok", [
    ("ghcr.io/acme/pgolf:cu128-abc", True),
    ("docker:ghcr.io/acme/pgolf:cu128-abc", True),
    ("ghcr.io/acme/pgolf@sha256:" + "a" * 64, True),
    ("localhost:5000/pgolf:v1", True),
    ("ghcr.io/acme/pgolf:latest", False),
    ("ghcr.io/acme/pgolf", False),
    ("localhost:5000/pgolf", False),
])
def test_images_must_be_pinned(image, ok):
    if ok:
        assert lib.image_id_for(image).startswith("docker:")
        assert lib.image_is_pinned(lib.image_id_for(image))
    else:
        with pytest.raises(lib.LaunchError, match="not pinned"):
            lib.image_id_for(image)


def test_image_digest_is_taken_from_a_digest_reference():
    assert lib.image_digest_of("x/y@sha256:" + "b" * 64) == "sha256:" + "b" * 64
    assert lib.image_digest_of("x/y:tag") == ""


def test_env_overrides_are_checked_before_any_money_is_spent():
    assert lib.parse_env_pairs(["ttt_lr=1e-4", "A=b=c"]) == {"TTT_LR": "1e-4", "A": "b=c"}
    with pytest.raises(lib.LaunchError, match="NAME=VALUE"):
        lib.parse_env_pairs(["TTT_LR"])
    with pytest.raises(lib.LaunchError, match="did you mean TTT_LR"):
        lib.check_env_names({"TTT_LRR": "1"}, {})
    with pytest.raises(Exception, match="SEED"):
        lib.check_env_names({"SEED": "abc"}, {"SEED": 1})


def test_plan_requires_the_null_envs():
    with pytest.raises(lib.LaunchError, match="RESULTS_URI"):
        lib.plan_launch(RECORD, cluster="c", lookup=lambda n: "x")


def test_plan_reads_secrets_from_the_environment_and_masks_them():
    plan = lib.plan_launch(RECORD, cluster="c", envs={"RESULTS_URI": "s3://b/r", "CODE_SHA256": CODE},
                           lookup={"AWS_ACCESS_KEY_ID": SECRET}.get)
    assert plan.secrets["AWS_ACCESS_KEY_ID"] == SECRET
    assert plan.missing_secrets == ["AWS_SECRET_ACCESS_KEY"]  # HF_TOKEN is optional ("")
    cfg = lib.resolved_config(plan)
    assert cfg["secrets"]["AWS_ACCESS_KEY_ID"] == lib.MASK
    assert SECRET not in str(cfg) and SECRET not in " ".join(lib.sky_command(plan))
    with pytest.raises(lib.LaunchError, match="not declared"):
        lib.plan_launch(RECORD, cluster="c", envs={"RESULTS_URI": "s3://b/r", "CODE_SHA256": CODE},
                        secrets={"GH_TOKEN": "x"})


def test_image_override_sets_image_id_and_the_recorded_envs():
    digest = "sha256:" + "d" * 64
    plan = lib.plan_launch(RECORD, cluster="c", envs={"RESULTS_URI": "s3://b/r", "CODE_SHA256": CODE},
                           image=IMAGE, image_digest=digest, lookup=lambda n: "x")
    assert plan.image_id == f"docker:{IMAGE}"
    assert plan.envs["IMAGE"] == IMAGE and plan.envs["IMAGE_DIGEST"] == digest
    assert lib.resolved_config(plan)["resources"]["image_id"] == f"docker:{IMAGE}"


def test_sky_command_for_each_mode():
    common = dict(envs={"RESULTS_URI": "s3://b/r", "SEED": "7", "CODE_SHA256": CODE}, lookup=lambda n: "x")
    launch = lib.sky_command(lib.plan_launch(RECORD, cluster="c1", image=IMAGE, **common))
    assert launch == ["sky", "launch", "-y", "-c", "c1", RECORD, "--image-id", f"docker:{IMAGE}",
                      "--env", "RESULTS_URI=s3://b/r", "--env", "SEED=7", "--env", f"CODE_SHA256={CODE}",
                      "--env", f"IMAGE={IMAGE}",
                      "--env", "IMAGE_DIGEST=", "--secret", "AWS_ACCESS_KEY_ID", "--secret",
                      "AWS_SECRET_ACCESS_KEY", "--secret", "HF_TOKEN", "-i", "10", "--down"]
    exec_ = lib.sky_command(lib.plan_launch(RECORD, mode="exec", cluster="c1", **common))
    assert exec_ == ["sky", "exec", "c1", RECORD, "--env", "RESULTS_URI=s3://b/r", "--env", "SEED=7",
                     "--env", f"CODE_SHA256={CODE}"]
    common["envs"].pop("CODE_SHA256")  # long.yaml runs the package (it resumes), no generated file
    jobs = lib.sky_command(lib.plan_launch(REPO / "sky" / "long.yaml", mode="jobs", cluster="j", num_nodes=4,
                                           **common))
    assert jobs[:7] == ["sky", "jobs", "launch", "-y", "-n", "j", str(REPO / "sky" / "long.yaml")]
    assert "--num-nodes" in jobs and "4" in jobs and "--down" not in jobs


# --- the dry run through the real CLI ---------------------------------------------------------------


def test_dry_run_prints_the_resolved_task_and_command(cloud_env, capsys):
    code = main(["launch", "--dry-run", "--seed", "1337", "--image", IMAGE, "--env", "TTT_LR=2e-4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "nothing was sent anywhere" in out
    assert "resources: runpod H100-SXM:8 x 1 node(s), on demand" in out
    assert f"image docker:{IMAGE}" in out
    assert "cluster: pgolf-ada-lovelace-s1337" in out
    assert "AWS_ACCESS_KEY_ID=****" in out and SECRET not in out
    assert "RESULTS_URI=s3://acme-results/runs" in out and "TTT_LR=2e-4" in out
    run_id = re.search(r"^  RUN_ID=(\S+)$", out, re.M).group(1)
    assert RUN_ID.match(run_id) and RUN_ID.match(run_id).group(1) == "1337"
    assert "torchrun --standalone" in out and "bash sky/node.sh gpus 8 sxm" in out
    assert re.search(r"checked: +skypilot 0\.14\.1: schema, storage, features on RunPod; record rules", out)
    command = out.split("equivalent command:\n", 1)[1].strip()
    assert command.startswith("sky launch -y -c pgolf-ada-lovelace-s1337 sky/record.yaml --image-id")
    assert f"--env RUN_ID={run_id}" in command and "-i 10 --down" in command
    # the generated file: written into the workdir, shown with its bytes and sha256, passed to the node
    nbytes, sha = shipped_in(cloud_env)
    assert out.startswith("# pgolf launch --dry-run: nothing was sent anywhere (wrote ship/train_gpt.py)")
    assert f"code:      ship/train_gpt.py ({nbytes:,} B, sha256 {sha})" in out
    assert f"  CODE_SHA256={sha}\n" in out and f"--env CODE_SHA256={sha}" in command
    assert "ship/train_gpt.py" in out.split("run:\n", 1)[1]  # the run block runs that very file


def test_the_shipped_file_is_the_bundle_of_the_tasks_config(cloud_env, capsys):
    """The same bytes `pgolf submission build` ships for runs of this config: the preset, the YAML's
    config envs and --env overrides embedded; the seed and launch plumbing not."""
    from pgolf.submission import bundle as bundlemod

    assert main(["launch", "--dry-run", "--no-check", "--seed", "5", "--preset", "tiny",
                 "--env", "TTT_LR=2e-4", "--env", "MAX_WALLCLOCK_SECONDS=590"]) == 0
    capsys.readouterr()
    text = (cloud_env / lib.SHIP_PATH).read_text()
    node_cfg = cfgmod.resolve("tiny", {"seed": "5", "ttt_lr": "2e-4", "max_wallclock_seconds": "590",
                                       "run_id": "tiny-s5-x", "results_uri": "s3://acme-results/runs",
                                       "data_path": "data/datasets/fineweb10B_sp1024",
                                       "tokenizer_path": "data/tokenizers/fineweb_1024_bpe.model",
                                       "image": "pytorch/pytorch:whatever"}, env={})
    assert text == bundlemod.shipped_text(node_cfg)  # what a build from such a run would ship
    defaults = bundlemod.extract_program(text).split("DEFAULTS=", 1)[1].split("\n", 1)[0]
    assert "'ttt_lr':0.0002" in defaults and "'max_wallclock_seconds':590.0" in defaults
    assert "'preset':'tiny'" in defaults and "'seed':1337" in defaults  # the preset's seed, not 5
    assert "acme-results" not in text


def test_a_record_launch_fails_on_missing_envs_before_generating_anything(cloud_env, monkeypatch, capsys):
    monkeypatch.delenv("RESULTS_URI")
    assert main(["launch", "--dry-run", "--no-check"]) == 2
    assert capsys.readouterr().err.strip() == "error: record.yaml needs RESULTS_URI; pass --env RESULTS_URI=..."
    assert not (cloud_env / lib.SHIP_PATH).exists()


def test_the_shipped_file_syncs_with_the_workdir(cloud_env, capsys):
    """SkyPilot's own exclusion logic (.skyignore wins over .gitignore): ship/ goes, data/ does not."""
    from sky.data import storage_utils

    assert main(["launch", "--dry-run", "--no-check"]) == 0
    capsys.readouterr()
    (cloud_env / ".skyignore").write_text((REPO / ".skyignore").read_text())
    (cloud_env / ".gitignore").write_text((REPO / ".gitignore").read_text())
    (cloud_env / "data").mkdir()
    (cloud_env / "data" / "shard.bin").write_bytes(b"x")
    excluded = storage_utils.get_excluded_files(str(cloud_env))
    assert "data" in excluded and not [p for p in excluded if p.startswith("ship")]
    assert "/ship/" in (REPO / ".gitignore").read_text().splitlines()  # never committed


def test_dry_run_of_three_seeds_launches_once_then_execs(cloud_env, capsys):
    assert main(["launch", "--dry-run", "--seeds", "1337", "42", "2025", "--no-check"]) == 0
    out = capsys.readouterr().out
    plans = out.split("# pgolf launch --dry-run")[1:]
    assert len(plans) == 3
    assert "mode:      launch" in plans[0] and "setup:" in plans[0]
    for plan, seed in zip(plans[1:], ("42", "2025")):
        assert "mode:      exec" in plan and "setup:" not in plan
        assert f"SEED={seed}" in plan and "sky exec pgolf-ada-lovelace-s1337 sky/record.yaml" in plan
    run_ids = re.findall(r"^  RUN_ID=(\S+)$", out, re.M)
    assert len(set(run_ids)) == 3
    shas = re.findall(r"^  CODE_SHA256=(\S+)$", out, re.M)
    assert shas == [shipped_in(cloud_env)[1]] * 3  # one file for every seed: the seed is not embedded


def test_dry_run_refuses_a_record_that_breaks_the_rules(cloud_env, tmp_path, capsys):
    bad = tmp_path / "record-pcie.yaml"
    bad.write_text(Path(RECORD).read_text().replace("accelerators: H100-SXM:8", "accelerators: H100:8"))
    assert main(["launch", str(bad), "--dry-run"]) == 2
    assert "H100-SXM:8" in capsys.readouterr().err


# --- a real launch, with SkyPilot's client API faked at the edge -------------------------------------


class FakeSky:
    """Records what pgolf asks SkyPilot to do; jobs exit with the codes given."""

    def __init__(self, exit_codes=(0,)):
        self.calls: list[tuple] = []
        self.exit_codes = list(exit_codes)
        outer = self

        class Jobs:
            @staticmethod
            def launch(task, name=None):
                outer.calls.append(("jobs.launch", name, task))
                return "req-jobs"

        self.jobs = Jobs()

    def launch(self, task, cluster_name=None, retry_until_up=False, idle_minutes_to_autostop=None, down=False):
        self.calls.append(("launch", cluster_name, task, idle_minutes_to_autostop, down, retry_until_up))
        return "req-launch"

    def exec(self, task, cluster_name=None):
        self.calls.append(("exec", cluster_name, task))
        return "req-exec"

    def stream_and_get(self, request_id):
        return ([3], None) if request_id == "req-jobs" else (len(self.calls), object())

    def tail_logs(self, cluster, job_id, follow=True):
        self.calls.append(("tail_logs", cluster, job_id, follow))
        return self.exit_codes.pop(0)


@pytest.fixture
def fake_sky(cloud_env, monkeypatch):
    import sky

    fake = FakeSky()
    for name in ("launch", "exec", "stream_and_get", "tail_logs"):
        monkeypatch.setattr(sky, name, getattr(fake, name))
    monkeypatch.setattr(sky, "jobs", fake.jobs)
    fake.workdir = cloud_env
    return fake


def test_launch_builds_the_task_streams_logs_and_says_how_to_get_results(fake_sky, capsys):
    assert main(["launch", "--seed", "42", "--image", IMAGE, "--idle-minutes", "15"]) == 0
    out = capsys.readouterr().out
    (kind, cluster, task, idle, down, retry), tail = fake_sky.calls
    assert (kind, cluster, idle, down, retry) == ("launch", "pgolf-ada-lovelace-s42", 15, True, False)
    assert tail[0] == "tail_logs" and tail[1] == cluster and tail[3] is True
    res = next(iter(task.resources))
    assert str(res.cloud) == "RunPod" and res.accelerators == {"H100-SXM": 8}
    assert res.image_id[None] == f"docker:{IMAGE}"
    assert task.envs["SEED"] == "42" and task.envs["IMAGE"] == IMAGE
    nbytes, sha = shipped_in(fake_sky.workdir)
    assert task.envs["CODE_SHA256"] == sha and f"runs ship/train_gpt.py: {nbytes:,} B, sha256 {sha}" in out
    assert task.envs["RESULTS_URI"] == "s3://acme-results/runs"
    assert task.secrets["AWS_ACCESS_KEY_ID"].get_secret_value() == SECRET
    assert f"make results RUN_ID={task.envs['RUN_ID']} RESULTS_URI=s3://acme-results/runs" in out
    assert f"pgolf results pull {task.envs['RUN_ID']} --from s3://acme-results/runs" in out


def test_seeds_share_one_cluster_and_stop_at_the_first_failure(fake_sky, capsys):
    fake_sky.exit_codes = [0, 100]
    assert main(["launch", "--seeds", "1", "2", "3"]) == 100
    kinds = [c[0] for c in fake_sky.calls]
    assert kinds == ["launch", "tail_logs", "exec", "tail_logs"]  # seed 3 never started
    assert {c[1] for c in fake_sky.calls} == {"pgolf-ada-lovelace-s1"}
    assert fake_sky.calls[2][2].envs["SEED"] == "2"
    assert "make down CLUSTER=pgolf-ada-lovelace-s1" in capsys.readouterr().out


def test_managed_long_run_goes_to_sky_jobs(fake_sky):
    assert main(["launch", "sky/long.yaml", "--managed", "--seed", "5", "--num-nodes", "4",
                 "--cluster", "pgolf-long"]) == 0
    (kind, name, task), = fake_sky.calls
    assert (kind, name, task.num_nodes) == ("jobs.launch", "pgolf-long", 4)
    assert RUN_ID.match(task.envs["RUN_ID"])  # fixed for the job: recoveries resume the same run


def test_missing_secret_stops_before_skypilot_is_called(fake_sky, monkeypatch, capsys):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["launch", "--seed", "1"]) == 2
    assert fake_sky.calls == []
    assert "AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err


def test_skypilot_failure_becomes_one_error_line_with_a_teardown_hint(fake_sky, monkeypatch, capsys):
    import sky

    def refuse(*args, **kwargs):
        raise RuntimeError("Failed to provision all possible launchable resources.\nRetry later.")

    monkeypatch.setattr(sky, "launch", refuse)
    assert main(["launch", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: SkyPilot launch on pgolf-ada-lovelace-s1 failed: Failed to provision" in err
    assert "hint:" in err and "make down CLUSTER=pgolf-ada-lovelace-s1" in err


# --- import hygiene ------------------------------------------------------------------------------


def test_cli_and_launch_modules_do_not_import_skypilot_or_torch():
    code = ("import sys, pgolf.cli, pgolf.cli.launch, pgolf.cloud.launch, pgolf.cloud.cost; pgolf.cli.build_parser(); "
            "bad = [m for m in ('sky', 'torch', 'boto3') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pgolf_cli_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "pgolf.cli", "launch", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout


# --- mk/launch.mk ----------------------------------------------------------------------------------

MK = REPO / "mk" / "launch.mk"


def make_n(*args: str) -> str:
    proc = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_make_target_prints_what_it_does():
    targets = re.findall(r"(?m)^([a-z][a-z0-9-]*):.*##", MK.read_text())
    assert {"launch", "seeds", "status", "logs", "down", "stage-data", "image", "push"} <= set(targets)
    for target in targets:
        body = MK.read_text().split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
        recipe = [ln.strip() for ln in body.splitlines()[1:] if ln.startswith("\t")]
        first_echo = next(i for i, ln in enumerate(recipe) if ln.startswith("@echo \">> "))
        assert all(ln.startswith("@test") for ln in recipe[:first_echo]), target  # only guards before it


def test_make_and_pgolf_name_clusters_the_same_way():
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    out = make_n("launch", "SEED=7", "IMAGE=ghcr.io/acme/pgolf:v1")
    assert (f"launch sky/record.yaml --seed 7 --cluster {lib.cluster_name(user, 7)} "
            f"--image ghcr.io/acme/pgolf:v1") in out
    assert f"sky down -y {lib.cluster_name(user, 7)}" in make_n("down", "SEED=7")
    assert f"--seeds 5 6 --cluster {lib.cluster_name(user, 5)}" in make_n("seeds", "SEEDS=5 6")


def test_make_refuses_image_and_staging_without_their_variables():
    for target in ("image", "stage-data"):
        proc = subprocess.run(["make", "--no-print-directory", "-o", "venv", "-o", ".venv/.installed", target,
                               "IMAGE=", "DATA_URI="], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode != 0 and "set " in proc.stdout


def test_a_preset_on_other_data_gets_its_variant_shards_and_tokenizer(cloud_env, capsys):
    """`--preset frontier` trains on CaseOps SP8192: the YAML's sp1024 data envs (which the node's env would
    put over the file's embedded defaults) follow the preset, so the node fetches and reads the right data."""
    assert main(["launch", "--dry-run", "--no-check", "--seed", "5", "--preset", "frontier"]) == 0
    out = capsys.readouterr().out
    data = cfgmod.resolve("frontier", env={}).data
    assert "VARIANT=caseops8192" in out or "VARIANT: caseops8192" in out
    assert data.data_path in out and data.tokenizer_path in out
    assert "fineweb10B_sp1024" not in out.split("sky launch", 1)[-1]
