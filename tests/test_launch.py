"""`pgolf launch`: plans, the dry run (offline, secrets masked), and a real launch against a fake
SkyPilot API (the cloud is the one edge we cannot reach from a test).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf import launch as lib
from pgolf.cli import main

REPO = Path(__file__).resolve().parents[1]
RECORD = str(REPO / "sky" / "record.yaml")
SECRET = "AKIA-SUPER-SECRET-VALUE-123"
RUN_ID = re.compile(r"^seed-s(\d+)-\d{8}T\d{6}-[0-9a-f]{4}$")
IMAGE = "ghcr.io/acme/pgolf:cu128-torch2.9.1-fa3-abc1234"


@pytest.fixture
def cloud_env(sky_home, monkeypatch):
    """A user's shell: temp HOME (sky writes ~/.sky), AWS keys, RESULTS_URI, a user name."""
    monkeypatch.setenv("HOME", str(sky_home))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-2")
    monkeypatch.setenv("RESULTS_URI", "s3://acme-results/runs")
    monkeypatch.delenv("DATA_URI", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("LOGNAME", "Ada.Lovelace")
    monkeypatch.chdir(REPO)


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
    plan = lib.plan_launch(RECORD, cluster="c", envs={"RESULTS_URI": "s3://b/r"},
                           lookup={"AWS_ACCESS_KEY_ID": SECRET}.get)
    assert plan.secrets["AWS_ACCESS_KEY_ID"] == SECRET
    assert plan.missing_secrets == ["AWS_SECRET_ACCESS_KEY"]  # HF_TOKEN is optional ("")
    cfg = lib.resolved_config(plan)
    assert cfg["secrets"]["AWS_ACCESS_KEY_ID"] == lib.MASK
    assert SECRET not in str(cfg) and SECRET not in " ".join(lib.sky_command(plan))
    with pytest.raises(lib.LaunchError, match="not declared"):
        lib.plan_launch(RECORD, cluster="c", envs={"RESULTS_URI": "s3://b/r"}, secrets={"GH_TOKEN": "x"})


def test_image_override_sets_image_id_and_the_recorded_envs():
    digest = "sha256:" + "d" * 64
    plan = lib.plan_launch(RECORD, cluster="c", envs={"RESULTS_URI": "s3://b/r"}, image=IMAGE,
                           image_digest=digest, lookup=lambda n: "x")
    assert plan.image_id == f"docker:{IMAGE}"
    assert plan.envs["IMAGE"] == IMAGE and plan.envs["IMAGE_DIGEST"] == digest
    assert lib.resolved_config(plan)["resources"]["image_id"] == f"docker:{IMAGE}"


def test_sky_command_for_each_mode():
    common = dict(envs={"RESULTS_URI": "s3://b/r", "SEED": "7"}, lookup=lambda n: "x")
    launch = lib.sky_command(lib.plan_launch(RECORD, cluster="c1", image=IMAGE, **common))
    assert launch == ["sky", "launch", "-y", "-c", "c1", RECORD, "--image-id", f"docker:{IMAGE}",
                      "--env", "RESULTS_URI=s3://b/r", "--env", "SEED=7", "--env", f"IMAGE={IMAGE}",
                      "--env", "IMAGE_DIGEST=", "--secret", "AWS_ACCESS_KEY_ID", "--secret",
                      "AWS_SECRET_ACCESS_KEY", "--secret", "HF_TOKEN", "-i", "10", "--down"]
    exec_ = lib.sky_command(lib.plan_launch(RECORD, mode="exec", cluster="c1", **common))
    assert exec_ == ["sky", "exec", "c1", RECORD, "--env", "RESULTS_URI=s3://b/r", "--env", "SEED=7"]
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


def test_dry_run_refuses_a_record_that_breaks_the_rules(cloud_env, tmp_path, capsys):
    bad = tmp_path / "record-pcie.yaml"
    bad.write_text(Path(RECORD).read_text().replace("accelerators: H100-SXM:8", "accelerators: H100:8"))
    assert main(["launch", str(bad), "--dry-run"]) == 2
    assert "H100-SXM:8" in capsys.readouterr().err


def test_missing_required_env_is_one_line_error(cloud_env, monkeypatch, capsys):
    monkeypatch.delenv("RESULTS_URI")
    assert main(["launch", "--dry-run", "--no-check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: record.yaml needs RESULTS_URI; pass --env RESULTS_URI=..."]


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
    code = ("import sys, pgolf.cli, pgolf.cli.launch, pgolf.launch, pgolf.cost; pgolf.cli.build_parser(); "
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
