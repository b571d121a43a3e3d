"""What a run cost: a small pinned price table times the measured phase durations.

The table holds on-demand $/hour for one 8 x H100 SXM node, one row per place we launch. Every
number names where it came from and when it was read, because GPU prices move monthly and a
figure without a source is worse than none. Clouds we could not source are left out on purpose;
`estimate_cost` then returns `usd: None` with a note rather than a guess, and a caller that knows
its own price can pass `usd_per_hour`.

Phases are whatever the run measured, in seconds (`provision`, `setup`, `data`, `train`, `eval`,
`sync`, ...). The machine bills from boot to teardown, so the estimate is the sum of all phases
times the hourly price; per-phase dollars are reported too, so a run that spent more on data
staging than on training shows it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from pgolf.errors import ConfigError

# The phases a cloud run measures, in the order they happen. Others are accepted and summed too.
PHASES = ("provision", "setup", "data", "train", "eval", "sync")


@dataclass(frozen=True)
class Price:
    usd_per_hour: float  # one node of 8 x H100 SXM 80GB, on demand
    instance: str  # the cloud's name for that node
    source: str  # where the number was read
    as_of: str  # when it was read (prices move; re-check before quoting)


# Pinned 2026-11-25. Re-read before publishing dollar figures.
PRICES: dict[str, Price] = {
    # openai/parameter-golf issue #82 quotes a "$21.52/h" 8xH100 SXM pod (= $2.69/GPU-h) and the
    # challenge README says ~$20/h; recorded in shared/docs/cloud-launch.md section 1.
    "runpod": Price(21.52, "8x H100-SXM (secure cloud)", "openai/parameter-golf #82 and README",
                    "2026-11-25"),
    # skypilot-org/skypilot-catalog catalogs/v8/lambda/vms.csv, row gpu_8x_h100_sxm5: Price 31.92
    # in every region (the same catalog SkyPilot's optimizer prices launches with).
    "lambda": Price(31.92, "gpu_8x_h100_sxm5", "skypilot-catalog v8 lambda/vms.csv", "2026-11-25"),
    # AWS p5.48xlarge and GCP a3-highgpu-8g are left out: the sources we could read disagree
    # (AWS: $98.32/h list before the June 2025 cut, several lower post-cut figures) and we could not
    # check the SkyPilot catalog rows. Pass usd_per_hour (`--usd-per-hour`) for those clouds.
}


@dataclass(frozen=True)
class CostEstimate:
    cloud: str
    usd: float | None  # None when no price is known for the cloud
    usd_per_hour: float | None
    seconds: float
    phases_usd: dict[str, float]
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def _check_phases(phases: Mapping[str, float]) -> dict[str, float]:
    clean: dict[str, float] = {}
    for name, seconds in phases.items():
        value = float(seconds)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"phase {name!r} lasted {seconds!r} s; durations must be finite and >= 0")
        clean[name] = value
    return clean


def estimate_cost(
    phases: Mapping[str, float], cloud: str, usd_per_hour: float | None = None
) -> dict:
    """Dollars for one run: sum(phase seconds) / 3600 x the cloud's pinned $/h.

    Returns a plain dict (for summary.json): cloud, usd, usd_per_hour, seconds, phases_usd, source.
    An unknown cloud without `usd_per_hour` gives usd=None and says so in `source`.
    """
    seconds_by_phase = _check_phases(phases)
    key = cloud.lower().strip()
    if usd_per_hour is not None:
        if usd_per_hour < 0 or not math.isfinite(usd_per_hour):
            raise ConfigError(f"usd_per_hour={usd_per_hour!r} must be a finite price >= 0")
        rate, source = float(usd_per_hour), "given by the caller"
    elif key in PRICES:
        price = PRICES[key]
        rate, source = price.usd_per_hour, f"{price.source} ({price.as_of})"
    else:
        known = ", ".join(sorted(PRICES))
        return CostEstimate(key, None, None, sum(seconds_by_phase.values()), {},
                            f"no pinned price for {key!r} (known: {known}); pass usd_per_hour").to_dict()
    phases_usd = {name: round(s / 3600.0 * rate, 4) for name, s in seconds_by_phase.items()}
    total_seconds = sum(seconds_by_phase.values())
    return CostEstimate(key, round(total_seconds / 3600.0 * rate, 2), rate, total_seconds,
                        phases_usd, source).to_dict()


def read_phases_file(path: str | Path) -> dict[str, float]:
    """Phase seconds recorded on the node by `sky/node.sh phase` (JSON object name -> seconds).

    A missing file gives {} (a local run has no provision/setup phases); a malformed one fails.
    """
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is not valid JSON ({exc.msg}); delete it or rerun setup") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a JSON object of phase -> seconds")
    return _check_phases(data)


def cloud_from_cluster_info(cluster_info: str | None) -> str | None:
    """The cloud name from SkyPilot's SKYPILOT_CLUSTER_INFO JSON (`{"cloud": "RunPod", ...}`)."""
    if not cluster_info:
        return None
    try:
        info = json.loads(cluster_info)
    except json.JSONDecodeError:
        return None
    cloud = info.get("cloud") if isinstance(info, dict) else None
    return str(cloud).lower() if cloud else None


def run_cost(
    measured: Mapping[str, float],
    phases_file: str | Path | None = None,
    cluster_info: str | None = None,
    usd_per_hour: float | None = None,
) -> dict:
    """The estimate the pipeline records in summary.json (`cost_usd` = the result's `usd`).

    `measured` holds what the run timed itself (train, eval, sync, ...); the node's setup and data
    phases come from `phases_file` (PGOLF_PHASES_FILE, written by sky/node.sh); the cloud comes from
    SKYPILOT_CLUSTER_INFO. A local run has neither and gets usd=None. Provisioning happens before
    the node exists, so it is not in the estimate (the launcher's log shows it).
    """
    phases = {**(read_phases_file(phases_file) if phases_file else {}), **measured}
    cloud = cloud_from_cluster_info(cluster_info) or "local"
    return estimate_cost(phases, cloud, usd_per_hour)


def format_usd(usd: float | None) -> str:
    """`$3.59` for tables (`pgolf results ls`), `?` when the price is unknown."""
    return "?" if usd is None else f"${usd:,.2f}"
