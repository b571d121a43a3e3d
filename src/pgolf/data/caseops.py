"""CaseOps: the reversible case transform of the frontier data (technique-spec §1.2, column (b)).

Applied to text before tokenization, over every maximal run of ASCII letters:

    all lowercase           stays                                   "the"     -> "the"
    Titlecase               TITLE + lowercase                       "The"     -> TITLE "the"
    ALLCAPS (>= 2 letters)  ALLCAPS + lowercase                     "NASA"    -> ALLCAPS "nasa"
    mixed case              [TITLE if the first letter is capital]  "iPhone"  -> "i" CAPNEXT "phone"
                            + CAPNEXT before each later capital     "OpenAI"  -> TITLE "open" CAPNEXT "a" CAPNEXT "i"

with TITLE, ALLCAPS, CAPNEXT, ESC = U+E001..U+E004 (private-use characters), and a literal U+E001..U+E004
in the input written as ESC + itself. Upstream calls this transform `lossless_caps_caseops_v1` (PR #1729,
`lossless_caps.py` in the #1855 record folder); this is our own implementation of that definition.

The tokenizer reserves the four operators as user-defined symbols, so each is always one token. Because
the token stream is of the transformed text, val_bpb must divide by the bytes of the ORIGINAL text: the
per-token byte sidecar (`fineweb_val_bytes_*.bin`, same header as a shard, aligned 1:1 with the val
tokens) holds how many original UTF-8 bytes each token accounts for: operators 0, the ESC prefix 0, the
escaped literal 3, BOS 0, every other piece its own bytes (a lowercased ASCII letter is 1 byte, as the
capital it stands for). `sidecar_bytes` computes it and checks, document by document, that the sum
equals the original UTF-8 length, so the sidecar can never score transformed bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pgolf.errors import DataError

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
OPERATOR_BYTES = 3  # UTF-8 length of each operator (U+E001..U+E004)
TEXT_TRANSFORM = "lossless_caps_caseops_v1"  # upstream's name, recorded in manifests
SPACE_MARK = "\u2581"  # SentencePiece's space; a literal one in the text decodes to " " (2 bytes short)


class CaseOpsError(DataError):
    """A string that `encode` could not have produced (decode refuses it instead of guessing)."""


# Runs with at least one capital, or a literal operator; all-lowercase runs never reach Python code.
_ENCODE_RE = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
# An escaped literal, an ALLCAPS word, a Title/mixed word (with CAPNEXT marks), or a stray operator.
_DECODE_RE = re.compile(
    "\ue004(?P<literal>[\ue001-\ue004])"
    "|(?<![a-z])\ue002(?P<caps>[a-z]{2,})(?![a-z\ue003])"
    "|(?<![a-z])(?P<title>\ue001)?(?P<word>[a-z](?:\ue003?[a-z])*)(?![a-z\ue003])"
    "|(?P<stray>[\ue001-\ue004])"
)


def _encode_run(match: re.Match[str]) -> str:
    run = match.group()
    if run in OPERATORS:
        return ESC + run
    lower = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + lower
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + lower
    head = TITLE if run[0].isupper() else ""
    return head + lower[0] + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text` (lossless: `decode(encode(text)) == text` for every string)."""
    return _ENCODE_RE.sub(_encode_run, text)


def _decode_match(match: re.Match[str]) -> str:
    if match.group("literal"):
        return match.group("literal")
    if match.group("caps"):
        return match.group("caps").upper()
    word = match.group("word")
    if word is None:
        raise CaseOpsError(f"misplaced CaseOps operator U+{ord(match.group()):04X} at character {match.start()}")
    if CAPNEXT in word:
        word = re.sub("\ue003([a-z])", lambda m: m.group(1).upper(), word)
    return word[0].upper() + word[1:] if match.group("title") else word


def decode(text: str) -> str:
    """Invert `encode`; text `encode` could not have produced is a CaseOpsError, never a guess."""
    out = _DECODE_RE.sub(_decode_match, text)
    if encode(out) != text:  # e.g. TITLE + "a" CAPNEXT "b": "AB" encodes as ALLCAPS "ab"
        raise CaseOpsError("text is not in CaseOps canonical form (an operator where encode never puts one)")
    return out


# ---------------------------------------------------------------------------------------------
# tokenizer side: which ids are operators, and the original bytes of every token


def operator_ids(sp: Any) -> dict[str, int] | None:
    """{operator: id} when each operator is one dedicated piece wherever it stands (a CaseOps tokenizer:
    user-defined symbols are always cut out whole), else None."""
    ids: dict[str, int] = {}
    for op in OPERATORS:
        piece = sp.piece_to_id(op)
        if piece == sp.unk_id() or sp.is_byte(piece) or sp.id_to_piece(piece) != op:
            return None
        if any(sp.encode(text).count(piece) != 1 for text in (op, f"a{op}a", f"x {op}y")):
            return None
        ids[op] = piece
    return ids


def check_caseops_tokenizer(sp: Any, path: str, vocab_size: int | None = None) -> dict[str, int]:
    """The operator ids, or a one-line DataError saying what the tokenizer lacks."""
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise DataError(f"tokenizer {path} has {sp.vocab_size()} pieces, expected {vocab_size}; "
                        "fetch the variant's own tokenizer")
    ids = operator_ids(sp)
    if ids is None:
        raise DataError(f"tokenizer {path} does not reserve the CaseOps operators U+E001..U+E004 as single "
                        "pieces; use the CaseOps tokenizer (`pgolf data build --caseops` trains one)")
    return ids


@dataclass(frozen=True)
class ByteTable:
    """Original UTF-8 bytes per token id, for a lossless CaseOps tokenizer (arrays of length vocab)."""

    bytes_per_id: np.ndarray  # int32[V]: operators, control and unused ids 0, byte pieces 1, else piece bytes
    operator_ids: np.ndarray  # int64[4]: TITLE, ALLCAPS, CAPNEXT, ESC
    esc_id: int

    @classmethod
    def from_sentencepiece(cls, sp: Any, path: str = "tokenizer") -> "ByteTable":
        ops = check_caseops_tokenizer(sp, path)
        n = sp.vocab_size()
        table = np.zeros(n, dtype=np.int32)
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            # "<0xNN>" pieces are one byte; "▁" is the space SentencePiece decodes it to
            table[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace(SPACE_MARK, " ").encode("utf-8"))
        op_ids = np.array([ops[op] for op in OPERATORS], dtype=np.int64)
        table[op_ids] = 0
        return cls(bytes_per_id=table, operator_ids=op_ids, esc_id=ops[ESC])

    def transformed_bytes(self, ids: np.ndarray) -> np.ndarray:
        """Bytes of the transformed text each token decodes to (operators 3): their sum is the doc's
        transformed UTF-8 length when the tokenizer is lossless."""
        counts = self.bytes_per_id[ids].astype(np.int64)
        counts[np.isin(ids, self.operator_ids)] = OPERATOR_BYTES
        return counts


def _escaped_literals(ids: np.ndarray, esc_id: int) -> list[int]:
    """Positions of the tokens an ESC prefix escapes (ESC ESC is one escaped, literal ESC)."""
    out: list[int] = []
    prefix = -2
    for pos in np.flatnonzero(ids == esc_id).tolist():
        if pos == prefix + 1:  # the literal ESC the previous prefix escaped
            out.append(pos)
            prefix = -2
            continue
        prefix = pos
        if pos + 1 < ids.size and ids[pos + 1] != esc_id:
            out.append(pos + 1)
    return out


def doc_sidecar(doc: str, ids: Sequence[int], table: ByteTable, index: int = 0) -> np.ndarray:
    """uint16 original bytes of each token of one document (no BOS); their sum is len(doc.encode())."""
    ids_np = np.asarray(ids, dtype=np.int64)
    counts = table.bytes_per_id[ids_np].astype(np.int64)
    counts[_escaped_literals(ids_np, table.esc_id)] = OPERATOR_BYTES
    want = len(doc.encode("utf-8"))
    missing = want - int(counts.sum())
    if missing and missing == 2 * doc.count(SPACE_MARK):
        _credit_space_marks(doc, ids_np, counts, table)
        missing = 0
    if missing:
        raise DataError(
            f"document {index}: its tokens account for {want - missing:,} original bytes but the text has "
            f"{want:,}; the tokenizer is not lossless (NFKC or whitespace normalization): CaseOps sidecars "
            "need one trained by `pgolf data build --caseops` (identity normalization)"
        )
    return counts.astype(np.uint16)


def _credit_space_marks(doc: str, ids: np.ndarray, counts: np.ndarray, table: ByteTable) -> None:
    """A literal "▁" (3 bytes) comes back from SentencePiece as a space (1 byte); give the 2 missing
    bytes to the token that holds it, found by its byte offset in the decoded transformed text."""
    transformed = encode(doc)
    ends = np.cumsum(table.transformed_bytes(ids))
    for n_before, match in enumerate(re.finditer(SPACE_MARK, transformed)):
        offset = len(transformed[: match.start()].encode("utf-8")) - 2 * n_before  # earlier marks shrank
        counts[int(np.searchsorted(ends, offset, side="right"))] += 2
