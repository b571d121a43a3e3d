"""A run in the object store: a sequence of committed generations (no torch, no boto3 here).

    <uri>/<run_id>/<path>@<sha16>              one immutable object per version of a file
    <uri>/<run_id>/generations/000007.json     generation 7: status, lineage, and every file's
                                               path, size, sha256 and object key
    <uri>/<run_id>/manifest.json               the pointer: a copy of the newest generation

The writer (`pgolf.store.sync.RunSync`) keeps one order, so a process killed at any instant leaves the
newest committed generation whole (every object it names exists and hashes to its sha256):
1. a new version of a file goes to a key that no generation names yet (the key carries the
   first 16 hex digits of its sha256), so a committed object is never overwritten;
2. the generation file, written with if_absent: two writers cannot both commit number N;
3. the pointer;
4. only then are objects and generation files that the newest two generations do not name deleted.
Readers take the newest generation they can parse: the pointer, or a generation file numbered above
it (a writer killed between 2 and 3).

Every generation carries the run's `lineage` (a random id fixed by its first generation), so a
`--resume` can prove that its local folder is a copy of this run and not another one with the
same id. A manifest without `"format"` is the earlier layout (one manifest.json, objects at their
paths); it reads as generation 0 whose keys are the paths.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pgolf.errors import StoreError
from pgolf.store import ObjectNotFound, ObjectStore, validate_key

MANIFEST = "manifest.json"
GENERATIONS = "generations"
FORMAT = 2
KEEP_GENERATIONS = 2  # the newest and the one before: a reader racing one commit still finds its files
COMPLETE = "complete"
RUNNING = "running"

_GENERATION_KEY = re.compile(r"^generations/(\d{6,})\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RunNotFound(StoreError):
    """The store holds no committed generation of this run id."""


class RunIdTaken(StoreError):
    """A new run asked for a run id that already holds a committed run."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative path in the run folder
    size: int
    sha256: str
    key: str  # object key relative to `<run_id>/`


@dataclass(frozen=True)
class Generation:
    run_id: str
    number: int
    status: str  # complete | running | interrupted (SIGTERM) | failed (DataError) | ...
    lineage: str | None
    files: dict[str, FileEntry]
    time: str = ""
    raw: bytes = field(default=b"", compare=False, repr=False)  # the bytes as stored

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def encode(self) -> bytes:
        doc = {"format": FORMAT, "run_id": self.run_id, "generation": self.number,
               "status": self.status, "lineage": self.lineage, "time": self.time,
               "total_bytes": self.total_bytes,
               "files": [{"path": e.path, "size": e.size, "sha256": e.sha256, "key": e.key}
                         for _, e in sorted(self.files.items())]}
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    def describe(self) -> str:
        return (f"generation {self.number}, status {self.status}, {len(self.files)} files"
                + (f", committed {self.time}" if self.time else ""))


def new_generation(run_id: str, number: int, status: str, lineage: str | None,
                   files: dict[str, FileEntry]) -> Generation:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    gen = Generation(run_id, number, status, lineage, dict(files), stamp)
    return replace(gen, raw=gen.encode())


def new_lineage() -> str:
    return uuid.uuid4().hex[:16]


def object_key(rel: str, sha256: str) -> str:
    """Where one version of a run file lives, relative to `<run_id>/`."""
    return f"{rel}@{sha256[:16]}"


def generation_key(number: int) -> str:
    return f"{GENERATIONS}/{number:06d}.json"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or "/" in run_id:
        raise StoreError(f"bad run id {run_id!r}: a run id is one path segment (no '/')")
    return validate_key(run_id)


# ---------------------------------------------------------------------------------------------
# reading


def parse_generation(run_id: str, data: bytes, where: str) -> Generation:
    """A generation (or an earlier-layout manifest) from its bytes; one-line StoreError when it is
    malformed or names an unsafe path or key, before anything is written anywhere."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        old = "format" not in doc
        if not old and doc["format"] != FORMAT:
            raise ValueError(f"format {doc['format']!r} is not {FORMAT}; upgrade pgolf")
        if doc.get("run_id", run_id) != run_id:
            raise ValueError(f"it belongs to run {doc.get('run_id')!r}")
        entries: dict[str, FileEntry] = {}
        for item in doc["files"]:
            path, size, sha = str(item["path"]), item["size"], str(item["sha256"])
            key = path if old else str(item["key"])
            if type(size) is not int or size < 0 or not _SHA256.match(sha):
                raise ValueError(f"bad size or sha256 for {path!r}")
            if path in entries:
                raise ValueError(f"{path!r} is listed twice")
            entries[path] = FileEntry(path, size, sha, key)
        number = 0 if old else doc["generation"]
        if type(number) is not int or number < 0:
            raise ValueError(f"bad generation number {number!r}")
        status = str(doc.get("status", COMPLETE))
        lineage = doc.get("lineage")
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{where} is malformed ({exc}): re-push the run from its "
                         "folder (pgolf results push)") from None
    for entry in entries.values():
        for name in (entry.path, entry.key):
            try:
                validate_key(name)
            except StoreError:
                raise StoreError(f"refusing {where}: it lists an unsafe path {name!r}") from None
        if entry.path == MANIFEST:
            raise StoreError(f"refusing {where}: it lists itself")
    return Generation(run_id, number, status, str(lineage) if lineage else None, entries,
                      str(doc.get("time", "")), bytes(data))


def generation_numbers(store: ObjectStore, run_id: str) -> list[int]:
    prefix = f"{run_id}/{GENERATIONS}/"
    found = (_GENERATION_KEY.match(o.key[len(run_id) + 1:]) for o in store.list(prefix))
    return sorted(int(m.group(1)) for m in found if m)


def _get(store: ObjectStore, key: str) -> bytes | None:
    try:
        return store.get_bytes(key)
    except ObjectNotFound:
        return None


def read_latest(store: ObjectStore, run_id: str) -> Generation | None:
    """The newest committed generation of `run_id`, or None when the store has none."""
    check_run_id(run_id)
    numbers = generation_numbers(store, run_id)
    pointer = _get(store, f"{run_id}/{MANIFEST}")
    where = f"{store.uri}/{run_id}/{MANIFEST}"
    current = parse_generation(run_id, pointer, where) if pointer is not None else None
    if numbers and (current is None or numbers[-1] > current.number):
        key = f"{run_id}/{generation_key(numbers[-1])}"
        data = _get(store, key)
        if data is not None:  # else: deleted by a writer's clean-up since the listing
            return parse_generation(run_id, data, f"{store.uri}/{key}")
    return current


def list_runs(store: ObjectStore) -> list[str]:
    """Run ids with at least one committed generation (a pointer or a generation file)."""
    runs: set[str] = set()
    for obj in store.list(""):
        run, sep, rest = obj.key.partition("/")
        if sep and not run.startswith(".") and (rest == MANIFEST or _GENERATION_KEY.match(rest)):
            runs.add(run)
    return sorted(runs)


# ---------------------------------------------------------------------------------------------
# the store check every run makes before it spends anything


def check_store(store: ObjectStore) -> None:
    """Fail in one line unless the store takes a write, returns it and lets it be deleted.

    Catches wrong credentials, a missing (or mistyped) bucket, a store that moved or is down and a
    read-only one. The bucket is checked first: some servers (SeaweedFS) create a missing bucket on
    the first PUT.
    """
    check_bucket = getattr(store, "check_bucket", None)
    if check_bucket is not None:
        check_bucket()
    key = f".pgolf-probe/{uuid.uuid4().hex}"
    body = f"pgolf store probe {key}".encode()
    store.put_bytes(key, body)
    try:
        if store.get_bytes(key) != body:
            raise StoreError(f"{store.uri} returned other bytes than were written to a probe "
                             "object: the store is not usable")
    finally:
        store.delete(key)
