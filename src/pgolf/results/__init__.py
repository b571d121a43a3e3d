"""Bring run folders home from the store, tabulate them, and plot them.

- pull: `<uri>/<run_id>/` -> `<dest>/<run_id>/`, driven by the run's newest committed generation
  (`pgolf.store.runstore`). Resumable (files already present with the generation's sha256 are skipped),
  verified (sha256 of every byte written; a mismatch is fetched once more, then is an error), and
  safe (keys that could escape the destination are refused). manifest.json is written last
  locally too, so a local folder with a manifest holds exactly that generation. `--all` takes the
  complete runs unless asked for the others; a run that cannot be pulled is skipped with one line
  and the others are pulled.
- ls: one row per run folder from summary.json, falling back to config.json, train_summary.json,
  eval_summary.json, quant_report.json and compliance.json; missing figures print as `-`; the
  status comes from manifest.json.
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
from pgolf.store.runstore import (COMPLETE, MANIFEST, FileEntry, Generation, RunNotFound, check_run_id,
                            list_runs, read_latest)
from pgolf.store import (ChecksumMismatch, ObjectStore, S3Options, StoreUnavailable, open_store,
                         sha256_file)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# pull


@dataclass
class PullReport:
    runs: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)  # pulled run -> its status
    downloaded: int = 0
    skipped: int = 0  # already present with the right sha256
    refetched: int = 0  # a checksum mismatch fixed by a second download
    bytes_downloaded: int = 0
    left_out: dict[str, str] = field(default_factory=dict)  # --all: unfinished run -> status
    missing: list[str] = field(default_factory=list)  # named runs the store does not hold
    errors: dict[str, str] = field(default_factory=dict)  # run -> why it was skipped (one line)

    @property
    def ok(self) -> bool:
        return not self.errors


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
            got = info.sha256 if info.sha256 == entry.sha256 else sha256_file(target)
            if got == entry.sha256:
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
    return sha256_file(target) == entry.sha256


def _prune_empty_dirs(root: Path) -> None:
    """After a failed pull: drop the folders it created and left empty (never a file)."""
    if not root.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def pull_run(store: ObjectStore, gen: Generation, dest: Path, *, report: PullReport,
             bar: Any = None) -> None:
    """Make `dest/<run_id>/` hold generation `gen`; its manifest.json is written last."""
    run_root = dest / gen.run_id
    local_manifest = run_root / MANIFEST
    if local_manifest.is_file() and local_manifest.read_bytes() != gen.raw:
        local_manifest.unlink()  # the folder is about to change: not that generation any more
    if bar is not None:
        bar.total = (bar.total or 0) + gen.total_bytes
        bar.refresh()
    try:
        for entry in sorted(gen.files.values(), key=lambda e: e.path):
            target = _local_target(run_root, entry.path)
            if _up_to_date(target, entry):
                report.skipped += 1
            else:
                _fetch(store, f"{gen.run_id}/{entry.key}", entry, target, report)
            if bar is not None:
                bar.update(entry.size)
    except BaseException:
        _prune_empty_dirs(run_root)
        raise
    run_root.mkdir(parents=True, exist_ok=True)
    tmp = run_root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_bytes(gen.raw)
    os.replace(tmp, local_manifest)  # last, like the sync
    report.runs.append(gen.run_id)
    report.statuses[gen.run_id] = gen.status


def pull(uri: str | ObjectStore, dest: str | Path, run_ids: Iterable[str] = (), *,
         all_runs: bool = False, partial: bool = False, if_exists: bool = False,
         progress: bool = True, options: S3Options | None = None) -> PullReport:
    """Pull the named runs (whatever their status) and, with all_runs, every complete run (every
    run with partial) from `uri` into `dest/<run_id>/`. A run that cannot be pulled (malformed or
    unsafe manifest, corrupt object) goes to report.errors and the others are pulled; a store that
    cannot be reached raises at once. A named run the store lacks is an error unless if_exists."""
    store = open_store(uri, options) if isinstance(uri, str) else uri
    named = [check_run_id(r) for r in run_ids]
    if not named and not all_runs:
        raise StoreError("nothing to pull: give RUN_IDs or --all")
    ids = sorted(set(named) | set(list_runs(store))) if all_runs else named
    dest = Path(dest)
    report = PullReport()
    from tqdm import tqdm

    with tqdm(total=0, unit="B", unit_scale=True, desc="pull", disable=not progress or None,
              leave=False) as bar:
        for run_id in ids:
            try:
                gen = read_latest(store, run_id)
                if gen is None:
                    raise RunNotFound(f"no run {run_id} in {store.uri}: check the id "
                                      "(pgolf results pull --all --partial pulls every run)")
                if run_id not in named and not gen.complete and not partial:
                    report.left_out[run_id] = gen.status
                    continue
                pull_run(store, gen, dest, report=report, bar=bar)
            except StoreUnavailable:
                raise  # every other run would wait out the same timeouts
            except (StoreError, OSError) as exc:
                if if_exists and isinstance(exc, RunNotFound):
                    report.missing.append(run_id)
                    continue
                report.errors[run_id] = str(exc).splitlines()[0] if str(exc) else repr(exc)
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
    status: str = "no manifest"  # from manifest.json: complete, running, interrupted (…), failed (…)

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE


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
    verdicts = [bool(r.get("ok")) for r in rules.values()  # informational rules never count
                if isinstance(r, dict) and "ok" in r and r.get("enforced", True)]
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
        status=run_status(run_dir),
    )


def run_status(run_dir: Path) -> str:
    """The status its manifest.json records ("complete" for the earlier layout's manifests,
    which were written only by a finished sync), or "no manifest"."""
    if not (run_dir / MANIFEST).is_file():
        return "no manifest"
    status = _read_json(run_dir / MANIFEST).get("status", COMPLETE)
    return str(status) if status else "unreadable manifest"


def collect(results_dir: str | Path) -> list[RunRow]:
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"no results folder {root}: pull runs first (pgolf results pull --all)")
    return [read_run(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[RunRow]) -> str:
    """Aligned text table with each run's status; a cost column only when some run reports
    cost_usd; the mean line counts complete runs only."""
    with_cost = any(r.cost_usd is not None for r in rows)
    header = ["run", "seed", "preset", "val_bpb", "bytes", "train_s", "eval_s", "ok", "status"]
    if with_cost:
        header.append("cost_usd")
    body = []
    for r in rows:
        ok = "-" if r.compliant is None else ("✓" if r.compliant else "✗")
        cells = [r.run, _fmt(r.seed, "d"), r.preset or "-", _fmt(r.val_bpb, ".4f"),
                 _fmt(r.total_bytes, ",d"), _fmt(r.train_s, ".1f"), _fmt(r.eval_s, ".1f"), ok,
                 r.status]
        if with_cost:
            cells.append(_fmt(r.cost_usd, ".2f"))
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(header)]
    left = {0, 2, 8}  # text columns; numbers align right

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header)] + [line(c) for c in body]
    bpbs = [r.val_bpb for r in rows if r.val_bpb is not None and r.complete]
    others = sum(1 for r in rows if r.val_bpb is not None and not r.complete)
    note = f"; {others} unfinished run(s) left out" if others else ""
    if len(bpbs) >= 2:
        out.append(f"mean val_bpb {statistics.mean(bpbs):.4f} ± {statistics.stdev(bpbs):.4f} "
                   f"(sample std, n={len(bpbs)} complete runs{note})")
    elif not rows:
        out.append("(no runs)")
    return "\n".join(out)


def rows_as_json(rows: list[RunRow]) -> str:
    return json.dumps([{**asdict(r), "complete": r.complete} for r in rows], indent=2,
                      ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# plot


@dataclass
class Curves:
    run: str
    status: str = COMPLETE
    train: list[tuple[float, float]] = field(default_factory=list)  # (train seconds, train_loss)
    val: list[tuple[float, float]] = field(default_factory=list)  # (train seconds, val_bpb)


def load_curves(run_dir: Path) -> Curves:
    """Train/val points from metrics.jsonl; lines that are not JSON objects are skipped."""
    curves = Curves(run=run_dir.name, status=run_status(run_dir))
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
        label = c.run if c.status == COMPLETE else f"{c.run} ({c.status})"
        if c.train:
            ax_loss.plot(*zip(*c.train), label=label, linewidth=1)
        if c.val:
            ax_bpb.plot(*zip(*c.val), marker="o", markersize=3, label=label)
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
