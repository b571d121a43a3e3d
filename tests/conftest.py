"""Shared fixtures: CPU determinism and the offline English corpus (built once, cached in data/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

try:  # torch-free test modules must not pay for it
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as pgolf.dist does on CPU: subnormals are ~10x slower
except ImportError:  # pragma: no cover
    torch = None


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def offline_data() -> Path:
    """The offline corpus dataset (sp BPE 1024 tokenizer + train/val shards), cached in data/offline."""
    from pgolf.data.offline import prepare_offline

    return prepare_offline(REPO / "data" / "offline")


@pytest.fixture(scope="session")
def offline_caseops_data() -> Path:
    """The offline corpus in CaseOps form (1024-piece operator-reserving tokenizer + val byte sidecar),
    cached in data/offline-caseops."""
    from pgolf.data.offline import prepare_offline

    return prepare_offline(REPO / "data" / "offline-caseops", cache_dir=REPO / "data" / "cache", caseops=True)


@pytest.fixture(scope="session")
def sp1024_model() -> Path:
    """The challenge's real sp1024 tokenizer when it is present beside the checkout (never committed)."""
    path = REPO.parent / "shared" / "data" / "fineweb_1024_bpe.model"
    if not path.exists():
        pytest.skip("the challenge tokenizer is absent (../shared/data/fineweb_1024_bpe.model)")
    return path


@pytest.fixture(scope="session")
def sky_home(tmp_path_factory) -> Path:
    """A throwaway HOME for SkyPilot: `import sky` writes ~/.sky (cloud-launch doc §2.1)."""
    return tmp_path_factory.mktemp("sky-home")


@pytest.fixture(scope="session")
def pipeline_data(offline_data: Path, tmp_path_factory) -> Path:
    """The offline corpus cut down (40K train, 6K val tokens) so a whole `pgolf run` takes seconds."""
    import numpy as np

    from pgolf.data.shards import read_shard, write_shard

    out = tmp_path_factory.mktemp("pipeline_data")
    train = np.asarray(read_shard(offline_data / "fineweb_train_000000.bin"))[:40_000]
    val = np.asarray(read_shard(offline_data / "fineweb_val_000000.bin"))[:6_000]
    write_shard(out / "fineweb_train_000000.bin", train)
    write_shard(out / "fineweb_val_000000.bin", val)
    (out / "tokenizer.model").write_bytes((offline_data / "tokenizer.model").read_bytes())
    return out
