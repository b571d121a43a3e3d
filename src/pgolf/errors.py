"""Error types. The CLI turns any PgolfError into one `error: ...` line (plus an optional hint)."""

from __future__ import annotations


class PgolfError(Exception):
    """A problem the user can fix. `str()` is one line: what failed, the value, what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(PgolfError):
    """Invalid configuration (bad value, bad combination, unknown key)."""


class DataError(PgolfError):
    """Malformed or missing data: shards, tokenizer, manifests."""


class ArtifactError(PgolfError):
    """A corrupted, truncated or oversized artifact."""


class StoreError(PgolfError):
    """Object store failures: bad URI, unsafe key, credentials, checksum mismatch."""


class TrainingError(PgolfError):
    """A run that cannot continue (non-finite loss, ...)."""


class BudgetError(PgolfError):
    """A challenge limit was exceeded (bytes, seconds)."""
