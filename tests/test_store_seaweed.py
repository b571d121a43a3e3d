"""LocalSeaweed and `pgolf store up|env|status|down`: a detached, authenticated, telemetry-free server."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.errors import StoreError
from pgolf.store.seaweed import GRPC_OFFSET, LocalSeaweed, _port_free, pick_ports
from pgolf.store import S3Options, open_store
from store_fixtures import seaweed_server


def test_credentials_created_private_and_reused(tmp_path: Path) -> None:
    server = LocalSeaweed(tmp_path / "s")
    key, secret = server.credentials()
    mode = stat.S_IMODE(os.stat(server.credentials_file).st_mode)
    assert mode == 0o600 and len(secret) >= 30 and key.startswith("pgolf")
    assert LocalSeaweed(tmp_path / "s").credentials() == (key, secret)
    assert LocalSeaweed(tmp_path / "other").credentials() != (key, secret)
    server.credentials_file.write_text("nonsense\n")
    with pytest.raises(StoreError, match="delete it"):
        server.credentials()


def test_pick_ports_have_free_grpc_partners() -> None:
    ports = pick_ports("127.0.0.1")
    assert sorted(ports) == sorted(["s3", "master", "volume", "filer", "admin"])
    used = list(ports.values()) + [p + GRPC_OFFSET for p in ports.values()]
    assert len(set(used)) == 10 and all(_port_free("127.0.0.1", p) for p in used)


def test_running_server_flags_and_auth() -> None:
    server = seaweed_server()
    st = server.state()
    argv = Path(f"/proc/{st.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-master.telemetry=false" in argv and b"-webdav=false" in argv
    assert b"-ip.bind=127.0.0.1" in argv and b"-s3.port.iceberg=0" in argv
    # Signatures are enforced: the right pair works, an unsigned-looking wrong pair does not.
    good = server.options(max_attempts=1)
    assert open_store(f"s3://{server.bucket}", good).head_bucket()  # type: ignore[attr-defined]
    bad = S3Options(endpoint_url=good.endpoint_url, access_key="x", secret_key="y",
                    max_attempts=1)
    with pytest.raises(StoreError, match="rejected the credentials"):
        open_store(f"s3://{server.bucket}/p", bad).put_bytes("k", b"v")


def pgolf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point, in a child process (so `store up` must detach)."""
    return subprocess.run([str(Path(sys.executable).parent / "pgolf"), *args],
                          capture_output=True, text=True, timeout=90,
                          env={**os.environ, **(env or {})})


def test_cli_store_up_env_down(tmp_path: Path) -> None:
    root = tmp_path / ".store"
    up = pgolf("store", "up", "--dir", str(root))
    try:
        assert up.returncode == 0, up.stderr
        assert "local store up: S3 at http://127.0.0.1:" in up.stdout
        state = json.loads((root / "server.json").read_text())
        os.kill(state["pid"], 0)  # still running after `store up` exited
        env_out = pgolf("store", "env", "--dir", str(root))
        assert env_out.returncode == 0
        exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                        for line in env_out.stdout.splitlines())
        assert exported["RESULTS_URI"] == "s3://pgolf-results/runs"
        assert exported["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{state['ports']['s3']}"
        # A fresh process that only has those variables reaches the bucket through boto3's chain.
        probe = subprocess.run(
            [sys.executable, "-c", "from pgolf.store import open_store; "
             "s = open_store('s3://pgolf-results/runs'); s.put_bytes('a', b'1'); "
             "print(s.get_bytes('a').decode())"],
            capture_output=True, text=True, timeout=60,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **exported})
        assert probe.stdout.strip() == "1", probe.stderr
        assert pgolf("store", "status", "--dir", str(root)).returncode == 0
    finally:
        down = pgolf("store", "down", "--dir", str(root))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (root / "server.json").exists()
    assert pgolf("store", "status", "--dir", str(root)).returncode == 1
    env_down = pgolf("store", "env", "--dir", str(root))
    assert env_down.returncode == 2 and env_down.stderr.startswith("error: the local store")
    # down then up: the same ports, so the exported AWS_ENDPOINT_URL_S3 still points at it
    again = pgolf("store", "up", "--dir", str(root))
    try:
        assert again.returncode == 0, again.stderr
        assert json.loads((root / "server.json").read_text())["ports"] == state["ports"]
        assert f"S3 at http://127.0.0.1:{state['ports']['s3']} " in again.stdout
    finally:
        assert pgolf("store", "down", "--dir", str(root)).returncode == 0
