"""Facts about a run that no stage owns: the environment fingerprint (shared ground).

environment.json answers "what exactly ran this?": GPU model (and whether it is SXM), driver, CUDA,
torch, triton, FlashAttention 3, NCCL, Python, CPU, git commit, the train_gpt.py that ran (path,
bytes, sha256), image tag/digest, dataset id, shard count and the data manifest's sha256.

This module imports no room above the shared ground: the facts that need one (the attention backend
from pgolf.model, the code facts and source digest from the bundler) are handed to
`collect_environment` by the pipeline (pgolf.run), which may import them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from pgolf import __version__
from pgolf.config import Config

CHALLENGE_TRAIN_SECONDS = 600.0  # training, including GPTQ calibration on training data
CHALLENGE_EVAL_SECONDS = 600.0  # evaluation, including loading and warm-up


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def bundle_info() -> dict[str, Any]:
    """`pgolf.__bundle__` when running from a generated single-file submission, else {}."""
    import pgolf

    return dict(getattr(pgolf, "__bundle__", None) or {})


def git_commit(root: Path | None = None) -> str:
    """HEAD of the checkout holding the package, "-dirty" if src/pgolf has local changes; the
    commit the single file was generated from when running from one; "" outside git."""
    if bundle_info():
        return bundle_info().get("commit", "")
    root = root or Path(__file__).resolve().parent
    head = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    if not head:
        return ""
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--", "."])
    return head + ("-dirty" if dirty else "")


def bundled_code_facts() -> dict[str, Any]:
    """What a run from a generated train_gpt.py (what `pgolf launch` runs) counts as code bytes: that
    file's own bytes and sha256, the file a submission ships; {} when running from the package (then
    the bundler sizes the file a submission would ship: `pgolf.quantize.report.code_facts`)."""
    info = bundle_info()
    if not info:
        return {}
    path = Path(info["file"])
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    shown = os.path.relpath(path)
    shown = str(path) if shown.startswith("..") else shown
    return {"code_form": info.get("form"), "code_file": str(path), "code_bytes": len(data), "code_sha256": sha,
            "code_bytes_source": f"{shown}: the file this run executes, which a submission ships; "
                                 f"{info.get('form')} form, sha256 {sha[:12]}"}


def gpu_facts() -> dict[str, Any]:
    """GPU name/driver from nvidia-smi; SXM is told apart from PCIe/NVL by the board name."""
    rows = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    names = [r.split(",")[0].strip() for r in rows.splitlines() if r.strip()]
    driver = rows.splitlines()[0].split(",")[1].strip() if names else None
    # On H100 boards: "H100 80GB HBM3" = SXM5, "H100 PCIe", "H100 NVL"; nvidia-smi has no form-factor field.
    sxm = [("HBM3" in n and "PCIe" not in n and "NVL" not in n) or "SXM" in n for n in names]
    return {"gpu_names": names, "gpu_count": len(names), "driver": driver,
            "gpu_is_sxm": bool(names) and all(sxm)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def data_facts(cfg: Config) -> dict[str, Any]:
    data_dir = Path(cfg.data.data_path)
    manifest = data_dir / "manifest.json"
    return {
        "dataset_id": cfg.data.dataset_id,
        "data_path": str(data_dir),
        "train_shards": len(list(data_dir.glob("fineweb_train_*.bin"))),
        "val_shards": len([p for p in data_dir.glob("fineweb_val_*.bin") if "_bytes_" not in p.name]),
        "data_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None,
    }


def torch_facts(device: Any) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "triton": _version("triton"), "device": str(device)}
    facts["flash_attn_3"] = _version("flash_attn_3") or _version("flash-attn-3")
    if torch.cuda.is_available():
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        facts["cuda_device_name"] = torch.cuda.get_device_name(0)
    return facts


def collect_environment(cfg: Config, device: Any, world_size: int, *, source_sha256: str | None,
                        code: Mapping[str, Any], attention_backend: str) -> dict[str, Any]:
    """environment.json. The caller (pgolf.run) supplies what only a room above this one knows: the
    source digest and code facts (the bundler) and the attention backend in use (the model)."""
    return {
        "pgolf": __version__,
        "git_commit": git_commit(),
        "source_sha256": source_sha256,
        **{k: v for k, v in code.items() if k != "code_bytes_source"},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "world_size": world_size,
        "image": cfg.run.image or None,
        "image_digest": cfg.run.image_digest or None,
        "attention_backend": attention_backend,
        **gpu_facts(),
        **torch_facts(device),
        **data_facts(cfg),
    }

