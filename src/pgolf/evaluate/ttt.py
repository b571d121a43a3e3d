"""Score-first test-time training (technique-spec §5.1), the adaptation half.

For each chunk, in order, the evaluator first scores the chunk's windows and commits them in the
`Tally`; only then does `Adapter.adapt` train on the targets of that committed range, cut into
seq_len sequences: AdamW (β 0.9/0.999, wd 0), `ttt_epochs` passes in stream order, the learning rate
set per chunk by `cosine_lr`, gradients clipped to `ttt_grad_clip`. Every step first asks the tally
whether all of its targets are committed (`Tally.require_scored`), so training ahead of the scores
raises instead of producing a number. The last chunk is never trained on (nothing is left to gain).

Trainable: the last `ttt_unfreeze_blocks` blocks, every vector/control parameter (names containing
norm|scale|gain|mix|skip|lambda|gate|smear, except linear `.weight` matrices such as the attention
gate's), the tied embedding and an untied head; all else frozen (earlier blocks' matrices, BigramHash).
Trainable weights are kept in fp32 (spec §7.1 item 5: lr-1e-4 AdamW steps vanish in bf16).

Distributed: `ttt_batch_seqs` is the GLOBAL number of sequences per optimizer step; each step's
sequences are split contiguously over the ranks, each rank backpropagates its share of the step's
summed NLL divided by the step's global target count, and the gradients are all-reduced (summed),
so the update equals the single-process one up to float reduction order.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.distributed as tdist
import torch.nn as nn

from pgolf.evaluate.score import ModelFn, Tally, autocast_for, make_batch, spans_tensor, token_nll
from pgolf.evaluate.windows import shard, split_range

CONTROL_PARAM = re.compile(r"norm|scale|gain|mix|skip|lambda|gate|smear")


def select_trainable(model: nn.Module, unfreeze_blocks: int) -> list[tuple[str, nn.Parameter]]:
    """Set requires_grad for TTT and move the trainable parameters to fp32; returns them by name."""
    n_blocks = len(model.blocks)  # type: ignore[arg-type]
    first = n_blocks - min(unfreeze_blocks, n_blocks)
    chosen: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        in_last_blocks = parts[0] == "blocks" and int(parts[1]) >= first
        control = bool(CONTROL_PARAM.search(name)) and not name.endswith(".weight")  # not e.g. attn.gate.weight
        train = in_last_blocks or control or name == "tok_emb.weight" or name.startswith("lm_head.")
        p.requires_grad_(train)
        if train:
            if p.dtype != torch.float32:
                p.data = p.data.float()
            chosen.append((name, p))
    return chosen


def cosine_lr(lr0: float, chunk: int, n_chunks: int) -> float:
    """lr0 · ½(1 + cos(π·c/(N−1))): lr0 on the first chunk, 0 on the last (which is never trained)."""
    if n_chunks <= 1:
        return lr0
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * chunk / (n_chunks - 1)))


class Adapter:
    """AdamW on the trainable parameters; one `adapt` call per committed chunk."""

    def __init__(self, model_fn: ModelFn, params: Sequence[nn.Parameter], *, seq_len: int,
                 batch_seqs: int, grad_clip: float, temperature: float, rank: int, world_size: int,
                 pad_rows: bool):
        self.model_fn = model_fn
        self.params = list(params)
        self.seq_len = seq_len
        self.batch_seqs = batch_seqs
        self.grad_clip = grad_clip
        self.temperature = temperature
        self.rank, self.world_size = rank, world_size
        self.rows_per_rank = -(-batch_seqs // world_size) if pad_rows else None
        device = self.params[0].device
        self.opt = torch.optim.AdamW(self.params, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=device.type == "cuda")
        self.steps = 0

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def adapt(self, tokens: torch.Tensor, lo: int, hi: int, tally: Tally, epochs: int) -> int:
        """Train `epochs` passes over the committed targets [lo, hi); returns optimizer steps taken."""
        seqs = split_range(lo, hi, self.seq_len)
        spans = spans_tensor(seqs, tokens.device)  # exactly the spans checked below, one copy per chunk
        taken = 0
        for _ in range(epochs):
            for i in range(0, len(seqs), self.batch_seqs):
                batch = seqs[i:i + self.batch_seqs]
                tally.require_scored(batch)  # structural score-first check, before any gradient
                self._step(tokens, batch, spans[i:i + self.batch_seqs])
                taken += 1
        self.steps += taken
        return taken

    def warm_up(self, tokens: torch.Tensor) -> None:
        """Compile the training graph on `tokens` (random, never validation) by the path `adapt` takes,
        forward + backward, without an optimizer step; the gradients are dropped."""
        seqs = split_range(0, min(len(tokens) - 1, self.batch_seqs * self.seq_len), self.seq_len)
        self._backward(tokens, seqs, spans_tensor(seqs, tokens.device))
        for p in self.params:
            p.grad = None

    def _backward(self, tokens: torch.Tensor, batch: Sequence[tuple[int, int]], spans: torch.Tensor) -> None:
        """This rank's share of the step's summed NLL / the step's global target count, backpropagated."""
        a, b = shard(len(batch), self.rank, self.world_size)
        n_targets = sum(hi - lo for lo, hi in batch)  # the whole step's targets, over all ranks
        x, y = make_batch(tokens, spans[a:b], self.seq_len, self.rows_per_rank)
        with autocast_for(tokens.device):
            loss = token_nll(self.model_fn, x, y, self.temperature).sum() / n_targets
        loss.backward()

    def _step(self, tokens: torch.Tensor, batch: Sequence[tuple[int, int]], spans: torch.Tensor) -> None:
        self._backward(tokens, batch, spans)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.world_size > 1:
            flat = torch.cat([g.flatten() for g in grads])
            tdist.all_reduce(flat)
            offset = 0
            for p, g in zip(self.params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g)
                offset += g.numel()
        else:
            for p, g in zip(self.params, grads):
                p.grad = g
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
