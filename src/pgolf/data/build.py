"""Build a challenge-format dataset from plain text: train a SentencePiece BPE tokenizer with the
challenge's settings (technique-spec §1.1) unless one is given, then write token shards.

Layout written to `out_dir` (the same names the challenge's exporter uses):
    fineweb_val_NNNNNN.bin     the first `val_docs` documents
    fineweb_val_bytes_NNNNNN.bin  with `caseops`: original bytes per val token, aligned 1:1
    fineweb_train_NNNNNN.bin   the rest
    tokenizer.model            the SentencePiece model
    manifest.json              written last (with the leakage check's result)

Each document is stored as `[BOS=1] + tokens` (no EOS). Documents are encoded in batches straight
into a fixed-size uint16 buffer, so memory stays flat however large the corpus is.

With `caseops`, documents are CaseOps-transformed before training the tokenizer and encoding
(pgolf.data.caseops); the tokenizer reserves the four operators as user-defined symbols and uses
identity normalization without whitespace folding, so its tokens spell the transformed text exactly
and the sidecar counts every original byte (each val document's sum is checked against its UTF-8
length). A dataset whose val documents reappear in train is refused (pgolf.data.leakage).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from pgolf import __version__
from pgolf.data import caseops, usable_cpus
from pgolf.data.manifest import MANIFEST, file_entry, write_manifest
from pgolf.fileio import sha256_file
from pgolf.data.shards import write_shard
from pgolf.errors import DataError

log = logging.getLogger(__name__)

# The official exporter's trainer arguments (spec §1.1 / storage-and-data §7).
TRAINER_ARGS: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# CaseOps: the operators are pieces of their own, and no normalization, so decode(encode(x)) == x
# (NFKC or folded whitespace would make tokens stand for text that is not there; the sidecar could not be exact)
CASEOPS_TRAINER_ARGS: dict[str, Any] = {
    **TRAINER_ARGS,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "user_defined_symbols": list(caseops.OPERATORS),
}
# SentencePiece's trainer silently drops input lines longer than max_sentence_length (4192 bytes).
MAX_LINE_BYTES = 4000
TOKENIZER_FILE = "tokenizer.model"
DEFAULT_SHARD_TOKENS = 100_000_000  # the challenge's shard size
DEFAULT_TOKENIZER_TRAIN_BYTES = 20_000_000  # ~1 s of training on 2 cores at vocab 1024
ENCODE_BATCH_DOCS = 256

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


# ---------------------------------------------------------------------------------------------
# text


def split_text(text: str, max_bytes: int) -> list[str]:
    """Cut text into pieces of at most ~max_bytes UTF-8 bytes, on sentence ends, else on spaces."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for sentence in _sentences(text, max_bytes):
        n = len(sentence.encode("utf-8")) + 1
        if current and size + n > max_bytes:
            pieces.append(" ".join(current))
            current, size = [], 0
        current.append(sentence)
        size += n
    if current:
        pieces.append(" ".join(current))
    return pieces


def _sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Sentences of text; a sentence longer than max_bytes is cut on whitespace, then hard-cut."""
    for sentence in _SENTENCE_END.split(text.strip()):
        if len(sentence.encode("utf-8")) <= max_bytes:
            yield sentence
            continue
        words, size = [], 0
        for word in sentence.split():
            while len(word.encode("utf-8")) > max_bytes:  # one enormous "word": cut by characters
                cut = len(word.encode("utf-8")[:max_bytes].decode("utf-8", "ignore"))
                yield word[:cut]
                word = word[cut:]
            n = len(word.encode("utf-8")) + 1
            if words and size + n > max_bytes:
                yield " ".join(words)
                words, size = [], 0
            words.append(word)
            size += n
        if words:
            yield " ".join(words)


def training_lines(docs: Iterable[str], max_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Non-empty lines of the docs, with over-long lines split so the trainer keeps them."""
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                yield from split_text(line, max_bytes)


def read_docs(sources: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Documents from files or folders: `.jsonl` -> one doc per line's "text"; any other file -> one doc."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"text source {path} does not exist; pass text files or a folder of them")
    docs: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{lineno} is not a JSON object with a \"text\" field") from None
        elif text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, sources))}; pass UTF-8 .txt or .jsonl files")
    return docs


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(
    docs: Iterable[str],
    out_path: str | os.PathLike[str],
    vocab_size: int = 1024,
    max_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
    num_threads: int | None = None,
    trainer_args: dict[str, Any] | None = None,
) -> Path:
    """Train a SentencePiece BPE model with the challenge's settings (or `trainer_args`) on up to
    max_train_bytes of text."""
    import sentencepiece as spm

    def limited() -> Iterator[str]:
        total = 0
        for line in training_lines(docs):
            total += len(line.encode("utf-8"))
            if total > max_train_bytes:
                return
            yield line

    out_path = Path(out_path)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=limited(),
            model_writer=buffer,
            vocab_size=vocab_size,
            num_threads=num_threads or usable_cpus(),
            minloglevel=2,
            **(trainer_args or TRAINER_ARGS),
        )
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise DataError(
            f"SentencePiece training failed at vocab {vocab_size}: {first}; give it non-empty text "
            "and a vocab of at least 260 (256 byte pieces + 4 specials)"
        ) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# shards


@dataclass
class SplitStats:
    docs: int = 0
    tokens: int = 0
    shards: list[Path] = field(default_factory=list)


class ShardWriter:
    """Fills fixed-size uint16 shards `fineweb_{split}_NNNNNN.bin` from a stream of token arrays."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.stats = SplitStats()

    def add(self, tokens: np.ndarray) -> None:
        offset = 0
        while offset < tokens.size:
            k = min(self.shard_tokens - self.fill, tokens.size - offset)
            self.buffer[self.fill : self.fill + k] = tokens[offset : offset + k]
            self.fill += k
            offset += k
            if self.fill == self.shard_tokens:
                self.flush()
        self.stats.tokens += tokens.size

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.out_dir / f"fineweb_{self.split}_{len(self.stats.shards):06d}.bin"
        write_shard(path, self.buffer[: self.fill])
        self.stats.shards.append(path)
        self.fill = 0


def encode_docs(sp: Any, docs: Sequence[str], writer: ShardWriter, progress: Any = None,
                transform: Callable[[str], str] | None = None,
                sidecar: tuple[ShardWriter, caseops.ByteTable] | None = None) -> SplitStats:
    """Encode docs (through `transform`, if given) in batches as [BOS] + tokens into the writer. With
    `sidecar`, each token's original bytes (BOS 0) go to the sidecar writer, which cuts its shards at
    the same places as `writer`."""
    bos = sp.bos_id()
    bos_array = np.array([bos], dtype=np.uint16)
    zero = np.zeros(1, dtype=np.uint16)
    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        batch = docs[start : start + ENCODE_BATCH_DOCS]
        texts = [transform(d) for d in batch] if transform is not None else list(batch)
        encoded = sp.encode(texts, out_type=int, num_threads=usable_cpus())
        parts = [part for ids in encoded for part in (bos_array, np.asarray(ids, dtype=np.uint16))]
        writer.add(np.concatenate(parts))
        if sidecar is not None:
            side_writer, table = sidecar
            counts = [c for i, (doc, ids) in enumerate(zip(batch, encoded))
                      for c in (zero, caseops.doc_sidecar(doc, ids, table, index=start + i))]
            side_writer.add(np.concatenate(counts))
        writer.stats.docs += len(batch)
        if progress is not None:
            progress.update(sum(len(d) for d in batch))
    writer.flush()
    if sidecar is not None:
        sidecar[0].flush()
    return writer.stats


@dataclass
class BuildResult:
    out_dir: Path
    tokenizer: Path
    val: SplitStats
    train: SplitStats
    manifest: dict[str, Any]


def clear_dataset(out_dir: Path) -> None:
    """Remove the manifest and shards of an earlier build, so no stale shard is globbed later."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for path in out_dir.glob("fineweb_*.bin"):
        path.unlink()


def build_dataset(
    docs: Sequence[str],
    out_dir: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    vocab_size: int = 1024,
    val_docs: int = 50_000,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
    info: dict[str, Any] | None = None,
    caseops_transform: bool = False,
) -> BuildResult:
    """Tokenizer (trained on the train docs unless given) + val/train shards (+ the val byte sidecar
    with `caseops_transform`) + the leakage check + manifest.json."""
    from pgolf.data.leakage import check_leakage, require_no_leakage
    from tqdm import tqdm

    from pgolf.data.bpb import load_sentencepiece

    out_dir = Path(out_dir)
    if not 0 < val_docs < len(docs):
        raise DataError(
            f"--val-docs {val_docs} leaves no val or no train documents out of {len(docs)}; "
            f"pick a value between 1 and {len(docs) - 1}"
        )
    if shard_tokens < 1:
        raise DataError(f"shard size {shard_tokens} tokens must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_dataset(out_dir)
    tok_path = out_dir / TOKENIZER_FILE
    trainer_args = CASEOPS_TRAINER_ARGS if caseops_transform else TRAINER_ARGS
    if tokenizer is None:
        log.info("training a %d-piece SentencePiece BPE tokenizer on the train documents", vocab_size)
        train_docs = map(caseops.encode, docs[val_docs:]) if caseops_transform else docs[val_docs:]
        train_tokenizer(train_docs, tok_path, vocab_size, tokenizer_train_bytes, trainer_args=trainer_args)
        trained = True
    else:
        if Path(tokenizer).resolve() != tok_path.resolve():
            load_sentencepiece(tokenizer)  # validate before copying
            shutil.copyfile(tokenizer, tok_path)
        trained = False
    sp = load_sentencepiece(tok_path)
    if sp.vocab_size() > 65_536:
        raise DataError(f"tokenizer {tokenizer} has {sp.vocab_size()} pieces; the uint16 shards hold at most 65,536")
    sidecar = None
    if caseops_transform:
        sidecar = (ShardWriter(out_dir, "val_bytes", shard_tokens), caseops.ByteTable.from_sentencepiece(sp, str(tok_path)))

    total_chars = sum(len(d) for d in docs)
    with tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing", leave=False,
              disable=total_chars < 20_000_000) as bar:
        transform = caseops.encode if caseops_transform else None
        val = encode_docs(sp, docs[:val_docs], ShardWriter(out_dir, "val", shard_tokens), bar, transform, sidecar)
        train = encode_docs(sp, docs[val_docs:], ShardWriter(out_dir, "train", shard_tokens), bar, transform)
    leakage = check_leakage(out_dir)
    require_no_leakage(leakage, out_dir)  # duplicated documents across the split: deduplicate the corpus

    sidecars = sidecar[0].stats.shards if sidecar else []
    entries = [file_entry(p, out_dir) for p in [tok_path, *val.shards, *sidecars, *train.shards]]
    manifest = write_manifest(
        out_dir,
        entries,
        created_by=f"pgolf {__version__}",
        tokenizer={
            "file": TOKENIZER_FILE,
            "sha256": sha256_file(tok_path),
            "vocab_size": sp.vocab_size(),
            "trained": trained,
            "trainer_args": {**trainer_args, "vocab_size": vocab_size} if trained else None,
        },
        docs={"val": val.docs, "train": train.docs},
        leakage_check=leakage.as_dict(),
        **({"text_transform": caseops.TEXT_TRANSFORM} if caseops_transform else {}),
        **(info or {}),
    )
    log.info("built %s: val %d docs / %d tokens, train %d docs / %d tokens in %d shards",
             out_dir, val.docs, val.tokens, train.docs, train.tokens, len(train.shards))
    return BuildResult(out_dir=out_dir, tokenizer=tok_path, val=val, train=train, manifest=manifest)
