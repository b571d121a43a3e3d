"""Run ids: `<preset>-s<seed>-<UTC yyyymmddTHHMMSS>-<4 hex>` unless RUN_ID is set (no torch import).

Under torchrun every rank must use the same id; `pgolf.dist.agree` broadcasts rank 0's choice.
"""

from __future__ import annotations

import datetime as _dt
import re
import secrets

from pgolf.errors import ConfigError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """A run id is one path segment (it names a folder here and a key prefix in the store)."""
    if not _SAFE.match(run_id):
        raise ConfigError(
            f"RUN_ID={run_id!r} is not a safe folder name; use letters, digits, '.', '_' and '-' (max 128)"
        )
    return run_id


def make_run_id(cfg, now: _dt.datetime | None = None, suffix: str | None = None) -> str:
    """cfg.run.run_id when set, else `<preset>-s<seed>-<UTC stamp>-<4 hex>`."""
    if cfg.run.run_id:
        return check_run_id(cfg.run.run_id)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    stamp = now.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    suffix = suffix if suffix is not None else secrets.token_hex(2)
    return check_run_id(f"{cfg.preset}-s{cfg.train.seed}-{stamp}-{suffix}")
