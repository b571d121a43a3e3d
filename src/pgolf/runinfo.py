"""Facts about a run that no stage owns: the environment fingerprint and the code it counts.

environment.json answers "what exactly ran this?": GPU model (and whether it is SXM), driver, CUDA,
torch, triton, FlashAttention 3, NCCL, Python, CPU, git commit, the train_gpt.py that ran (path,
bytes, sha256), image tag/digest, dataset id, shard count and the data manifest's sha256.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

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


def source_sha256() -> str | None:
    """Identity of the code that ran: the bundle's digest, or the same digest of the package."""
    if bundle_info():
        return bundle_info().get("source_sha256")
    try:
        from pgolf.submission.bundle import collect_modules, source_digest
    except ImportError:
        return None
    return source_digest(collect_modules())


def code_facts(cfg: Config) -> dict[str, Any]:
    """What this run counts as code bytes, and why (environment.json, quant_report.json).

    From a generated train_gpt.py (what `pgolf launch` runs): that file's own bytes and sha256, the
    file a submission ships. From the package: `pgolf.submission.bundle.package_code_facts` (the
    file a submission would ship; that code stays out of the counted file).
    """
    info = bundle_info()
    if not info:
        from pgolf.submission.bundle import package_code_facts

        return package_code_facts(cfg)
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


def collect_environment(cfg: Config, device: Any, world_size: int) -> dict[str, Any]:
    from pgolf.model import attention_backend_in_use

    return {
        "pgolf": __version__,
        "git_commit": git_commit(),
        "source_sha256": source_sha256(),
        **{k: v for k, v in code_facts(cfg).items() if k != "code_bytes_source"},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "world_size": world_size,
        "image": cfg.run.image or None,
        "image_digest": cfg.run.image_digest or None,
        "attention_backend": attention_backend_in_use(cfg.model, device),
        **gpu_facts(),
        **torch_facts(device),
        **data_facts(cfg),
    }


def val_shards_in_training(data_path: str) -> int:
    """How many validation shards the training stream could read: val files that are also train
    files by name or by content (sha256, from the data manifest when it lists the file, else hashed).

    Training and calibration read only `fineweb_train_*` through `shard_paths(..., "train")`, so a
    non-zero count means the dataset itself leaks validation text into training (spec §7.1 item 9).
    """
    from pgolf.data.manifest import read_manifest
    from pgolf.fileio import sha256_file
    from pgolf.data.shards import shard_paths

    data_dir = Path(data_path)
    listed = {e["file"]: e.get("sha256") for e in (read_manifest(data_dir) or {"files": []})["files"]}

    def digest(path: Path) -> str:
        return listed.get(path.name) or sha256_file(path)

    train, val = shard_paths(data_dir, "train"), shard_paths(data_dir, "val")
    train_digests = {digest(p) for p in train}
    train_names = {p.resolve() for p in train}
    return sum(1 for p in val if p.resolve() in train_names or digest(p) in train_digests)


def val_docs_in_training(data_path: str) -> dict[str, Any]:
    """The dataset's document-level leakage check (pgolf.data.leakage.leakage_report): from its data
    manifest when recorded there, else computed now; a failure to check is recorded, never raised."""
    from pgolf.data.leakage import leakage_report
    from pgolf.errors import PgolfError

    try:
        return leakage_report(data_path)
    except PgolfError as exc:
        return {"error": str(exc)}
