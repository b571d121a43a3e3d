"""Document planning for phased LoRA TTT (technique-spec §5.2): pure functions of the token stream.

Coordinates are TARGET indices, as in windows.py (target k = tokens[k + 1], predicted from tokens[: k + 1]).

Documents. The stream is cut at BOS: document j spans its BOS up to and including the next BOS, which
is therefore its last target; in target coordinates document j owns [b_j, b_{j+1}) where b_j is the
position of its BOS. The first token of the stream is never a target. Targets before the first BOS (a
stream that does not start with BOS) form one leading document, and the last document ends at the end
of the stream, so the documents tile [0, N) exactly: every target belongs to one document.

Schedule. Documents are sorted by length (longest first; ties by stream position) and grouped into
batches of `doc_batch`; batch i is processed by rank i mod world_size. Inside a batch the documents are
scored in steps: at step c every document with a chunk c scores its targets [lo + c·C_d, ...) (C_d its
chunk size: `chunk`, or a smaller one for short documents, #2014), then takes one optimizer step on them
unless that was its final chunk.

Score order. Everything the evaluator does is a function of what came earlier in ONE total order of the
targets: (batch, step, document in batch, position). `score_time` gives every target its place in that
order as one int64; the proof of score-first (tests) perturbs every label from a point of this order on
and checks that no earlier score moves. Phase boundaries are batch indices, so every rank agrees on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pgolf.errors import ConfigError
from pgolf.model import BOS_ID  # the shard export writes every document as [BOS] + tokens (spec §1.1)


@dataclass(frozen=True)
class DocPlan:
    """Documents (target ranges), their processing order and batches, chunk sizes and phase boundaries."""

    lo: np.ndarray  # (D,) int64 first target of each document, stream order
    hi: np.ndarray  # (D,) int64 one past its last target
    chunk: np.ndarray  # (D,) int64 chunk size of each document
    batches: list[np.ndarray]  # document ids per batch, in processing order (longest first)
    phase_ends: list[int]  # batch index after which each global SGD phase runs (ascending)

    @property
    def n_docs(self) -> int:
        return int(self.lo.size)

    @property
    def n_targets(self) -> int:
        return int(self.hi[-1]) if self.hi.size else 0

    def n_chunks(self, docs: np.ndarray) -> np.ndarray:
        length = self.hi[docs] - self.lo[docs]
        return -(-length // self.chunk[docs])

    def chunk_span(self, doc: int, step: int) -> tuple[int, int]:
        """Targets [a, b) that document `doc` scores at step `step` (empty past its last chunk)."""
        lo, hi, c = int(self.lo[doc]), int(self.hi[doc]), int(self.chunk[doc])
        a = min(lo + step * c, hi)
        return a, min(a + c, hi)

    def docs_before_phase(self, phase: int) -> np.ndarray:
        """Documents of the batches up to and including phase `phase`'s boundary, in processing order."""
        return np.concatenate(self.batches[: self.phase_ends[phase] + 1])

    def batches_of(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, len(self.batches), world_size))


def cut_documents(tokens: np.ndarray, bos_id: int = BOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) target ranges of the documents of the stream (see the module docstring); they tile [0, N)."""
    n = len(tokens) - 1
    if n < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.asarray(tokens[:n]) == bos_id).astype(np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.concatenate([starts[1:], [n]])
    return starts, ends


def parse_short_chunks(spec: str) -> list[tuple[int, int]]:
    """'256:8,2000:24' -> [(256, 8), (2000, 24)]: documents of at most 256 targets use chunks of 8, ..."""
    out: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            length, size = (int(v) for v in part.split(":"))
        except ValueError:
            raise ConfigError(f"TTT_LORA_SHORT_CHUNKS={spec!r}: each entry is DOC_LEN:CHUNK, e.g. 256:8,2000:24") from None
        if length < 1 or size < 1:
            raise ConfigError(f"TTT_LORA_SHORT_CHUNKS={spec!r}: lengths and chunk sizes must be >= 1")
        out.append((length, size))
    return sorted(out)


def plan_documents(tokens: np.ndarray, *, doc_batch: int, chunk: int, short_chunks: str = "",
                   prefix_docs: int = 0, phases: int = 0, bos_id: int = BOS_ID) -> DocPlan:
    """Cut, size, sort and batch the documents; place the global phases' boundaries.

    Phases: the first `prefix_docs` documents in processing order are the prefix, rounded up to whole
    batches (P batches); phase j (1..phases) runs after batch round(P·j/phases) - 1, and trains on every
    document of the batches up to there (cumulative, as #1855). A boundary after the last batch is dropped:
    nothing would be scored with the weights it produces."""
    if doc_batch < 1 or chunk < 1:
        raise ConfigError(f"TTT_LORA_DOC_BATCH={doc_batch} and TTT_LORA_CHUNK={chunk} must be >= 1")
    lo, hi = cut_documents(tokens, bos_id)
    length = hi - lo
    sizes = np.full(lo.shape, chunk, dtype=np.int64)
    for max_len, size in reversed(parse_short_chunks(short_chunks)):  # the tightest rule wins
        sizes[length <= max_len] = size
    order = np.lexsort((lo, -length))  # longest first; equal lengths in stream order
    batches = [order[i:i + doc_batch] for i in range(0, len(order), doc_batch)]
    phase_ends: list[int] = []
    if phases > 0 and prefix_docs > 0 and batches:
        p = min(-(-prefix_docs // doc_batch), len(batches))
        ends = sorted({max(0, round(p * j / phases) - 1) for j in range(1, phases + 1)})
        phase_ends = [e for e in ends if e < len(batches) - 1]
    return DocPlan(lo=lo, hi=hi, chunk=sizes, batches=batches, phase_ends=phase_ends)


def score_time(plan: DocPlan) -> np.ndarray:
    """(N,) int64: every target's place in the score order (batch, step, document in batch, position).

    Strictly increasing along that order (not dense): a target's score may depend only on labels of
    targets with a smaller time, plus the labels before it in its own document (its context)."""
    n = plan.n_targets
    time = np.empty(n, dtype=np.int64)
    max_chunk = int(plan.chunk.max()) if plan.chunk.size else 1
    base = 0
    for docs in plan.batches:
        steps = int(plan.n_chunks(docs).max())
        stride_doc = max_chunk
        stride_step = stride_doc * len(docs)
        for i, d in enumerate(docs):
            lo, hi, c = int(plan.lo[d]), int(plan.hi[d]), int(plan.chunk[d])
            pos = np.arange(hi - lo, dtype=np.int64)
            time[lo:hi] = base + (pos // c) * stride_step + i * stride_doc + pos % c
        base += steps * stride_step
    return time
