"""The run's two logs: `train.log` (upstream `key:value` lines) and `metrics.jsonl` (one JSON event
per logged line, written from the same dict), plus atomic file writes. Only rank 0 writes.

Both logs are append-only: each record is one `write()` of a whole line followed by a flush, so a
reader (or the store sync) sees at worst a missing last line, never a torn one in the middle. Every
other file of the run folder is written whole to a temp file and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pgolf.fileio import atomic_torch_save  # noqa: F401  (the trainer's checkpoints use it)

log = logging.getLogger("pgolf.train")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": JSON has no literal for them
    return value


class RunLog:
    """Rank 0 writes; other ranks accept the same calls and drop them."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.log_path = run_dir / "train.log"
        self.metrics_path = run_dir / "metrics.jsonl"
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def offsets(self) -> dict[str, int]:
        """How long each log is now: saved with a checkpoint, so a resume can cut what followed."""
        return {p.name: p.stat().st_size if p.is_file() else 0
                for p in (self.log_path, self.metrics_path)}

    def rewind(self, offsets: dict[str, int]) -> None:
        """Cut each log back to `offsets` (a resumed run rewrites what came after its checkpoint,
        so those lines would appear twice). A log shorter than its offset is left alone."""
        if not self.enabled:
            return
        for path in (self.log_path, self.metrics_path):
            size = int(offsets.get(path.name, -1))
            if path.is_file() and 0 <= size < path.stat().st_size:
                with open(path, "r+b") as fh:
                    fh.truncate(size)

    def line(self, text: str) -> None:
        """One human line in train.log (and on stderr through `logging`)."""
        if not self.enabled:
            return
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
        log.info(text)

    def event(self, event: str, **fields: Any) -> None:
        """One JSON object in metrics.jsonl: {"event": ..., **fields}."""
        if not self.enabled:
            return
        record = {"event": event, **{k: _json_safe(v) for k, v in fields.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")

    def record(self, event: str, text: str, **fields: Any) -> None:
        """The human line and its twin JSON event, from the same numbers."""
        self.line(text)
        self.event(event, **fields)

    def phase(self, phase: str, text: str | None = None, **fields: Any) -> None:
        if text is not None:
            self.line(text)
        self.event("phase", phase=phase, **fields)
