"""Phased score-first LoRA TTT (EVAL_MODE=lora_ttt; technique-spec §5.2, PR #1855 with #1953/#2014/#2135).

    for each of this rank's batches (docs.py: longest documents first, batch i on rank i mod W):
        [a global SGD phase first, if the batch lies past a phase boundary]
        reset the LoRA (B <- 0, A warm) and its optimizer
        for step c = 0, 1, ...: every document with a chunk c
            forward its window (its last <= EVAL_SEQ_LEN tokens ending at the chunk's end) under its LoRA
            SCORE the chunk's targets (n-gram tilt on the scored copy) and commit them in the DocTally
            then, unless it was the document's final chunk, ONE AdamW step on the chunk's mean NLL

Score-first, structurally. A chunk is scored and committed before the step that trains on it
(`DocTally.require_scored` before every step); a document's LoRA sees only its own earlier chunks (per-document
weights, per-document optimizer state); A is warm-started from documents of earlier batches, fully scored;
a global phase trains the base weights only on documents of batches up to its boundary, every one of them
fully scored on some rank (the ranks merge their committed prefixes first and the phase checks them all).
The n-gram hints are built in the same score order (docs.score_time) and checked per scored step. So the
score of every target is a function of the artifact, the labels of targets scored before it, and its own
context: the perturbation test in tests/test_evaluate_lora.py checks exactly that.

One forward per step serves both halves: its NLL is scored (detached) and then, for the documents that
train, backpropagated. The tilt is applied to the scored copy in closed form,
nll' = nll − β·[y = h] + log(1 + p(h)(e^β − 1)), which is the NLL under tilt_logits' distribution.

Global phases (PR #1855): SGD (momentum, clip, cosine lr over the phase's steps, final step skipped) over
the concatenated tokens of the covered documents, cut into EVAL_SEQ_LEN rows, TTT_PHASE_BATCH_SEQS rows a
step split over the ranks, gradients all-reduced; every base parameter trains (and the AsymLogit caps,
which only a phase moves). Unlike #1855's varlen attention the rows here attend across document starts,
as the seed's training rows do. Then the LoRA and its optimizer start fresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pgolf import dist
from pgolf.evaluate.budget import MARGIN_MIN_S, SAFETY, EvalClock
from pgolf.evaluate.docs import DocPlan
from pgolf.evaluate.lora import BatchedAdamW, BatchedLoRA
from pgolf.evaluate.ngram import NgramHints
from pgolf.evaluate.score import IGNORE, DocTally, autocast_for, make_batch
from pgolf.evaluate.ttt import cosine_lr
from pgolf.evaluate.windows import shard

log = logging.getLogger("pgolf.evaluate")


@dataclass
class LoraStats:
    steps: int = 0  # batched LoRA optimizer steps taken by this rank
    doc_steps: int = 0  # per-document steps (documents that trained, summed over steps)
    batches: int = 0
    phases: int = 0  # global phases run
    phase_steps: int = 0  # SGD steps over all phases
    phase_tokens: int = 0  # tokens trained on over all phases (each phase counts its whole prefix)
    stopped: bool = False  # the budget guard stopped adaptation on this rank
    reason: str = ""


def widths_for(seq_len: int, smallest: int = 64) -> list[int]:
    """Padded window widths for a compiled forward: 64, 128, ... below seq_len, then seq_len (few graphs)."""
    out, w = [], smallest
    while w < seq_len:
        out.append(w)
        w *= 2
    return out + [seq_len]


class PhasedLoRA:
    """Runs this rank's batches and the global phases (all ranks call `run`)."""

    def __init__(self, *, net: torch.nn.Module, model: torch.nn.Module, tokens: torch.Tensor, plan: DocPlan,
                 tally: DocTally, e: Any, seq_len: int, rank: int, world_size: int, clock: EvalClock,
                 comm_device: torch.device, hints: NgramHints | None = None, time: torch.Tensor | None = None,
                 compile_fn: Callable[..., Any] | None = None):
        self.net, self.model, self.tokens, self.plan, self.tally, self.e = net, model, tokens, plan, tally, e
        self.seq_len, self.rank, self.world_size, self.clock, self.comm = seq_len, rank, world_size, clock, comm_device
        self.hints, self.time = hints, time
        self.device = tokens.device
        self.lora = BatchedLoRA(model, [s.strip() for s in e.ttt_lora_sites.split(",") if s.strip()],
                                docs=e.ttt_lora_doc_batch, rank=e.ttt_lora_rank, alpha=e.ttt_lora_alpha,
                                warm_start_a=e.ttt_lora_warm_start_a)
        self.opt = BatchedAdamW(self.lora.parameters(), lr=e.ttt_lora_lr, betas=(e.ttt_lora_beta1, e.ttt_lora_beta2),
                                eps=e.ttt_lora_eps, weight_decay=e.ttt_lora_wd)
        lora = self.lora
        self.lora_fn: Callable[[torch.Tensor], torch.Tensor] = lambda idx: net(idx, adapter=lora)  # noqa: E731
        self.phase_fn: Callable[[torch.Tensor], torch.Tensor] = net
        self.widths: list[int] | None = None  # padded widths when compiled (static shapes), else exact
        if compile_fn is not None:
            self.widths = widths_for(seq_len)
            self.lora_fn = compile_fn("lora_ttt", self.lora_fn, planned=len(self.widths))
            self.phase_fn = compile_fn("phase_step", net, planned=1)
        self.base_params = [p for p in net.parameters()]
        if plan.phase_ends:  # phases train every base weight in fp32 (spec §9); cast now, before any compile
            for p in self.base_params:
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        self.stats = LoraStats()
        self._rate_targets = 0
        self._rate_seconds = 0.0

    # -------------------------------------------------------------------------------------------
    # one batch of documents

    def _width(self, need: int) -> int:
        if self.widths is None:
            return max(need, 1)
        return next(w for w in self.widths if w >= need)

    def _step_rows(self, docs: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: window start s, scored range [a, b) (a == b: nothing this step). Rows past the batch: empty."""
        rows = self.e.ttt_lora_doc_batch
        s, a, b = np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.zeros(rows, np.int64)
        for i, d in enumerate(docs):
            a[i], b[i] = self.plan.chunk_span(int(d), step)
            s[i] = max(int(self.plan.lo[d]), int(b[i]) - self.seq_len)
        s[a == b] = 0
        b[a == b] = a[a == b] = 0
        return s, a, b

    def _forward(self, s: np.ndarray, b: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits (B, W, V), labels (B, W) and target index (B, W) of the windows tokens[s:b]."""
        spans = torch.from_numpy(np.stack([s, b], 1)).to(self.device)
        x, y = make_batch(self.tokens, spans, width, len(s))
        target = spans[:, :1] + torch.arange(width, device=self.device)[None, :]
        with autocast_for(self.device):
            logits = self.lora_fn(x).float()
        return logits, y, target

    def _scored_nll(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor, nll: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """The scored NLL at `mask` positions: the model's, tilted by the n-gram hints when they are on."""
        out = nll.detach()[mask]
        if self.hints is None:
            return out
        t = target[mask]
        token, boost = self.hints.at(t)
        lg = logits.detach()[mask]  # (n, V)
        log_p_h = lg.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(lg, dim=1)
        hit = (y[mask] == token).to(out.dtype)
        return out - boost * hit + torch.log1p(log_p_h.exp() * torch.expm1(boost))

    def run_batch(self, index: int, adapt: bool) -> None:
        docs = self.plan.batches[index]
        self.lora.reset()
        self.opt.reset()
        n_chunks = self.plan.n_chunks(docs)
        for step in range(int(n_chunks.max())):
            t0 = self.clock.clock()
            s, a, b = self._step_rows(docs, step)
            need = int((b - s).max())
            width = self._width(need)
            train = np.zeros(len(s), dtype=bool)
            train[: len(docs)] = adapt & (step < n_chunks - 1)
            with self.clock.part("score"):
                with torch.enable_grad():
                    logits, y, target = self._forward(s, b, width)
                    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none",
                                          ignore_index=IGNORE).view_as(y)
                col = torch.arange(width, device=self.device)[None, :]
                lo_col = torch.from_numpy(a - s).to(self.device)[:, None]
                hi_col = torch.from_numpy(b - s).to(self.device)[:, None]
                scored = (col >= lo_col) & (col < hi_col)
                if self.hints is not None and self.time is not None:
                    self.tally.require_causal_hints_in_order(target[scored], self.hints, self.time)
                with torch.no_grad():
                    values = self._scored_nll(logits, y, target, nll, scored)
                self.tally.add_targets(target[scored].cpu().numpy(), values.cpu().numpy())
                for i, d in enumerate(docs):
                    if a[i] < b[i]:
                        self.tally.commit_doc(int(d), int(a[i]), int(b[i]))
            if train.any():
                with self.clock.part("ttt"):
                    self.tally.require_scored([(int(a[i]), int(b[i])) for i in np.flatnonzero(train)])
                    weight = torch.from_numpy(np.where(train, 1.0 / np.maximum(b - a, 1), 0.0)).to(self.device)
                    loss = (nll * scored * weight[:, None].float()).sum()  # sum over docs of each chunk's mean
                    loss.backward()
                    self.opt.step(torch.from_numpy(train).to(self.device))
                    self.stats.steps += 1
                    self.stats.doc_steps += int(train.sum())
            del logits, nll
            self._rate_targets += int((b - a).sum())
            self._rate_seconds += self.clock.clock() - t0
        self.stats.batches += 1

    # -------------------------------------------------------------------------------------------
    # a global phase: SGD on the base weights over the documents scored so far (all ranks)

    def run_phase(self, phase: int, adapt: bool) -> None:
        stop = dist.all_reduce_(torch.tensor([0.0 if adapt else 1.0], device=self.comm), "max")
        if stop.item():
            return
        self.tally.merge(lambda t: dist.all_reduce_(t.to(self.comm), "max").cpu())
        docs = self.plan.docs_before_phase(phase)
        self.tally.require_scored([(int(self.plan.lo[d]), int(self.plan.hi[d])) for d in docs])
        idx = np.concatenate([np.arange(self.plan.lo[d], self.plan.hi[d]) for d in docs])
        idx_t = torch.from_numpy(idx).to(self.device)
        xs, ys = self.tokens[idx_t], self.tokens[idx_t + 1]  # every covered target, in processing order
        n, L = int(idx.size), self.seq_len
        rows = -(-n // L)
        per_step = self.e.ttt_phase_batch_seqs
        n_steps = -(-rows // per_step)
        params = self.base_params
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=0.0, momentum=self.e.ttt_phase_momentum)
        rows_per_rank = -(-per_step // self.world_size) if self.widths is not None else None
        with self.clock.part("phase"):
            for k in range(n_steps - 1):  # the final step is skipped (its cosine lr is 0)
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(self.e.ttt_phase_lr, k, n_steps)
                first = k * per_step
                step_rows = min(per_step, rows - first)
                r0, r1 = shard(step_rows, self.rank, self.world_size)
                spans = torch.tensor([[(first + r) * L, min((first + r + 1) * L, n)] for r in range(r0, r1)],
                                     dtype=torch.long, device=self.device).reshape(-1, 2)
                n_targets = min((first + step_rows) * L, n) - first * L
                x, y = _rows(xs, ys, spans, L, rows_per_rank)
                with autocast_for(self.device):
                    logits = self.phase_fn(x).float()
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum",
                                       ignore_index=IGNORE) / n_targets
                loss.backward()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if self.world_size > 1:
                    flat = dist.all_reduce_(torch.cat([g.flatten() for g in grads]).to(self.comm)).to(self.device)
                    offset = 0
                    for p, g in zip(params, grads):
                        p.grad = flat[offset:offset + g.numel()].view_as(g)
                        offset += g.numel()
                if self.e.ttt_phase_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.e.ttt_phase_grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.stats.phase_steps += 1
        for p in params:
            p.requires_grad_(False)
        self.stats.phases += 1
        self.stats.phase_tokens += n
        self.lora.reset(fresh_a=True)  # fresh LoRA and optimizer on the new base weights
        self.opt.reset()
        if self.rank == 0:
            log.info("eval phase:%d docs:%d tokens:%d sgd_steps:%d elapsed:%.1fs", phase + 1, len(docs), n,
                     n_steps - 1, self.clock.elapsed())

    # -------------------------------------------------------------------------------------------

    def _allow_adapt(self, targets_left: int) -> bool:
        """The budget guard: stop adapting (for good) when the rest, at the measured rate, would overrun."""
        if self.stats.stopped:
            return False
        limit = self.e.eval_max_seconds
        if limit <= 0 or not self._rate_targets:
            return True
        projected = self.clock.elapsed() + SAFETY * targets_left * self._rate_seconds / self._rate_targets
        if projected + max(MARGIN_MIN_S, 0.02 * limit) > limit:
            self.stats.stopped = True
            self.stats.reason = (f"projected {projected:.1f}s > EVAL_MAX_SECONDS={limit:g} with "
                                 f"{targets_left} targets left; LoRA TTT stopped, scoring continues")
            log.warning("budget guard (rank %d): %s", self.rank, self.stats.reason)
        return not self.stats.stopped

    def run(self) -> LoraStats:
        mine = self.plan.batches_of(self.rank, self.world_size)
        left = int(sum(int((self.plan.hi[d] - self.plan.lo[d]).sum()) for d in (self.plan.batches[i] for i in mine)))
        phase = 0
        ends = self.plan.phase_ends
        report = max(1, len(mine) // 10)
        for j, index in enumerate(mine):
            while phase < len(ends) and index > ends[phase]:
                self.run_phase(phase, self._allow_adapt(left))
                phase += 1
            adapt = self._allow_adapt(left)
            self.run_batch(index, adapt)
            left -= int((self.plan.hi[self.plan.batches[index]] - self.plan.lo[self.plan.batches[index]]).sum())
            if self.rank == 0 and ((j + 1) % report == 0 or j == len(mine) - 1):
                log.info("eval batch:%d/%d rank0_loss:%.4f lora_steps:%d elapsed:%.1fs", j + 1, len(mine),
                         self.tally.nll_sum / max(self.tally.count, 1), self.stats.steps, self.clock.elapsed())
        while phase < len(ends):  # the phases are collective: join the ones past this rank's last batch
            self.run_phase(phase, self._allow_adapt(left))
            phase += 1
        return self.stats

    # -------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile every padded width on RANDOM tokens (never validation), forward + backward, no step;
        the LoRA is reset afterwards so scoring starts from the documented initial state."""
        g = torch.Generator().manual_seed(0)
        vocab = self.model.cfg.vocab_size  # type: ignore[attr-defined]
        rows = self.e.ttt_lora_doc_batch
        for width in self.widths or []:
            x = torch.randint(0, vocab, (rows, width), generator=g).to(self.device)
            with torch.enable_grad(), autocast_for(self.device):
                self.lora_fn(x).float().logsumexp(-1).mean().backward()
        for p in self.lora.parameters():
            p.grad = None
        self.lora.reset(fresh_a=True)
        if self.widths is not None and self.plan.phase_ends:
            params = self.base_params
            for p in params:
                p.requires_grad_(True)
            x = torch.randint(0, vocab, (-(-self.e.ttt_phase_batch_seqs // self.world_size), self.seq_len),
                              generator=g).to(self.device)
            with autocast_for(self.device):
                self.phase_fn(x).float().logsumexp(-1).mean().backward()
            for p in params:
                p.grad = None
                p.requires_grad_(False)



def _rows(xs: torch.Tensor, ys: torch.Tensor, spans: torch.Tensor, width: int,
          rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of aligned (input, label) arrays over spans [p, q) of positions, right-padded (0 / IGNORE)."""
    n_rows = max(spans.size(0), rows or 0, 1)
    spans = F.pad(spans, (0, 0, 0, n_rows - spans.size(0)))
    pos = spans[:, :1] + torch.arange(width, device=xs.device)[None, :]
    valid = pos < spans[:, 1:2]
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    return torch.where(valid, xs[pos], 0), torch.where(valid, ys[pos], IGNORE)
