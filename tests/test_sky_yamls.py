"""Every sky/*.yaml passes SkyPilot 0.14.1's offline checks and the project's rules, its shell
blocks pass shellcheck, and every `pgolf` command in them parses with the real CLI.

Offline only (cloud-launch.md 2.2): no credentials, no network. `import sky` writes $HOME/.sky, so
HOME points at a temp dir whenever sky is used here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.cloud import launch as lib
from pgolf import results
from pgolf.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SKY_DIR = REPO / "sky"
YAMLS = sorted(SKY_DIR.glob("*.yaml"))
SHELLCHECK = Path(sys.executable).with_name("shellcheck")
DIGEST = re.compile(r"^docker:[^\s@]+@sha256:[0-9a-f]{64}$")


@pytest.fixture
def sky(sky_home, monkeypatch):
    """SkyPilot imported once per session, always under a temp HOME."""
    monkeypatch.setenv("HOME", str(sky_home))
    import sky as sky_module

    return sky_module


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dummy_plan(path: Path) -> lib.LaunchPlan:
    """A plan with a value for every required env and secret, as `--env`/`--secret` would give."""
    cfg = load(path)
    envs = {k: "s3://pgolf-test/x" for k, v in (cfg.get("envs") or {}).items() if v is None}
    return lib.plan_launch(path, cluster="pgolf-test-s1", envs=envs, lookup=lambda name: "dummy")


def test_the_five_tasks_exist():
    assert {p.name for p in YAMLS} >= {"record.yaml", "record-any.yaml", "dev.yaml", "long.yaml", "data.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_passes_skypilot_offline_checks(path, sky):
    """Schema + semantic checks (from_yaml_config with dummy secrets), storage specs, features."""
    cfg = load(path)
    secrets = [(k, "dummy") for k, v in (cfg.get("secrets") or {}).items()]
    envs = [(k, "s3://pgolf-test/x") for k, v in (cfg.get("envs") or {}).items() if v is None]
    task = sky.Task.from_yaml_config(dict(cfg), env_overrides=envs or None, secrets_overrides=secrets or None)
    assert task.name == cfg["name"]
    checked = lib.validate_task(task)
    assert checked, "no resources were checked"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_required_envs_are_null_so_a_bare_launch_fails(path, sky):
    cfg = load(path)
    required = [k for k, v in (cfg.get("envs") or {}).items() if v is None]
    assert required, f"{path.name} should force the user to name a bucket"
    with pytest.raises(ValueError, match=required[0]):
        sky.Task.from_yaml_config(dict(cfg), secrets_overrides=[(k, "x") for k in cfg.get("secrets") or {}])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_header_documents_the_commands_for_this_file(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    for word in ("Launch", "Status", "Logs", "Down"):
        assert f"# {word}" in header, f"{path.name} header lacks a {word} line"
    assert f"sky/{path.name}" in header, "the header must name this file, not a sibling"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_images_are_digest_pinned(path):
    resources = load(path)["resources"]
    images = [resources.get("image_id")] + [o.get("image_id") for o in resources.get("any_of", [])]
    images = [i for i in images if i]
    assert images, f"{path.name} has no image_id"
    for image in images:
        assert DIGEST.match(image), f"{image} is not docker:<name>@sha256:<64 hex>"
        assert ":latest" not in image


def test_record_yaml_is_exactly_8_sxm_h100_one_node_on_demand():
    cfg = load(SKY_DIR / "record.yaml")
    res = cfg["resources"]
    assert res["infra"] == "runpod" and res["accelerators"] == "H100-SXM:8"
    assert cfg["num_nodes"] == 1
    assert res["use_spot"] is False
    assert "any_of" not in res and "ordered" not in res
    assert lib.record_rule_violations(cfg) == []


def test_record_any_offers_only_sxm_sources():
    cfg = load(SKY_DIR / "record-any.yaml")
    pairs = {(o["infra"], o["accelerators"]) for o in cfg["resources"]["any_of"]}
    assert ("runpod", "H100-SXM:8") in pairs
    assert ("runpod", "H100:8") not in pairs  # RunPod's H100 is the PCIe card
    assert {("aws", "H100:8"), ("gcp", "H100:8"), ("lambda", "H100:8")} <= pairs
    assert lib.record_rule_violations(cfg) == []
    # same envs, setup and run as record.yaml: one record recipe, two ways to find GPUs
    rec = load(SKY_DIR / "record.yaml")
    assert (cfg["envs"], cfg["setup"], cfg["run"]) == (rec["envs"], rec["setup"], rec["run"])


@pytest.mark.parametrize("mutate, complaint", [
    (lambda c: c["resources"].update(accelerators="H100:8"), "H100-SXM:8"),
    (lambda c: c["resources"].update(use_spot=True), "on demand"),
    (lambda c: c.update(num_nodes=2), "one node"),
    (lambda c: c["resources"].update(image_id="docker:pytorch/pytorch:latest"), "pinned"),
    (lambda c: c["resources"].update(infra="cudo"), "not a known"),
    (lambda c: c["resources"].update(infra="aws", accelerators="H100-SXM:8"), "'H100:8'"),
])
def test_record_rules_catch_each_mistake(mutate, complaint):
    cfg = load(SKY_DIR / "record.yaml")
    mutate(cfg)
    problems = lib.record_rule_violations(cfg)
    assert any(complaint in p for p in problems), problems


def test_offline_checks_can_fail(sky, tmp_path):
    """The same checks reject what the clouds would refuse: so the passing tests mean something."""
    cfg = load(SKY_DIR / "record.yaml")
    secrets = [(k, "x") for k in cfg["secrets"]]
    envs = [("RESULTS_URI", "s3://b/r"), ("CODE_SHA256", "c" * 64)]
    multi = dict(cfg, num_nodes=2)  # RunPod has no multi-node
    with pytest.raises(lib.LaunchError, match="(?i)multi"):
        lib.validate_task(sky.Task.from_yaml_config(multi, env_overrides=envs, secrets_overrides=secrets))
    mounted = dict(cfg, file_mounts={"/data": {"source": "s3://pgolf-bucket", "mode": "MOUNT"}})
    with pytest.raises(lib.LaunchError, match="(?i)mount"):
        lib.validate_task(sky.Task.from_yaml_config(mounted, env_overrides=envs, secrets_overrides=secrets))
    typo = dict(cfg)
    typo["runn"] = typo.pop("run")
    bad = tmp_path / "record.yaml"
    bad.write_text(yaml.safe_dump(typo))
    plan = lib.plan_launch(bad, cluster="c", envs=dict(envs), lookup=lambda n: "x")
    with pytest.raises(lib.LaunchError, match="runn"):
        lib.build_task(plan)


def test_dev_is_one_gpu_and_long_is_multi_node_managed():
    dev = load(SKY_DIR / "dev.yaml")
    assert set(dev["resources"]["accelerators"].values()) == {1}
    long = load(SKY_DIR / "long.yaml")
    assert long["num_nodes"] > 1
    assert long["resources"]["job_recovery"]["strategy"]
    assert any(o.get("use_spot") for o in long["resources"]["any_of"])
    assert float(long["envs"]["MAX_WALLCLOCK_SECONDS"]) > 600
    assert float(long["envs"]["CHECKPOINT_EVERY_SECONDS"]) > 0
    run = long["run"]
    for var in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES", "SKYPILOT_TASK_ID"):
        assert var in run
    assert "--if-exists" in run and "--resume" in run  # restore from the store, then resume
    assert "|| echo" not in run  # a failed restore must not start the run over


def test_data_yaml_is_cpu_only_and_pushes_to_the_bucket():
    cfg = load(SKY_DIR / "data.yaml")
    assert "accelerators" not in cfg["resources"]
    assert cfg["envs"]["DATA_URI"] is None
    assert "pgolf data push" in cfg["run"]


def test_setup_checks_gpus_and_the_shipped_file_before_anything_else():
    for name, count, kind in (("record.yaml", 8, "sxm"), ("record-any.yaml", 8, "sxm"),
                              ("long.yaml", 8, "sxm"), ("dev.yaml", 1, "any")):
        lines = [ln.strip() for ln in load(SKY_DIR / name)["setup"].splitlines()]
        gpu = lines.index(f"bash sky/node.sh gpus {count} {kind}")
        install = next(i for i, ln in enumerate(lines) if "node.sh install" in ln)
        fetch = next(i for i, ln in enumerate(lines) if "pgolf data fetch" in ln)
        code = next((i for i, ln in enumerate(lines) if "node.sh code" in ln), None)
        assert gpu < install < fetch, name
        assert (code is not None) == (name in RECORD_TASKS) and (code is None or gpu < code < install), name


# --- shell blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
@pytest.mark.parametrize("block", ["setup", "run"])
def test_shell_blocks_pass_shellcheck(path, block, tmp_path):
    script = load(path).get(block)
    assert script, f"{path.name} has no {block}"
    f = tmp_path / f"{path.stem}-{block}.sh"
    f.write_text("#!/usr/bin/env bash\n" + script)
    proc = subprocess.run([str(SHELLCHECK), "-s", "bash", str(f)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_shellcheck_catches_unquoted_skypilot_vars(tmp_path):
    f = tmp_path / "bad.sh"
    f.write_text("#!/usr/bin/env bash\ntorchrun --nproc_per_node=$SKYPILOT_NUM_GPUS_PER_NODE x\n")
    proc = subprocess.run([str(SHELLCHECK), "-s", "bash", str(f)], capture_output=True, text=True)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


# --- pgolf command lines against the real parser -------------------------------------------------


SKYPILOT_VARS = {"SKYPILOT_NUM_GPUS_PER_NODE": "8", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "0",
                 "SKYPILOT_NODE_IPS": "10.0.0.1", "SKYPILOT_TASK_ID": "sky-2026-11-26-00-00-00-000000_c_1",
                 "HOME": "/root"}
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def expand(token: str, env: dict[str, str]) -> str:
    """What bash makes of $VAR, ${VAR} and ${VAR:-default} with the task's envs exported."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        got = env.get(name, "")
        return got if got or m.group(2) is None else m.group(2)
    return _VAR.sub(value, token)


def pgolf_commands(script: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """argv lists of every `pgolf ...` and `... -m pgolf.cli ...` command in a shell block."""
    env = {**SKYPILOT_VARS, **(env or {})}
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = []
    for line in joined.splitlines():
        line = line.split(" ||", 1)[0].strip()
        tokens = shlex.split(line, comments=True) if line else []
        if tokens[:1] == ["pgolf"]:
            argv = tokens[1:]
        elif "pgolf.cli" in tokens and tokens[tokens.index("pgolf.cli") - 1] == "-m":
            argv = tokens[tokens.index("pgolf.cli") + 1:]
        else:
            continue
        argv = [t for t in argv if not re.fullmatch(r"\$\{\w+\[@\]\}", t)]  # empty arrays vanish
        commands.append([expand(t, env) for t in argv])
    return commands


def task_env(cfg: dict) -> dict[str, str]:
    """The envs a node exports: YAML values, with a dummy bucket for the required (null) ones."""
    return {k: ("s3://pgolf-test/x" if v is None else str(v)) for k, v in (cfg.get("envs") or {}).items()}


def registered_commands() -> set[tuple[str, ...]]:
    from pgolf.cli import build_parser

    parser = build_parser()
    found: set[tuple[str, ...]] = set()

    def walk(p, prefix):
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    found.add(prefix + (name,))
                    walk(child, prefix + (name,))

    walk(parser, ())
    return found


ALL_COMMANDS = [(p.name, block, argv) for p in YAMLS for block in ("setup", "run")
                for argv in pgolf_commands(load(p).get(block) or "", task_env(load(p)))]


RECORD_TASKS = ("record.yaml", "record-any.yaml")


def test_every_task_calls_pgolf():
    names = {name for name, _, _ in ALL_COMMANDS}
    assert names == {p.name for p in YAMLS}
    runs = {name for name, block, argv in ALL_COMMANDS if block == "run" and argv[:1] == ["run"]}
    assert runs == {"dev.yaml", "long.yaml"}  # development and resumable runs: the package
    shipped = {name for name, block, argv in ALL_COMMANDS if block == "run" and argv[:2] == ["results", "sync"]}
    assert shipped == set(RECORD_TASKS)  # records: the generated file (below)


@pytest.mark.parametrize("name", RECORD_TASKS)
def test_record_tasks_run_the_generated_file_pgolf_launch_ships(name):
    """`pgolf results sync -- torchrun --standalone --nproc_per_node=N ship/train_gpt.py`, where the
    path is the one `pgolf launch` writes and CODE_SHA256 is the env it fills."""
    cfg = load(SKY_DIR / name)
    assert lib.ships_code(cfg) and cfg["envs"][lib.CODE_ENV] is None  # required: a bare launch fails
    (argv,) = [a for n, b, a in ALL_COMMANDS if n == name and b == "run" and a[:2] == ["results", "sync"]]
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    assert command == ["torchrun", "--standalone", "--nproc_per_node=8", str(lib.SHIP_PATH)]
    check = f'bash sky/node.sh code {lib.SHIP_PATH} "${{{lib.CODE_ENV}}}"'
    for block in ("setup", "run"):  # setup fails before data is fetched; run again after `sky exec` resyncs
        assert check in [ln.strip() for ln in cfg[block].splitlines()], block


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_the_headers_pgolf_commands_parse_with_the_real_cli(path):
    lines = re.sub(r"\\\n#\s*", " ", path.read_text())  # join continued header lines
    commands = [ln.split("pgolf ", 1)[1] for ln in lines.splitlines()
                if ln.startswith("#") and re.search(r"(^#|:)\s+pgolf (launch|results)", ln)]
    assert commands or path.name not in RECORD_TASKS, f"{path.name}: the header shows no pgolf command"
    for command in commands:
        argv = shlex.split(command)
        assert callable(build_parser().parse_args(argv).func), command
        if argv[0] == "launch":
            assert argv[1] == f"sky/{path.name}"


@pytest.mark.parametrize("name, block, argv", ALL_COMMANDS,
                         ids=[f"{n}:{b}:{' '.join(a[:2])}" for n, b, a in ALL_COMMANDS])
def test_pgolf_command_parses_with_the_real_cli(name, block, argv):
    from pgolf.cli import build_parser

    known = registered_commands()
    depth = 2 if argv[:1] in (["data"], ["results"]) else 1
    if tuple(argv[:depth]) not in known:
        pytest.skip(f"`pgolf {' '.join(argv[:depth])}` is not registered yet; strict once it lands")
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_the_command_extractor_sees_continuations_and_drops_arrays():
    script = 'set -e\npgolf data fetch --variant "$V" \\\n  --out "$D" || echo no\n' \
             'torchrun --standalone -m pgolf.cli run --seed "${SEED}" "${resume[@]}"\n'
    env = {"V": "sp1024", "D": "", "SEED": "7"}
    assert pgolf_commands(script, env) == [["data", "fetch", "--variant", "sp1024", "--out", ""],
                                           ["run", "--seed", "7"]]
    assert expand("${DATA_URI:-hf}", {"DATA_URI": ""}) == "hf"
    assert expand("${DATA_URI:-hf}", {"DATA_URI": "s3://b"}) == "s3://b"


def test_a_wrong_flag_in_a_task_would_fail():
    from pgolf.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--seeed", "1"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash missing")
def test_yaml_envs_are_shell_safe_names():
    for path in YAMLS:
        for key in load(path).get("envs") or {}:
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{path.name}: {key}"
        assert os.sep not in load(path)["name"]


# --- sky/node.sh, with a fake nvidia-smi (the one edge we cannot have here: a GPU) ---------------

NODE_SH = SKY_DIR / "node.sh"


def fake_gpus(tmp_path: Path, names: list[str]) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    rows = "\n".join(names)
    if not names:  # what the real tool does on a machine without GPUs
        smi.write_text("#!/usr/bin/env bash\necho 'No devices were found'\nexit 6\n")
    else:
        smi.write_text(f"#!/usr/bin/env bash\nif [[ \"$*\" == *query-gpu=name,* ]]; then echo fake; "
                       f"elif [[ \"$*\" == *query-gpu=name* ]]; then printf '%s\\n' {shlex.quote(rows)}; fi\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
            "HOME": str(tmp_path)}


def node(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(NODE_SH), *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_node_sh_passes_shellcheck():
    proc = subprocess.run([str(SHELLCHECK), str(NODE_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_gpu_check_accepts_8_sxm_h100(tmp_path):
    proc = node(["gpus", "8", "sxm"], fake_gpus(tmp_path, ["NVIDIA H100 80GB HBM3"] * 8))
    assert proc.returncode == 0, proc.stderr
    assert "ok: 8 x NVIDIA H100 80GB HBM3 (sxm)" in proc.stdout


@pytest.mark.parametrize("names, why", [
    (["NVIDIA H100 PCIe"] * 8, "not H100 SXM"),
    (["NVIDIA H100 NVL"] * 8, "not H100 SXM"),
    (["NVIDIA H100 80GB HBM3"] * 7, "found 7 GPU(s)"),
    (["NVIDIA A100-SXM4-80GB"] * 8, "not an H100"),
    ([], "found 0 GPU(s)"),
])
def test_gpu_check_fails_fast_otherwise(tmp_path, names, why):
    proc = node(["gpus", "8", "sxm"], fake_gpus(tmp_path, names))
    assert proc.returncode != 0
    assert why in proc.stderr


def test_gpu_check_any_accepts_a_pcie_dev_card(tmp_path):
    proc = node(["gpus", "1", "any"], fake_gpus(tmp_path, ["NVIDIA H100 PCIe"]))
    assert proc.returncode == 0, proc.stderr


def test_phases_accumulate_into_json(tmp_path):
    env = fake_gpus(tmp_path, [])
    env["PGOLF_PHASES_FILE"] = str(tmp_path / "phases.json")
    import json
    import time

    start = int(time.time()) - 30
    assert node(["phase", "setup", str(start)], env).returncode == 0
    assert node(["phase", "setup", str(start)], env).returncode == 0
    assert node(["phase", "data", str(start)], env).returncode == 0
    phases = json.loads((tmp_path / "phases.json").read_text())
    assert 60 <= phases["setup"] <= 70 and 30 <= phases["data"] <= 35
    from pgolf.cloud.cost import read_phases_file

    assert read_phases_file(tmp_path / "phases.json") == phases


def test_node_sh_rejects_unknown_verbs(tmp_path):
    proc = node(["launch-rockets"], fake_gpus(tmp_path, []))
    assert proc.returncode != 0 and "usage" in proc.stderr


def test_node_refuses_a_missing_or_different_train_gpt(tmp_path):
    env = fake_gpus(tmp_path, [])
    f = tmp_path / "train_gpt.py"
    f.write_text("print('generated')\n")
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    ok = node(["code", str(f), sha], env)
    assert ok.returncode == 0 and f"{f.stat().st_size} B, sha256 {sha}" in ok.stdout
    for args, why in (([str(tmp_path / "nope.py"), sha], "is missing: pgolf launch generates it"),
                      ([str(f), ""], "CODE_SHA256 is empty"),
                      ([str(f), "0" * 64], f"has sha256 {sha}, not CODE_SHA256=" + "0" * 64)):
        proc = node(["code", *args], env)
        assert proc.returncode != 0 and why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --- the record run block, executed: the generated file under torchrun, 2 gloo ranks on CPU --------


@pytest.mark.slow
def test_record_run_block_runs_the_shipped_file_and_a_build_accepts_the_run(tmp_path, monkeypatch, offline_data):
    """What runs is what ships, end to end on CPU: `pgolf launch`'s generator writes ship/train_gpt.py,
    record.yaml's own `run` block (node.sh code check, `pgolf results sync -- torchrun ...`) runs it on
    2 gloo ranks into a file:// store, the run counts that file's bytes and records its sha256, and
    `pgolf submission build` of the pulled run ships the very same file without --allow-code-drift."""
    from pgolf.submission import build as buildmod

    work = tmp_path / "sky_workdir"  # what SkyPilot syncs: the checkout's sky/ and the generated file
    shutil.copytree(SKY_DIR, work / "sky")
    monkeypatch.chdir(work)
    data, store = Path(offline_data).resolve(), tmp_path / "store"
    overrides = {"PRESET": "debug", "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "tokenizer.model"),
                 "ITERATIONS": "3", "TRAIN_LOG_EVERY": "1", "EVAL_STRIDE": "64", "PASSTHROUGH_MAX_NUMEL": "1024",
                 "MICRO_BATCH_SEQS": "16", "DEVICE": "cpu", "RESULTS_URI": f"file://{store}"}
    shipped = lib.ship_code(work / "sky" / "record.yaml", overrides)
    assert shipped.path == lib.SHIP_PATH and (work / lib.SHIP_PATH).stat().st_size == shipped.nbytes

    cfg = load(SKY_DIR / "record.yaml")
    env = {k: "" if v is None else str(v) for k, v in cfg["envs"].items()}
    env.update(overrides, SEED="11", RUN_ID="rec-s11", CODE_SHA256=shipped.sha256, SKYPILOT_NUM_GPUS_PER_NODE="2", SKYPILOT_TASK_ID="sky-test_1",
               HOME=str(tmp_path / "home"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               OMP_NUM_THREADS="1", LC_ALL="C.UTF-8", SYNC_EVERY_SECONDS="5")
    proc = subprocess.run(["bash", "-c", cfg["run"]], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"sha256 {shipped.sha256} (runs here and ships in a submission)" in proc.stdout

    pulled = results.pull(f"file://{store}", tmp_path / "results", ["rec-s11"], progress=False)
    assert pulled.ok and pulled.statuses == {"rec-s11": "complete"}
    run = tmp_path / "results" / "rec-s11"  # the store holds generations; a pull gives the folder
    environment = json.loads((run / "environment.json").read_text())
    assert environment["code_sha256"] == shipped.sha256 and environment["world_size"] == 2
    assert environment["code_file"].endswith(str(lib.SHIP_PATH)) and environment["code_form"] == "compressed"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["code_bytes"] == shipped.nbytes and summary["steps"] == 3
    assert json.loads((run / "config.json").read_text())["run"]["results_uri"] == ""  # the wrapper syncs
    log = (run / "train.log").read_text()
    assert f"Code size: {shipped.nbytes} bytes (ship/train_gpt.py: the file this run executes" in log

    result = buildmod.build(["rec-s11"], out=tmp_path / "rec", name="e2e", github_id="octocat",
                            search=[tmp_path / "results"], allow_noncompliant=True)
    assert not result.submission["code_drift"]
    assert (result.out / "train_gpt.py").read_bytes() == (work / lib.SHIP_PATH).read_bytes()


@pytest.mark.parametrize("path", [p for p in YAMLS if "IMAGE" in (load(p).get("envs") or {})], ids=lambda p: p.name)
def test_image_envs_describe_the_yaml_image(path):
    """environment.json records IMAGE/IMAGE_DIGEST, so by default they must match image_id."""
    cfg = load(path)
    image = cfg["resources"]["image_id"].removeprefix("docker:")
    assert cfg["envs"]["IMAGE"] == image
    assert cfg["envs"]["IMAGE_DIGEST"] == image.split("@", 1)[1]


def test_install_fallback_pins_everything_but_torch(tmp_path):
    """The public-image path installs the lock's versions (minus torch/CUDA) with a fake pip."""
    env = fake_gpus(tmp_path, [])
    fake_py = tmp_path / "bin" / "python"
    log = tmp_path / "pip.log"
    # a python that has no deps, logs pip calls, and cannot import flash_attn / see a GPU
    fake_py.write_text(f"#!/usr/bin/env bash\nif [[ \"$1\" == -m && \"$2\" == pip ]]; then "
                       f"echo \"$*\" >> {log}; for a in \"$@\"; do [[ -f \"$a\" ]] && cat \"$a\" >> {log}; done; "
                       f"exit 0; fi\nif [[ \"$1\" == -c && \"$2\" == *'import torch'* && \"$2\" != *numpy* ]]; "
                       f"then exit 0; fi\nif [[ \"$1\" == -V ]]; then echo 'Python 3.11.9'; exit 0; fi\nexit 1\n")
    fake_py.chmod(0o755)
    env["PYTHON"] = str(fake_py)
    proc = node(["install", "--cpu"], env)
    assert proc.returncode != 0  # the final `import pgolf` check fails with this fake: fine
    pinned = [ln for ln in log.read_text().splitlines() if "==" in ln and " " not in ln]
    names = {ln.split("==")[0] for ln in pinned}
    assert "numpy" in names and "sentencepiece" in names and "boto3" in names
    assert not {n for n in names if n.startswith(("torch", "nvidia-", "triton", "setuptools"))}
    assert "install -q --no-deps --no-build-isolation -e ." in log.read_text()


# --- the C compiler torch.compile needs ----------------------------------------------------------

COMPILERS = {"gcc", "cc", "clang", "c++", "g++", "clang++", "apt-get"}


def no_compiler_path(tmp_path: Path) -> Path:
    """A bin folder linking every program on PATH except C compilers and apt-get: a machine like
    the public pytorch runtime image, minus the package manager."""
    bin_dir = tmp_path / "nocc"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = Path(folder) / name
            base = name.split("-")[-1] if name.startswith("x86_64-linux-gnu-") else name
            if base in COMPILERS or re.match(r"(gcc|g\+\+|cc|clang)(-\d+)?$", base) or (bin_dir / name).exists():
                continue
            if os.access(target, os.X_OK) and target.is_file():
                (bin_dir / name).symlink_to(target)
    return bin_dir


def test_install_without_a_c_compiler_fails_first_in_one_line(tmp_path):
    """The public image has no gcc: without one (and no apt-get to get it), `install` stops before it
    installs anything, with one line saying what is missing."""
    env = {**os.environ, "PATH": str(no_compiler_path(tmp_path)), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    env.pop("CC", None)
    proc = node(["install", "--require-fa3"], env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("node.sh: error: no C compiler (gcc, cc or clang)") and "install gcc" in proc.stderr
    assert "pip" not in proc.stdout + proc.stderr  # nothing was installed before the check


def test_public_image_path_installs_gcc_with_apt(tmp_path):
    """As root with apt-get and no compiler (the public pytorch runtime image), the compiler step apt-installs
    gcc + libc6-dev and then really builds a C file against Python.h with it."""
    bin_dir = no_compiler_path(tmp_path)
    log = tmp_path / "apt.log"
    real_gcc = shutil.which("gcc")
    assert real_gcc, "the test machine needs gcc to stand in for the one apt-get installs"
    (bin_dir / "id").unlink(missing_ok=True)
    (bin_dir / "id").write_text("#!/usr/bin/env bash\necho 0\n")  # root, as SkyPilot runs setup there
    (bin_dir / "apt-get").write_text(
        f"#!/usr/bin/env bash\necho \"$*\" >> {log}\n"
        f"if [[ \"$1\" == install ]]; then printf '#!/usr/bin/env bash\\nexec {real_gcc} \"$@\"\\n' > {bin_dir}/gcc; "
        f"chmod +x {bin_dir}/gcc; fi\n")
    for name in ("id", "apt-get"):
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    env.pop("CC", None)
    proc = node(["compiler"], env)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("update") and "install" in calls[1] and {"gcc", "libc6-dev"} <= set(calls[1].split())
    assert "installing gcc" in proc.stdout and "node.sh: ok: C compiler gcc, Python.h in" in proc.stdout


def test_yaml_setups_install_through_node_sh():
    """Every GPU task installs with `node.sh install` (which checks the compiler); only the CPU-only data
    task skips it with --cpu."""
    for path in YAMLS:
        setup = load(path).get("setup") or ""
        line = next(ln.strip() for ln in setup.splitlines() if "node.sh install" in ln)
        assert ("--cpu" in line) == (path.name == "data.yaml"), (path.name, line)
