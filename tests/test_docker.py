"""The image, checked without a Docker daemon (there is none in CI): hadolint, dockerfile-parse
assertions on every pin, the hash-locked requirements, the FA3 pin mechanism (fetch-fa3.sh run for
real against file:// URLs), the self-test script, and the .dockerignore/.skyignore agreement.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
BIN = Path(sys.executable).parent
DIGEST_REF = re.compile(r"^[\w.\-/]+:[\w.\-]+@sha256:[0-9a-f]{64}$")

sys.path.insert(0, str(DOCKER))  # docker/make_lock.py and docker/pin_fa3.py are plain scripts
import make_lock  # noqa: E402
import pin_fa3  # noqa: E402


@pytest.fixture(scope="module")
def dfp() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))


def instructions(dfp: DockerfileParser, name: str) -> list[str]:
    return [s["value"] for s in dfp.structure if s["instruction"] == name]


def test_hadolint_passes():
    proc = subprocess.run([str(BIN / "hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUNN echo hi\nRUN cd /tmp && make\n")
    proc = subprocess.run([str(BIN / "hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0


def test_multistage_with_every_base_pinned_by_digest(dfp):
    assert dfp.is_multistage
    froms = instructions(dfp, "FROM")
    assert len(froms) == 2
    # FROM ${ARG} AS stage: resolve each ARG's default and check it is name:tag@sha256:<64 hex>
    defaults = dict(re.match(r"(\w+)=(.*)", v).groups() for v in instructions(dfp, "ARG") if "=" in v)
    for value in froms:
        ref = value.split()[0]
        ref = defaults.get(ref.strip("${}"), ref)
        assert DIGEST_REF.match(ref), f"base {ref} is not pinned by digest"
        assert ":latest" not in ref
    assert dfp.baseimage.startswith("nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@sha256:")


def test_torch_cuda_and_python_deps_are_pinned(dfp):
    runs = " ".join(instructions(dfp, "RUN"))
    assert "pip install --require-hashes --no-deps -r /tmp/requirements.lock" in runs
    assert not re.search(r"pip install (?!--require-hashes|--no-deps)[a-z]", runs), "unpinned pip install"
    assert dfp.labels["pgolf.torch"] == "2.9.1" and dfp.labels["pgolf.cuda"] == "12.8.1"
    assert "org.opencontainers.image.revision" in dfp.labels


def test_fa3_wheel_is_verified_by_sha256(dfp):
    args = instructions(dfp, "ARG")
    assert "FA3_WHEEL_URL=" in args and "FA3_WHEEL_SHA256=" in args  # filled from docker/fa3.lock
    runs = " ".join(instructions(dfp, "RUN"))
    assert "fetch-fa3.sh" in runs and "--allow-unpinned" not in runs  # the build never goes unpinned


def test_runtime_has_what_skypilot_needs_and_ends_with_a_self_test(dfp):
    runs = instructions(dfp, "RUN")
    apt = next(r for r in runs if "apt-get install" in r and "rsync" in r)
    for pkg in ("rsync", "openssh-server", "curl", "python3", "lrzip"):
        assert re.search(rf"\b{pkg}\b", apt), pkg
    for pkg in ("gcc", "libc6-dev", "python3-dev"):  # torch.compile builds C against Python.h at run time
        assert re.search(rf"(^|\s){re.escape(pkg)}(\s|$)", apt), pkg
    assert instructions(dfp, "USER")[-1] == "root"
    assert instructions(dfp, "ENTRYPOINT") == ["[]"]
    assert json.loads(dfp.cmd) == ["bash"] if dfp.cmd.startswith("[") else dfp.cmd == "bash"
    last_run = runs[-1]
    assert "selftest.py" in last_run and "--torch 2.9.1" in last_run and "--cuda-version 12.8" in last_run
    order = [s["instruction"] for s in dfp.structure]
    assert order.index("COPY") < len(order) - 1 - order[::-1].index("RUN")  # self-test after the venv copy
    assert dfp.envs["VIRTUAL_ENV"] == "/opt/venv"


# --- the lock file -------------------------------------------------------------------------------


def lock_entries() -> dict[str, tuple[str, str]]:
    text = (DOCKER / "requirements.lock").read_text().replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([a-z0-9.\-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line.strip())
            assert match, f"not name==version --hash=sha256:<64 hex>: {line!r}"
            entries[match.group(1)] = (match.group(2), match.group(3))
    return entries


def test_lock_pins_every_top_level_requirement_with_a_hash():
    entries = lock_entries()
    for line in (DOCKER / "requirements.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            assert entries[name.lower()][0] == version, name
    assert entries["torch"][0] == "2.9.1"
    assert entries["nvidia-cuda-runtime-cu12"][0].startswith("12.8.")  # torch 2.9.1 on PyPI = cu128
    assert entries["typing-extensions"][0] == "4.15.0"


def test_make_lock_renders_a_pip_report():
    report = {"install": [
        {"metadata": {"name": "Zeta_Pkg", "version": "1.0"},
         "download_info": {"archive_info": {"hashes": {"sha256": "a" * 64}}}},
        {"metadata": {"name": "alpha", "version": "2.0"},
         "download_info": {"archive_info": {"hashes": {"sha256": "b" * 64}}}},
    ]}
    assert make_lock.lock_lines(report) == [f"alpha==2.0 \\\n    --hash=sha256:{'b' * 64}",
                                            f"zeta-pkg==1.0 \\\n    --hash=sha256:{'a' * 64}"]


# --- FA3 pin ------------------------------------------------------------------------------------


def test_fa3_lock_is_either_pinned_or_a_marked_placeholder():
    values = pin_fa3.read_lock(DOCKER / "fa3.lock")
    assert values["FA3_INDEX"].endswith("/cu128_torch291/")
    if values["FA3_WHEEL_SHA256"]:
        assert re.fullmatch(r"[0-9a-f]{64}", values["FA3_WHEEL_SHA256"])
        assert values["FA3_WHEEL_URL"].startswith("https://") and values["FA3_WHEEL_URL"].endswith(".whl")
    else:
        assert "UNPINNED PLACEHOLDER" in (DOCKER / "fa3.lock").read_text()
        assert values["FA3_WHEEL_URL"] == ""


def test_write_pin_replaces_only_the_pin_lines(tmp_path):
    lock = tmp_path / "fa3.lock"
    shutil.copy(DOCKER / "fa3.lock", lock)
    pin_fa3.write_pin(lock, "https://example.org/flash_attn_3-3.0.0-cp39-abi3-linux_x86_64.whl", "c" * 64)
    values = pin_fa3.read_lock(lock)
    assert values["FA3_WHEEL_SHA256"] == "c" * 64 and values["FA3_INDEX"].endswith("cu128_torch291/")
    assert lock.read_text().count("#") == (DOCKER / "fa3.lock").read_text().count("#")
    with pytest.raises(ValueError):
        pin_fa3.write_pin(lock, "https://x/y.whl", "not-a-digest")


def fetch_fa3(dest: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DOCKER / "fetch-fa3.sh"), str(dest), *extra],
                          capture_output=True, text=True, env={**os.environ, **env})


def test_fetch_fa3_verifies_the_sha256(tmp_path):
    wheel = tmp_path / "src" / "flash_attn_3-3.0.0+cu128torch2.9.1-cp39-abi3-linux_x86_64.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"not really a wheel, but bytes with a digest")
    good = hashlib.sha256(wheel.read_bytes()).hexdigest()
    url = "file://" + str(wheel).replace("+", "%2B")  # indexes serve the '+' quoted
    ok = fetch_fa3(tmp_path / "out", {"FA3_WHEEL_URL": url, "FA3_WHEEL_SHA256": good})
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / wheel.name).read_bytes() == wheel.read_bytes()  # name unquoted for pip
    bad = fetch_fa3(tmp_path / "bad", {"FA3_WHEEL_URL": url, "FA3_WHEEL_SHA256": "0" * 64})
    assert bad.returncode != 0 and "sha256 mismatch" in bad.stderr


def test_fetch_fa3_refuses_to_build_unpinned(tmp_path):
    lock = pin_fa3.read_lock(DOCKER / "fa3.lock")
    if lock["FA3_WHEEL_SHA256"]:
        pytest.skip("fa3.lock is pinned; the unpinned path cannot be reached from the repo's lock")
    proc = fetch_fa3(tmp_path / "out", {"FA3_WHEEL_URL": "", "FA3_WHEEL_SHA256": ""})
    assert proc.returncode != 0 and "make fa3-pin" in proc.stderr


def test_scripts_pass_shellcheck():
    proc = subprocess.run([str(BIN / "shellcheck"), str(DOCKER / "fetch-fa3.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# --- self-test ----------------------------------------------------------------------------------


def test_selftest_runs_here_and_fails_loudly_without_fa3():
    here = subprocess.run([sys.executable, str(DOCKER / "selftest.py"), "--no-fa3"], capture_output=True, text=True)
    assert here.returncode == 0, here.stderr
    assert "selftest: ok" in here.stdout
    strict = subprocess.run([sys.executable, str(DOCKER / "selftest.py"), "--torch", "2.9.1", "--cuda-version", "12.8"],
                            capture_output=True, text=True)
    assert strict.returncode == 1  # this CPU venv has torch 2.13+cpu and no FA3: every check says so
    assert "flash_attn_interface" in strict.stderr and "not the pinned 2.9.1" in strict.stderr


@pytest.mark.slow
def test_selftest_cpu_compiles_the_training_step():
    """The CI half of `selftest.py --cuda`: torch.compile (inductor, fullgraph) of the training step and of
    Newton-Schulz on the CPU, with one graph for the step and one per matrix shape."""
    proc = subprocess.run([sys.executable, str(DOCKER / "selftest.py"), "--cpu", "--preset", "debug"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "C toolchain ok" in proc.stdout
    assert re.search(r"torch.compile ok on cpu: debug stack .* train_step 1 graph, newton_schulz 6 graphs", proc.stdout)


def test_selftest_fails_in_one_line_without_a_c_compiler(tmp_path):
    """No compiler on PATH (the public runtime image): the self-test says so before compiling anything."""
    env = {**os.environ, "PATH": str(tmp_path), "CC": ""}  # an empty PATH: no gcc, cc or clang
    proc = subprocess.run([sys.executable, str(DOCKER / "selftest.py"), "--cpu"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["selftest: FAIL: no C compiler (gcc, cc or clang) on PATH: "
                                                "torch.compile needs one; install gcc"]


# --- ignore files ---------------------------------------------------------------------------------


def patterns(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.add(line.strip("/").removeprefix("**/"))
    return out


def test_dockerignore_and_skyignore_agree():
    docker, sky = patterns(REPO / ".dockerignore"), patterns(REPO / ".skyignore")
    assert docker - sky == {".git"}  # the image gets the commit as a label; the node needs .git
    assert sky - docker == set()
    for must in ("data", "runs", "results", ".venv", "__pycache__", "*.pt", "*.bin"):
        assert must in docker, must


def test_skyignore_anchors_data_so_the_data_package_still_syncs():
    lines = [ln.strip() for ln in (REPO / ".skyignore").read_text().splitlines()]
    assert "/data" in lines and "data" not in lines and "data/" not in lines  # rsync: unanchored = any depth
    assert (REPO / "src" / "pgolf" / "data").is_dir()


def test_docker_readme_says_how_the_image_is_checked():
    text = (DOCKER / "README.md").read_text()
    for word in ("hadolint", "dockerfile-parse", "daemon", "make image", "fa3-pin", "sha256"):
        assert word in text, word
