"""Bring run folders home from the store, tabulate them, and plot them.

- pull: `<uri>/<run_id>/...` -> `<dest>/<run_id>/...`, driven by each run's manifest.json (the
  commit marker RunSync writes last). Resumable (files already present with the manifest's sha256
  are skipped), verified (sha256 of every byte written; a mismatch is fetched once more, then is an
  error), and safe (keys that could escape the destination are refused). manifest.json is written
  last locally too, so a local folder with a manifest is complete.
- ls: one row per run folder from summary.json, falling back to config.json, train_summary.json,
  eval_summary.json, quant_report.json and compliance.json; missing figures print as `-`.
- plot: train loss and val_bpb against train time from metrics.jsonl (matplotlib, imported here).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pgolf.errors import DataError, StoreError
from pgolf.store import (ChecksumMismatch, ObjectStore, S3Options, open_store, sha256_file,
                         validate_key)
from pgolf.sync import MANIFEST

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# pull


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str | None


@dataclass
class PullReport:
    runs: list[str] = field(default_factory=list)
    downloaded: int = 0
    skipped: int = 0  # already present with the right sha256
    refetched: int = 0  # a checksum mismatch fixed by a second download
    bytes_downloaded: int = 0
    partial_runs: list[str] = field(default_factory=list)  # pulled without a manifest


def check_run_id(run_id: str) -> str:
    if "/" in run_id:
        raise StoreError(f"bad run id {run_id!r}: a run id is one path segment (no '/')")
    return validate_key(run_id)


def list_runs(store: ObjectStore, *, complete_only: bool = True) -> list[str]:
    """Run ids in the store; with complete_only, only those whose manifest.json exists."""
    runs: set[str] = set()
    complete: set[str] = set()
    for obj in store.list(""):
        run, sep, rest = obj.key.partition("/")
        if not sep:
            continue
        runs.add(run)
        if rest == MANIFEST:
            complete.add(run)
    return sorted(complete if complete_only else runs)


def parse_manifest(run_id: str, data: bytes) -> list[FileEntry]:
    """Files listed in a manifest; refuses unsafe paths before anything is written."""
    try:
        manifest = json.loads(data)
        entries = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"]))
                   for f in manifest["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"manifest.json of run {run_id} is malformed ({exc}): re-sync the "
                         "run (pgolf results push)") from None
    for entry in entries:
        try:
            validate_key(entry.path)
        except StoreError:
            raise StoreError(f"refusing to pull run {run_id}: its manifest lists an unsafe path "
                             f"{entry.path!r}") from None
        if entry.path == MANIFEST:
            raise StoreError(f"refusing to pull run {run_id}: its manifest lists itself")
    return entries


def _listed_entries(store: ObjectStore, run_id: str) -> list[FileEntry]:
    """Without a manifest (--partial): whatever is in the store, identity from HEAD."""
    entries = []
    for obj in store.list(run_id + "/"):
        rel = obj.key[len(run_id) + 1:]
        try:
            validate_key(rel)
        except StoreError:
            raise StoreError(f"refusing to pull run {run_id}: the store holds an unsafe key "
                             f"{obj.key!r}") from None
        if rel == MANIFEST:
            continue
        head = store.head(obj.key) if obj.sha256 is None else obj
        entries.append(FileEntry(rel, obj.size, head.sha256 if head else None))
    return entries


def _local_target(run_root: Path, rel: str) -> Path:
    target = run_root.joinpath(*rel.split("/"))
    real_root = os.path.realpath(run_root)
    if not os.path.realpath(target).startswith(real_root + os.sep):
        raise StoreError(f"refusing to write {target}: it resolves outside {run_root} "
                         "(a symlink in the destination?)")
    return target


def _fetch(store: ObjectStore, key: str, entry: FileEntry, target: Path,
           report: PullReport) -> None:
    """Download and verify one file; one more try on a checksum mismatch, then a clear error."""
    problem = ""
    for attempt in (1, 2):
        try:
            info = store.get_file(key, target)
            got = info.sha256 if info.sha256 and info.sha256 == entry.sha256 else sha256_file(target)
            if entry.sha256 is None or got == entry.sha256:
                report.downloaded += 1
                report.bytes_downloaded += target.stat().st_size
                report.refetched += attempt - 1
                return
            problem = f"got sha256 {got[:16]}…, manifest says {entry.sha256[:16]}…"
        except ChecksumMismatch as exc:
            problem = str(exc)
        target.unlink(missing_ok=True)
        if attempt == 1:
            log.warning("sha256 mismatch for %s/%s (%s): fetching it again", store.uri, key,
                        problem)
    raise ChecksumMismatch(f"{store.uri}/{key} failed sha256 verification twice ({problem}): "
                           "the stored copy is corrupt; re-upload it (pgolf results push)")


def _up_to_date(target: Path, entry: FileEntry) -> bool:
    if not target.is_file() or target.stat().st_size != entry.size:
        return False
    return entry.sha256 is None or sha256_file(target) == entry.sha256


def pull_run(store: ObjectStore, run_id: str, dest: Path, *, partial: bool,
             report: PullReport, bar: Any = None) -> None:
    check_run_id(run_id)
    manifest_key = f"{run_id}/{MANIFEST}"
    manifest = store.get_bytes(manifest_key) if store.head(manifest_key) else None
    if manifest is None and not partial:
        raise StoreError(f"run {run_id} has no manifest.json in {store.uri} (still running or "
                         "crashed before its final sync?): pass --partial to pull what is there")
    entries = parse_manifest(run_id, manifest) if manifest else _listed_entries(store, run_id)
    if manifest is None:
        report.partial_runs.append(run_id)
    run_root = dest / run_id
    run_root.mkdir(parents=True, exist_ok=True)
    if bar is not None:
        bar.total = (bar.total or 0) + sum(e.size for e in entries)
        bar.refresh()
    for entry in entries:
        target = _local_target(run_root, entry.path)
        if _up_to_date(target, entry):
            report.skipped += 1
        else:
            _fetch(store, f"{run_id}/{entry.path}", entry, target, report)
        if bar is not None:
            bar.update(entry.size)
    if manifest is not None:  # last, like the sync: a local manifest means a complete folder
        tmp = run_root / f".{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_bytes(manifest)
        os.replace(tmp, run_root / MANIFEST)
    report.runs.append(run_id)


def pull(uri: str | ObjectStore, dest: str | Path, run_ids: Iterable[str] = (), *,
         all_runs: bool = False, partial: bool = False, progress: bool = True,
         options: S3Options | None = None) -> PullReport:
    """Pull the given runs (or every run, with all_runs) from `uri` into `dest/<run_id>/`."""
    store = open_store(uri, options) if isinstance(uri, str) else uri
    ids = [check_run_id(r) for r in run_ids]
    if all_runs:
        ids = sorted(set(ids) | set(list_runs(store, complete_only=not partial)))
    elif not ids:
        raise StoreError("nothing to pull: give RUN_IDs or --all")
    dest = Path(dest)
    report = PullReport()
    from tqdm import tqdm

    with tqdm(total=0, unit="B", unit_scale=True, desc="pull", disable=not progress or None,
              leave=False) as bar:
        for run_id in ids:
            pull_run(store, run_id, dest, partial=partial, report=report, bar=bar)
    log.debug("pulled %d run(s) from %s into %s: %d file(s) downloaded (%.1f MB), %d already "
             "present", len(report.runs), store.uri, dest, report.downloaded,
             report.bytes_downloaded / 1e6, report.skipped)
    return report


# ---------------------------------------------------------------------------------------------
# ls


@dataclass
class RunRow:
    run: str
    seed: int | None = None
    preset: str | None = None
    val_bpb: float | None = None
    total_bytes: int | None = None
    train_s: float | None = None
    eval_s: float | None = None
    compliant: bool | None = None
    cost_usd: float | None = None
    complete: bool = False  # manifest.json present


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return {}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_run(run_dir: Path) -> RunRow:
    summary = _read_json(run_dir / "summary.json")
    cfg = _read_json(run_dir / "config.json")
    train = _read_json(run_dir / "train_summary.json")
    ev = _read_json(run_dir / "eval_summary.json")
    quant = _read_json(run_dir / "quant_report.json")
    rules = _read_json(run_dir / "compliance.json")
    train_ms = _num(train.get("train_time_ms"))
    seed = _first(summary.get("seed"), (cfg.get("train") or {}).get("seed"))
    verdicts = [bool(r.get("ok")) for r in rules.values() if isinstance(r, dict) and "ok" in r]
    total_bytes = _num(_first(summary.get("total_bytes"), quant.get("total_bytes")))
    return RunRow(
        run=str(summary.get("run_id") or run_dir.name),
        seed=int(seed) if _num(seed) is not None else None,
        preset=_first(summary.get("preset"), cfg.get("preset")),
        val_bpb=_num(_first(summary.get("val_bpb"), ev.get("val_bpb"))),
        total_bytes=int(total_bytes) if total_bytes is not None else None,
        train_s=_num(_first(summary.get("train_time_s"),
                            train_ms / 1000 if train_ms is not None else None)),
        eval_s=_num(_first(summary.get("eval_time_s"), ev.get("eval_time_s"))),
        compliant=all(verdicts) if verdicts else None,
        cost_usd=_num(summary.get("cost_usd")),
        complete=(run_dir / MANIFEST).is_file(),
    )


def collect(results_dir: str | Path) -> list[RunRow]:
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"no results folder {root}: pull runs first (pgolf results pull --all)")
    return [read_run(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[RunRow]) -> str:
    """Aligned text table; a cost column only when some run reports cost_usd; a mean line."""
    with_cost = any(r.cost_usd is not None for r in rows)
    header = ["run", "seed", "preset", "val_bpb", "bytes", "train_s", "eval_s", "ok"]
    if with_cost:
        header.append("cost_usd")
    body = []
    for r in rows:
        ok = "-" if r.compliant is None else ("✓" if r.compliant else "✗")
        cells = [r.run + ("" if r.complete else " (partial)"), _fmt(r.seed, "d"),
                 r.preset or "-", _fmt(r.val_bpb, ".4f"), _fmt(r.total_bytes, ",d"),
                 _fmt(r.train_s, ".1f"), _fmt(r.eval_s, ".1f"), ok]
        if with_cost:
            cells.append(_fmt(r.cost_usd, ".2f"))
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(header)]
    left = {0, 2}  # text columns; numbers align right

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header)] + [line(c) for c in body]
    bpbs = [r.val_bpb for r in rows if r.val_bpb is not None]
    if len(bpbs) >= 2:
        out.append(f"mean val_bpb {statistics.mean(bpbs):.4f} ± {statistics.stdev(bpbs):.4f} "
                   f"(sample std, n={len(bpbs)})")
    elif not rows:
        out.append("(no runs)")
    return "\n".join(out)


def rows_as_json(rows: list[RunRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# plot


@dataclass
class Curves:
    run: str
    train: list[tuple[float, float]] = field(default_factory=list)  # (train seconds, train_loss)
    val: list[tuple[float, float]] = field(default_factory=list)  # (train seconds, val_bpb)


def load_curves(run_dir: Path) -> Curves:
    """Train/val points from metrics.jsonl; lines that are not JSON objects are skipped."""
    curves = Curves(run=run_dir.name)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        t_ms = _num(ev.get("train_time_ms"))
        if t_ms is None:
            continue
        if ev.get("event") == "train" and _num(ev.get("train_loss")) is not None:
            curves.train.append((t_ms / 1000, float(ev["train_loss"])))
        elif ev.get("event") == "val" and _num(ev.get("val_bpb")) is not None:
            curves.val.append((t_ms / 1000, float(ev["val_bpb"])))
    return curves


def plot(results_dir: str | Path, run_ids: Iterable[str] = (), out: str | Path | None = None
         ) -> Path:
    """PNG of train loss (left) and val_bpb (right) against train time, one line per run."""
    root = Path(results_dir)
    ids = list(run_ids)
    if not ids and root.is_dir():
        ids = [d.name for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    curves = [load_curves(root / check_run_id(r)) for r in ids]
    curves = [c for c in curves if c.train or c.val]
    if not curves:
        raise DataError(f"nothing to plot: no train/val events in metrics.jsonl under {root} "
                        f"for {', '.join(ids) or 'any run'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in curves:
        if c.train:
            ax_loss.plot(*zip(*c.train), label=c.run, linewidth=1)
        if c.val:
            ax_bpb.plot(*zip(*c.val), marker="o", markersize=3, label=c.run)
    ax_loss.set(title="train loss", xlabel="train time (s)", ylabel="train_loss (nats/token)")
    ax_bpb.set(title="validation", xlabel="train time (s)", ylabel="val_bpb (bits/byte)")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out) if out else root / "plot.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
