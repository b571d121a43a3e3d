"""Finished run folders as the submission sees them: read-only, torch-free.

A run ID names a folder under a results dir (as pulled by `pgolf results pull`) or under runs/; a
path to a run folder works too. Only complete runs qualify: config.json and summary.json with a
val_bpb. Everything else is read from the files the pipeline wrote, never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pgolf import config as cfgmod
from pgolf.errors import ArtifactError, ConfigError, PgolfError

# Fields that may differ between the runs of one submission: the seed, the run's name, and where
# results and data were synced. Everything else (data path included) must be identical.
PER_RUN_FIELDS = ("seed", "run_id", "runs_dir", "results_uri", "sync_every_seconds", "sync_deadline_seconds",
                  "data_uri")


class RunError(PgolfError):
    """A run folder that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    path: Path
    config: dict[str, Any]  # config.json
    summary: dict[str, Any]  # summary.json
    environment: dict[str, Any]  # environment.json ({} if absent)
    compliance: dict[str, Any]  # compliance.json ({} if absent)
    model_bytes: int  # artifact.pgz as shipped

    @property
    def seed(self) -> int:
        return int(self.config.get("train", {}).get("seed", self.summary.get("seed")))

    @property
    def val_bpb(self) -> float:
        return float(self.summary["val_bpb"])

    @property
    def val_loss(self) -> float:
        return float(self.summary["val_loss"])

    @property
    def bytes_per_token(self) -> float:
        """Validation bytes per scored token: from the eval's counts, else from loss / bpb."""
        targets, nbytes = self.summary.get("targets"), self.summary.get("bytes")
        if targets and nbytes:
            return float(nbytes) / float(targets)
        return self.val_loss / (math.log(2.0) * self.val_bpb)

    @property
    def train_log(self) -> Path:
        return self.path / "train.log"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


CHECKED_FILES = ("config.json", "summary.json", "train.log", "artifact.pgz")


def check_manifest(path: Path) -> None:
    """Where manifest.json exists, the files a submission reads must still match it (sha256)."""
    manifest = _read_json(path / "manifest.json")
    entries = {e.get("path"): e for e in manifest.get("files", []) if isinstance(e, dict)}
    for name in CHECKED_FILES:
        entry, local = entries.get(name), path / name
        if entry is None or not local.is_file():
            continue
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        if digest != entry.get("sha256"):
            raise RunError(f"{path.name}/{name} differs from manifest.json (sha256 {digest[:12]} vs "
                           f"{str(entry.get('sha256'))[:12]}); the folder changed after the run",
                           hint="pull the run again with `pgolf results pull`")


def find_run(run_id: str, search: Sequence[Path]) -> Path:
    """The folder of `run_id`: a path to a run folder, or a name under one of `search`."""
    direct = Path(run_id)
    if (direct / "config.json").is_file() or (direct / "summary.json").is_file():
        return direct
    for base in search:
        candidate = Path(base) / run_id
        if candidate.is_dir():
            return candidate
    where = ", ".join(str(b) for b in search) or "(no folders given)"
    raise RunError(f"run {run_id!r} not found under {where}",
                   hint="pull it with `pgolf results pull RUN_ID` or pass --results/--runs")


def load_run(run_id: str, search: Sequence[Path]) -> RunRecord:
    path = find_run(run_id, search)
    check_manifest(path)
    config = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json")
    if not config:
        raise RunError(f"{path} has no config.json: not a run folder")
    if not summary or summary.get("val_bpb") is None or summary.get("val_loss") is None:
        raise RunError(f"{path} has no summary.json with val_bpb and val_loss: an unfinished run",
                       hint="pull it again once the run ends (manifest.json marks a complete run)")
    artifact = path / "artifact.pgz"
    recorded = summary.get("model_bytes")
    if artifact.is_file():
        model_bytes = artifact.stat().st_size
        if recorded is not None and int(recorded) != model_bytes:
            raise ArtifactError(f"{path.name}: artifact.pgz is {model_bytes:,} B but summary.json says "
                                f"{int(recorded):,} B; stale metadata, rerun `pgolf quantize` on the folder")
    elif recorded is not None:
        model_bytes = int(recorded)
    else:
        raise RunError(f"{path} has neither artifact.pgz nor model_bytes in summary.json")
    return RunRecord(run_id=path.name, path=path, config=config, summary=summary,
                     environment=_read_json(path / "environment.json"),
                     compliance=_read_json(path / "compliance.json"), model_bytes=model_bytes)


def load_runs(run_ids: Sequence[str], search: Sequence[Path]) -> list[RunRecord]:
    if not run_ids:
        raise RunError("no run IDs given")
    runs = [load_run(r, search) for r in run_ids]
    seen: dict[int, str] = {}
    for run in runs:
        if run.seed in seen:
            raise RunError(f"runs {seen[run.seed]} and {run.run_id} both have SEED={run.seed}; "
                           "a submission's runs must differ in seed")
        seen[run.seed] = run.run_id
    return runs


def shared_config(runs: Sequence[RunRecord]) -> cfgmod.Config:
    """The one config all runs share apart from PER_RUN_FIELDS (taken from the first run)."""
    configs = []
    for run in runs:
        try:
            configs.append(cfgmod.from_dict(run.config))
        except ConfigError as exc:
            raise ConfigError(f"{run.run_id}/config.json: {exc}") from None
    first, first_flat = configs[0], configs[0].flat()
    for run, cfg in zip(runs[1:], configs[1:]):
        if cfg.preset != first.preset:
            raise ConfigError(f"mixed configs: PRESET={first.preset} ({runs[0].run_id}) vs "
                              f"{cfg.preset} ({run.run_id}); one submission is one config")
        for name, value in cfg.flat().items():
            if name not in PER_RUN_FIELDS and value != first_flat[name]:
                raise ConfigError(f"mixed configs: {name.upper()}={first_flat[name]!r} ({runs[0].run_id}) "
                                  f"vs {value!r} ({run.run_id}); only SEED/RUN_ID may differ")
    return first
