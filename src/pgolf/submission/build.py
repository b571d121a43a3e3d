"""`pgolf submission build`: a records folder the challenge accepts, from finished runs.

    records/track_10min_16mb/<date>_<slug>/
      README.md          what the stack is, how to run it, per-seed table, bytes, compliance, environment
      submission.json    name, github_id, val_bpb/val_loss means and std, per-seed figures, bytes, versions
      train_seed<S>.log  every run's train.log, unchanged
      requirements.txt   the third-party packages train_gpt.py imports (torch pinned to the runs')
      train_gpt.py       the generated single file (bundle.py), in the form that is counted

Refuses (one line, nothing written): runs with mixed configs, duplicate seeds, unfinished runs, a
failed compliance rule (unless allowed), runs that did not execute the very train_gpt.py it ships
(sha256 recorded in each run's environment.json; unless allowed), and any seed whose model bytes +
shipped code bytes exceed 16,000,000. Deterministic: the same runs and options give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import pgolf
from pgolf import config as cfgmod
from pgolf.errors import BudgetError, PgolfError
from pgolf.submission import bundle as bundlemod
from pgolf.submission.runs import RunRecord, load_runs, shared_config

TRACK_DIR = "records/track_10min_16mb"
BYTE_RULE = "artifact_bytes"  # recomputed here with the shipped code; the run's own figure is not used


class SubmissionError(PgolfError):
    """A records folder that cannot be built as asked."""


@dataclass(frozen=True)
class BuildResult:
    out: Path
    files: dict[str, int]  # name -> bytes written
    code_form: str
    code_bytes: int  # the shipped train_gpt.py
    code_bytes_raw: int
    code_bytes_compressed: int | None
    bytes_total: int  # worst seed: model + shipped code
    submission: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# small helpers


def slugify(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
    return slug or "submission"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _distinct(runs: Sequence[RunRecord], key: str) -> list[Any]:
    out: list[Any] = []
    for run in runs:
        value = run.environment.get(key)
        if value not in out:
            out.append(value)
    return out


def _one(values: list[Any]) -> Any:
    vals = [v for v in values if v not in (None, "")]
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else " / ".join(str(v) for v in vals)


def hardware(runs: Sequence[RunRecord]) -> str | None:
    descs = []
    for run in runs:
        env = run.environment
        names = env.get("gpu_names") or []
        if names:
            form = " SXM" if env.get("gpu_is_sxm") else ""
            desc = f"{len(names)}x {names[0]}{form}"
        elif env.get("device"):
            desc = f"{env.get('world_size', 1)}x {env['device']} ({env.get('cpu') or 'cpu'})"
        else:
            desc = None
        if desc and desc not in descs:
            descs.append(desc)
    return " / ".join(descs) if descs else None


def _run_date(out: Path | None, explicit: str | None) -> str:
    """--date, else the date the --out folder name starts with, else today (UTC)."""
    if explicit:
        return explicit
    m = re.match(r"(\d{4}-\d{2}-\d{2})_", out.name) if out else None
    return m.group(1) if m else datetime.now(timezone.utc).strftime("%Y-%m-%d")


# ---------------------------------------------------------------------------------------------
# the records folder


def per_seed(run: RunRecord, code_bytes: int) -> dict[str, Any]:
    s = run.summary
    return {
        "seed": run.seed,
        "run_id": run.run_id,
        "val_bpb": run.val_bpb,
        "val_loss": run.val_loss,
        "steps": s.get("steps"),
        "step_avg_ms": s.get("step_avg_ms"),
        "train_time_s": s.get("train_plus_calib_s", s.get("train_time_s")),
        "eval_time_s": s.get("eval_time_s"),
        "prequant_val_bpb": s.get("prequant_val_bpb"),
        "postquant_val_bpb": s.get("postquant_val_bpb"),
        "model_bytes": run.model_bytes,
        "code_bytes": code_bytes,
        "artifact_bytes": run.model_bytes + code_bytes,
        "bytes_per_token": run.bytes_per_token,
        "compliant": all(rule.get("ok") for name, rule in run.compliance.items() if name != BYTE_RULE)
        if run.compliance else None,
    }


def check_bytes(seeds: Sequence[Mapping[str, Any]], cap: int = cfgmod.SIZE_CAP_BYTES,
                code_form: str = "compressed") -> None:
    for row in seeds:
        total = row["artifact_bytes"]
        if total > cap:
            tip = "ship the compressed code form, " if code_form == "raw" else ""
            raise BudgetError(
                f"seed {row['seed']}: model {row['model_bytes']:,} + code {row['code_bytes']:,} = "
                f"{total:,} B, {total - cap:,} over the {cap:,} cap",
                hint=f"{tip}lower MATRIX_BITS/EMBED_BITS or model size (see quant_report.json)")


def check_compliance(runs: Sequence[RunRecord]) -> list[str]:
    """Failed rules other than bytes (recomputed here), as 'run: rule value > limit' lines."""
    failed = []
    for run in runs:
        if not run.compliance:
            failed.append(f"{run.run_id}: no compliance.json")
        for name, rule in sorted(run.compliance.items()):
            if name != BYTE_RULE and not rule.get("ok"):
                failed.append(f"{run.run_id}: {name} value {rule.get('value')} limit {rule.get('limit')}")
    return failed


def check_code_identity(runs: Sequence[RunRecord], bundle: bundlemod.Bundle, code_form: str,
                        code_sha256: str) -> list[str]:
    """Runs that did not execute the train_gpt.py being shipped (environment.json `code_sha256` of
    the file each run ran, as `pgolf launch` runs it): their logs were not produced by this file."""
    drift = []
    for run in runs:
        env = run.environment
        ran = env.get("code_sha256") if env.get("code_file") else None
        if ran == code_sha256:
            continue
        if ran is None:
            drift.append(f"{run.run_id} ran the package, not a train_gpt.py")
            continue
        why = []
        if env.get("source_sha256") and env["source_sha256"] != bundle.source_sha256:
            why.append("its pgolf sources differ")
        if env.get("code_form") and env["code_form"] != code_form:
            why.append(f"it was the {env['code_form']} form")
        reason = ", ".join(why) or "same sources and form: its embedded config, commit or python-minifier differ"
        drift.append(f"{run.run_id} ran {ran[:12]} ({reason})")
    return drift


def runs_commit(runs: Sequence[RunRecord]) -> str | None:
    """The commit the runs' train_gpt.py was generated from, when they all ran one from the same
    commit: the header of the rebuilt file names it, so a later unrelated commit does not change it."""
    commits = {run.environment.get("git_commit") for run in runs if run.environment.get("code_file")}
    return (commits.pop() or None) if len(commits) == 1 else None


def submission_json(*, name: str, github_id: str, author: str | None, blurb: str, date: str,
                    runs: Sequence[RunRecord], seeds: list[dict[str, Any]], code_form: str,
                    code_bytes: int, code_raw: int, code_compressed: int | None,
                    bundle: bundlemod.Bundle, commit: str, failed_rules: list[str],
                    drift: list[str], code_sha256: str) -> dict[str, Any]:
    bpb_mean, bpb_std = _mean_std([r["val_bpb"] for r in seeds])
    loss_mean, loss_std = _mean_std([r["val_loss"] for r in seeds])
    return {
        "name": name,
        "author": author or github_id,
        "github_id": github_id,
        "blurb": blurb,
        "date": date,
        "track": "10min_16mb",
        "val_bpb": bpb_mean,
        "val_bpb_std": bpb_std,
        "val_loss": loss_mean,
        "val_loss_std": loss_std,
        "n_seeds": len(seeds),
        "seeds": seeds,
        "bytes_total": max(r["artifact_bytes"] for r in seeds),
        "bytes_code": code_bytes,
        "bytes_code_form": code_form,
        "bytes_code_raw": code_raw,
        "bytes_code_compressed": code_compressed,
        "code_minifier": f"python-minifier {bundlemod.minifier_version()}" if code_compressed else None,
        "bytes_model_max": max(r["model_bytes"] for r in seeds),
        "size_cap_bytes": cfgmod.SIZE_CAP_BYTES,
        "hardware": hardware(runs),
        "pytorch_version": _one(_distinct(runs, "torch")),
        "cuda_version": _one(_distinct(runs, "cuda")),
        "flash_attn_version": _one(_distinct(runs, "flash_attn_3")),
        "python_version": _one(_distinct(runs, "python")),
        "pgolf_version": pgolf.__version__,
        "pgolf_commit": commit,
        "pgolf_source_sha256": bundle.source_sha256,
        "runs_git_commit": _one(_distinct(runs, "git_commit")),
        "runs_source_sha256": _one(_distinct(runs, "source_sha256")),
        "code_sha256": code_sha256,
        "runs_code_sha256": {run.run_id: run.environment.get("code_sha256") if run.environment.get("code_file")
                             else None for run in runs},
        "code_drift": drift,
        "compliance_failures": failed_rules,
    }


def build(run_ids: Sequence[str], *, out: Path | None, name: str, github_id: str,
          author: str | None = None, blurb: str = "", search: Sequence[Path] = (Path("results"), Path("runs")),
          code_form: bundlemod.Form = "compressed", date: str | None = None,
          allow_noncompliant: bool = False, allow_code_drift: bool = False,
          commit: str | None = None) -> BuildResult:
    """Check the runs, generate train_gpt.py, write the records folder; see the module docstring."""
    if code_form not in bundlemod.FORMS:
        raise SubmissionError(f"--code-form {code_form!r}: choose one of {', '.join(bundlemod.FORMS)}")
    if not name.strip() or not github_id.strip():
        raise SubmissionError("--name and --github-id are required (submission.json must say whose it is)")
    runs = load_runs(run_ids, search)
    runs.sort(key=lambda r: r.seed)
    cfg = shared_config(runs)
    failed = check_compliance(runs)
    if failed and not allow_noncompliant:
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        raise SubmissionError(f"compliance failed: {failed[0]}{more}",
                              hint="fix the runs, or pass --allow-noncompliant for a non-record folder")

    commit = (runs_commit(runs) or bundlemod.git_commit()) if commit is None else commit
    defaults = bundlemod.embedded_defaults(cfg)
    forms = ("raw", "compressed") if code_form == "compressed" or _minifier_available() else ("raw",)
    bundle = bundlemod.build_bundle(defaults, commit=commit, forms=forms)
    code_text = bundle.text(code_form)
    code_sha256 = hashlib.sha256(code_text.encode("utf-8")).hexdigest()
    drift = check_code_identity(runs, bundle, code_form, code_sha256)
    if drift and not allow_code_drift:
        raise SubmissionError(
            f"{len(drift)} of {len(runs)} run(s) did not run the train_gpt.py this build ships "
            f"(sha256 {code_sha256[:12]}): {'; '.join(drift)}",
            hint="records come from `pgolf launch` (the node runs the generated file); rebuild with the checkout "
                 "and python-minifier they were launched from, or pass --allow-code-drift for a non-record folder")
    code_bytes = len(code_text.encode("utf-8"))
    code_raw = bundle.nbytes("raw")
    code_compressed = bundle.nbytes("compressed") if bundle.compressed else None

    seeds = [per_seed(run, code_bytes) for run in runs]
    check_bytes(seeds, code_form=code_form)

    date = _run_date(Path(out) if out else None, date)
    out = Path(out) if out else Path(TRACK_DIR) / f"{date}_{slugify(name)}"
    torch_versions = [v for v in _distinct(runs, "torch") if v]
    files: dict[str, bytes] = {
        "train_gpt.py": code_text.encode("utf-8"),
        "requirements.txt": bundlemod.requirements(
            bundle.third_party, torch_versions[0] if len(torch_versions) == 1 else None).encode(),
    }
    for run in runs:
        if not run.train_log.is_file():
            raise SubmissionError(f"{run.run_id} has no train.log; the challenge requires every seed's log")
        files[f"train_seed{run.seed}.log"] = run.train_log.read_bytes()
    sub = submission_json(name=name, github_id=github_id, author=author, blurb=blurb, date=date, runs=runs,
                          seeds=seeds, code_form=code_form, code_bytes=code_bytes, code_raw=code_raw,
                          code_compressed=code_compressed, bundle=bundle, commit=commit, failed_rules=failed,
                          drift=drift, code_sha256=code_sha256)
    files["submission.json"] = (json.dumps(sub, indent=2) + "\n").encode()
    from pgolf.submission.readme import render_readme

    files["README.md"] = render_readme(sub, cfg, defaults, runs, bundle).encode("utf-8")

    _check_out_dir(out, files)
    out.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        tmp = out / f".{fname}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / fname)
    return BuildResult(out=out, files={k: len(v) for k, v in files.items()}, code_form=code_form,
                       code_bytes=code_bytes, code_bytes_raw=code_raw, code_bytes_compressed=code_compressed,
                       bytes_total=sub["bytes_total"], submission=sub)


def _minifier_available() -> bool:
    try:
        import python_minifier  # noqa: F401
    except ImportError:
        return False
    return True


def _check_out_dir(out: Path, files: Mapping[str, bytes]) -> None:
    """Refuse a folder holding files this build would not write (e.g. another seed's log)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SubmissionError(f"--out {out} exists and is not a folder")
    extra = sorted(p.name for p in out.iterdir() if p.name not in files)
    if extra:
        raise SubmissionError(f"--out {out} holds files this build would not write: {', '.join(extra[:5])}",
                              hint="use a new or empty folder (a rebuild of the same runs overwrites in place)")
