"""The training loop (technique-spec §3 (a)), launched by `torchrun` or plain python.

    train(cfg, run_dir):
        setup       process group, logs, input checks, model, optimizers, loader, val stream
        prime       WARMUP_STEPS real steps to compile/warm kernels (plus one with QAT on when late QAT
                    is configured, so its graph is compiled off the clock too), then restore weights,
                    optimizer and loader (upstream's "warmup" is compile priming, not an LR warmup)
        resume      (optional) load checkpoint/state.pt
        loop        validate when due -> schedule (LR mult, Muon momentum, context length, late QAT,
                    looping) -> step ->
                    clock + stop rule + NaN check (one collective) -> log -> checkpoint when due
        finish      load the EMA, post-EMA validation, export checkpoint/model.pt, train_summary.json

Clock: starts at the first real step, pauses during validation and checkpoint writes, and stops the
run once elapsed + GPTQ_RESERVE_SECONDS >= MAX_WALLCLOCK_SECONDS on any rank (max over ranks), so
the quantizer's calibration fits in the reserve. The step at which the cap trips is the last one.

Context growth (TRAIN_SEQ_SCHEDULE, #2014): the sequence length of the next step follows training
progress (pgolf.train.schedule); the micro-batch keeps its token count, so only the number of rows
changes and the loader's stream is neither skipped nor repeated. Priming compiles every length.

Compiled graphs (TORCH_COMPILE; pgolf.model.compiled): `train_step` (1, +1 with late QAT, +1 with depth
recurrence switched on mid-run, times the number of TRAIN_SEQ_SCHEDULE lengths; all primed off the
clock), `val_nll` (the same without the lengths) and Muon's `newton_schulz` (one per matrix shape); each compile is a
`compile` line in train.log and event in metrics.jsonl, with its reason. Under torchrun, gradients
are averaged by DDP around the (compiled) step: bucketed all-reduces fire during the backward pass
(Dynamo's DDP optimizer splits a compiled graph at the bucket boundaries), instead of one flat
all-reduce after it; Muon keeps its own split of the Newton-Schulz work.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from pgolf import dist
from pgolf.model.compiled import compile_counts, compile_events, is_compiled, maybe_compiled
from pgolf.config import Config, parse_seq_schedule
from pgolf.data.bpb import check_tokenizer_vocab, load_sentencepiece
from pgolf.data.loader import DistributedTokenLoader
from pgolf.data.shards import read_shard, shard_paths
from pgolf.errors import DataError, PgolfError, TrainingError
from pgolf.train.optim import Optimizers, build_optimizers, momentum_at
from pgolf.fileio import atomic_write_json
from pgolf.train.runlog import RunLog, atomic_torch_save
from pgolf.train.schedule import (grad_accum_steps, lr_multiplier, rewarm_multiplier, seq_len_at, train_cap_ms,
                                  training_progress)
from pgolf.train.state import (EMA, check_fits, export_weights, load_state, rng_state, save_state,
                              set_rng_state)
from pgolf.train.validate import ValData, evaluate_rows, load_val

# fields that may differ between a checkpoint's run and the run resuming it
RESUMABLE_CHANGES = {
    "max_wallclock_seconds", "gptq_reserve_seconds", "checkpoint_every_seconds", "val_loss_every",
    "val_batch_size", "train_log_every", "device", "iterations", "warmup_steps", "torch_compile",
    "attention_backend", "run_id", "runs_dir", "results_uri", "sync_every_seconds", "image", "image_digest",
    "sync_deadline_seconds",
}


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    step_avg_ms: float
    tokens_seen: int
    peak_memory_mib: float
    last_val_loss: float | None  # of the weights that ship (post-EMA when EMA is on)
    last_val_bpb: float | None
    checkpoint_path: str
    stopped_early: bool
    stop_reason: str = "iterations"  # iterations | wallclock_cap | interrupted
    pre_ema_val_loss: float | None = None
    pre_ema_val_bpb: float | None = None
    world_size: int = 1
    grad_accum_steps: int = 1
    compiles: dict[str, int] | None = None  # graphs compiled by this stage, per purpose


def train(cfg: Config, run_dir: Path, resume: bool = False, *,
          interrupt_after_step: int | None = None) -> TrainResult:
    """Train on every rank; rank 0 writes the run folder. See the module docstring for the order.

    `interrupt_after_step` is a test hook that simulates a preempted job: the loop returns right
    after that step (and its checkpoint, if one is due), without final validation or export.
    """
    run = _Run(cfg, Path(run_dir), resume)
    run.prime()
    if resume:
        run.load_checkpoint()
    return run.loop(interrupt_after_step)


class _Run:
    """One training run's objects and verbs; `train()` above is the story."""

    # ---- setup ------------------------------------------------------------------------------

    def __init__(self, cfg: Config, run_dir: Path, resume: bool):
        from pgolf.model import build_model

        self.cfg, self.t, self.run_dir = cfg, cfg.train, run_dir
        self.ctx = dist.distributed_context(cfg.train.device)
        self.device = self.ctx.device
        self.is_cuda = self.device.type == "cuda"
        check_fits(cfg, self.device)
        self.log = RunLog(run_dir, self.ctx.is_main)
        self.accum = grad_accum_steps(self.t.train_batch_tokens, self.ctx.world_size,
                                      self.t.micro_batch_seqs, self.t.train_seq_len)
        self.cap_ms = train_cap_ms(self.t.max_wallclock_seconds, self.t.gptq_reserve_seconds)
        self.seq_plan = parse_seq_schedule(self.t.train_seq_schedule, self.t.train_seq_len)
        self.seq_len = seq_len_at(self.seq_plan, 0.0)  # the context of the next step
        self.seq_change_step: int | None = None  # step of the last context change (LR re-warmup)
        self.seq_changes: list[dict[str, Any]] = []
        if resume and not dist.agree((run_dir / "checkpoint" / "state.pt").is_file()):
            raise TrainingError(f"--resume: {run_dir}/checkpoint/state.pt does not exist; "
                                "the first run needs CHECKPOINT_EVERY_SECONDS>0")
        self.resume_state = load_state(run_dir / "checkpoint" / "state.pt") if resume else None
        if self.resume_state is not None:  # the lines after the checkpoint are about to be rewritten
            self.log.rewind(self.resume_state.get("log_offsets") or {})
        if self.ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", cfg.to_dict())
        self.log_header(resume)
        self.val_reads = self.check_inputs()

        seed_everything(self.t.seed)
        if self.is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.compile_mark = self.logged_compiles = len(compile_events())  # this stage's compiles come after
        self.model = build_model(cfg.model, self.device)
        self.qat_planned = self.t.late_qat_threshold > 0
        # depth recurrence: train unlooped until ENABLE_LOOPING_AT of the run (the model is built looped)
        self.loop_planned = cfg.model.num_loops > 0 and cfg.train.enable_looping_at > 0
        self.model.set_looping(not self.loop_planned)
        self.loop_step: int | None = None
        self.build_step_fns()
        self.opts: Optimizers = build_optimizers(self.model.param_groups(), self.t, cfg.model.tie_embeddings,
                                                 self.ctx.rank, self.ctx.world_size, cfg.model.torch_compile)
        self.loader = DistributedTokenLoader(cfg.data.data_path, self.ctx.rank, self.ctx.world_size,
                                             cfg.model.vocab_size)
        self.val: ValData = load_val(cfg.data.data_path, cfg.data.tokenizer_path or None,
                                     cfg.model.vocab_size, self.t.train_seq_len)
        self.val_host = torch.from_numpy(self.val.tokens)
        if self.is_cuda:
            self.val_host = self.val_host.pin_memory()  # once: every validation batch's copy is async
        self.ema = EMA(self.model, self.t.ema_decay) if self.t.ema_decay > 0 else None
        self.step = 0
        self.training_time_ms = 0.0
        self.stop_reason: str | None = None
        self.qat_step: int | None = None
        self.last_val: tuple[float, float] | None = None
        self.last_checkpoint_time = time.perf_counter()
        self.log_model()

    def build_step_fns(self) -> None:
        """The (compiled) loss and validation functions and, under torchrun, the DDP wrapper around the loss.

        DDP broadcasts rank 0's weights at construction (same seed everywhere already; now a guarantee)."""
        model, setting = self.model, self.cfg.model.torch_compile
        graphs = 1 + self.qat_planned + self.loop_planned
        lengths = len({n for _, n in self.seq_plan})  # each context length is one input shape
        state = None
        if self.qat_planned or self.loop_planned:
            state = lambda: {"qat": model.qat_enabled, "looping": model.looping}  # noqa: E731
        self.loss_fn = maybe_compiled("train_step", model.loss, setting, self.device, planned=graphs * lengths,
                                      state=state)
        self.val_fn = maybe_compiled("val_nll", model.per_token_nll, setting, self.device, planned=graphs, state=state)
        self.ddp = data_parallel(model, self.loss_fn, self.device) if dist.is_distributed() else None

    def log_header(self, resume: bool) -> None:
        """The resolved config first (one `key:value` line per field), then the run's layout."""
        self.log.line(f"pgolf train{' (resume)' if resume else ''} run_dir:{self.run_dir}")
        self.log.line("hyperparameters:")
        for key, value in self.cfg.flat().items():
            self.log.line(f"{key}:{value}")
        self.log.line(f"preset:{self.cfg.preset}")
        self.log.record(
            "phase",
            f"world_size:{self.ctx.world_size} grad_accum_steps:{self.accum} "
            f"micro_batch_seqs:{self.t.micro_batch_seqs} device:{self.device}",
            phase="setup", world_size=self.ctx.world_size, grad_accum_steps=self.accum,
            micro_batch_seqs=self.t.micro_batch_seqs, device=str(self.device), resume=resume,
        )

    def log_model(self) -> None:
        backend = self.model.attention_backend(self.device)
        compiled = is_compiled(self.loss_fn)
        self.log.record("phase", f"model_params:{self.model.num_params()}", phase="model",
                        model_params=self.model.num_params(), attention_backend=backend, compiled=compiled)
        self.log.line(f"attention_backend:{backend} torch_compile:{'on' if compiled else 'off'} "
                      f"torch:{torch.__version__}")
        for line in self.opts.describe():
            self.log.line(line)
        if len(self.seq_plan) > 1:
            self.log.line("train_seq_schedule:" + ",".join(f"{n}@{end:g}" for end, n in self.seq_plan)
                          + f" seq_change_warmup_steps:{self.t.seq_change_warmup_steps}")
        self.log.line(f"val_tokens:{self.val.tokens.size - 1} val_rows:{self.val.n_rows} "
                      f"ema_decay:{self.t.ema_decay} late_qat_threshold:{self.t.late_qat_threshold}")

    def check_inputs(self) -> int:
        """Refuse a tokenizer or shards that don't fit VOCAB_SIZE before the first step.

        The tokenizer may not have more pieces than VOCAB_SIZE, and no shard may hold an id >=
        VOCAB_SIZE or >= the tokenizer's piece count (that means another tokenizer made it, and its
        bytes would be miscounted). Every train shard's max id is read, split over ranks (~0.1 s
        per 100M-token shard); the verdict is shared so all ranks fail together. Returns how many
        val shards the training loader would read (by resolved path or by size + sha256 of the
        first MiB): 0.
        """
        data, vocab = self.cfg.data, self.cfg.model.vocab_size
        error: str | None = None
        train_paths: list[Path] = []
        val_paths: list[Path] = []
        try:
            pieces = None
            if data.tokenizer_path and Path(data.tokenizer_path).exists():
                check_tokenizer_vocab(data.tokenizer_path, vocab)
                pieces = load_sentencepiece(data.tokenizer_path).vocab_size()
            train_paths = shard_paths(data.data_path, "train")
            val_paths = shard_paths(data.data_path, "val")
            mine = train_paths[self.ctx.rank :: self.ctx.world_size] + (val_paths if self.ctx.is_main else [])
            for path in mine:
                _check_ids(path, vocab, pieces, data.tokenizer_path)
        except PgolfError as exc:
            error = str(exc)
        errors = [error]
        if dist.is_distributed():
            errors = [None] * self.ctx.world_size
            torch_dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise DataError(first)
        val_ids = {_fingerprint(p) for p in val_paths} | {p.resolve() for p in val_paths}
        return sum(1 for p in train_paths if p.resolve() in val_ids or _fingerprint(p) in val_ids)

    # ---- one optimizer step -----------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.is_cuda:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward/backward over the micro-batches (grads averaged over ranks during the last backward),
        clip, step."""
        t = self.t
        loss_sum = torch.zeros((), device=self.device)
        step_fn = self.ddp if self.ddp is not None else self.loss_fn
        for i in range(self.accum):
            x, y = self.loader.next_tensors(t.train_batch_tokens, self.seq_len, self.accum, self.device)
            last = i == self.accum - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with self.autocast():
                    loss = step_fn(x, y)
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        grad_norm = self.opts.clip_grad_norm()
        self.opts.step()
        self.opts.zero_grad()
        return loss_sum / self.accum, grad_norm

    def schedule(self) -> float:
        """Set the LR multiplier, Muon momentum and context length for the step about to run; the looping
        and late-QAT switches."""
        t = self.t
        elapsed = self.training_time_ms + self.clock_ms()
        mult = lr_multiplier(self.step, elapsed, t.iterations, t.warmdown_iters, self.cap_ms,
                             t.warmdown_frac, t.min_lr)
        progress = training_progress(self.step, elapsed, t.iterations, self.cap_ms)
        self.set_context(progress)
        applied = mult * rewarm_multiplier(self.step, self.seq_change_step, t.seq_change_warmup_steps)
        self.opts.set_lr_mult(applied)
        self.opts.set_muon_momentum(momentum_at(self.step, t.muon_momentum_warmup_start, t.muon_momentum,
                                                t.muon_momentum_warmup_steps))
        if self.loop_planned and not self.model.looping and progress >= t.enable_looping_at:
            self.switch_looping_on(f"train_frac:{progress:.4f}")
        if t.late_qat_threshold > 0 and self.qat_step is None and mult < t.late_qat_threshold:
            self.model.set_qat(True)
            self.qat_step = self.step + 1
            self.log.phase("late_qat", f"late_qat:enabled step:{self.step + 1} lr_mult:{mult:.4f}",
                           step=self.step + 1, lr_mult=mult, train_time_ms=self.training_time_ms + self.clock_ms())
        return applied  # the late-QAT switch above reads the schedule itself, not the re-warmup

    def set_context(self, progress: float) -> None:
        """TRAIN_SEQ_SCHEDULE: switch the context length when progress enters a new stage (logged)."""
        seq_len = seq_len_at(self.seq_plan, progress)
        if seq_len == self.seq_len:
            return
        self.seq_len = seq_len
        if self.step > 0:
            self.seq_change_step = self.step
        change = dict(step=self.step, seq_len=seq_len, progress=round(progress, 4))
        self.seq_changes.append(change)
        self.log.phase("seq_len", f"seq_len:{seq_len} step:{self.step} progress:{progress:.3f} "
                       f"rows_per_micro_batch:{self.t.micro_batch_seqs * self.t.train_seq_len // seq_len}", **change)

    def switch_looping_on(self, why: str) -> None:
        self.model.set_looping(True)
        self.loop_step = self.step + 1
        self.log.phase("looping", f"looping:enabled step:{self.step + 1} {why} slots:{self.model.num_slots}",
                       step=self.step + 1, slots=self.model.num_slots, train_time_ms=self.training_time_ms + self.clock_ms())

    # ---- clocks ------------------------------------------------------------------------------

    def sync_device(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def clock_ms(self) -> float:
        return 1000.0 * (time.perf_counter() - self.t0)

    def pause_clock(self) -> None:
        self.sync_device()
        self.training_time_ms += self.clock_ms()

    def resume_clock(self) -> None:
        self.sync_device()
        self.t0 = time.perf_counter()

    # ---- phases ------------------------------------------------------------------------------

    def prime(self) -> None:
        """Compile/warm the kernels on WARMUP_STEPS real steps, then restore every piece of state."""
        if self.t.warmup_steps <= 0:
            return
        start = time.perf_counter()
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_state = copy.deepcopy(self.opts.state_dict())
        loader_state = copy.deepcopy(self.loader.state_dict())
        for i in range(self.t.warmup_steps):
            self.train_step()
            if self.t.warmup_steps <= 20 or (i + 1) % 10 == 0 or i + 1 == self.t.warmup_steps:
                self.log.line(f"warmup_step:{i + 1}/{self.t.warmup_steps}")
        if is_compiled(self.loss_fn):  # every other graph now, not on the clock: each length, looped, late QAT
            first, lengths = self.seq_len, list(dict.fromkeys(n for _, n in self.seq_plan))
            for seq_len in lengths:
                self.seq_len = seq_len
                if seq_len != first:
                    self.train_step()
                    self.log.line(f"warmup_step:seq_len_{seq_len}")
                if self.loop_planned:
                    self.model.set_looping(True)
                    self.train_step()
                    self.log.line("warmup_step:looping" + (f"_seq_len_{seq_len}" if len(lengths) > 1 else ""))
                if self.qat_planned:  # late QAT comes late: after the looping switch, when one is planned
                    self.model.set_qat(True)
                    self.train_step()
                    self.model.set_qat(False)
                    self.log.line("warmup_step:qat" + (f"_seq_len_{seq_len}" if len(lengths) > 1 else ""))
                self.model.set_looping(False)
            self.seq_len = first
        self.model.set_looping(not self.loop_planned)
        self.sync_device()
        self.model.load_state_dict(model_state)
        self.opts.load_state_dict(opt_state)
        self.loader.load_state_dict(loader_state)
        self.opts.zero_grad()
        self.log.phase("priming", seconds=round(time.perf_counter() - start, 3), steps=self.t.warmup_steps)
        self.log_compiles()

    def log_compiles(self) -> None:
        """A `compile` line + event for every graph compiled since the last call (with its reason)."""
        events = compile_events()
        for ev in events[self.logged_compiles:]:
            self.log.record("compile", f"compile:{ev.purpose} graph:{ev.graph}/{ev.planned} "
                            f"seconds:{ev.seconds:.1f} reason:{ev.reason}", purpose=ev.purpose, graph=ev.graph,
                            planned=ev.planned, seconds=ev.seconds, reason=ev.reason)
        self.logged_compiles = len(events)

    def validate(self) -> tuple[float, float]:
        """Val loss/bpb of the current weights; the caller pauses the clock around it."""
        start = time.perf_counter()
        self.model.eval()
        val_loss, val_bpb, _, _ = evaluate_rows(
            self.val_fn, self.val, self.device, self.ctx.rank, self.ctx.world_size, self.t.val_batch_size,
            self.autocast, host_tokens=self.val_host,
        )
        self.model.train()
        self.last_eval_ms = 1000.0 * (time.perf_counter() - start)
        self.log_compiles()
        return val_loss, val_bpb

    def log_val(self, val_loss: float, val_bpb: float) -> None:
        t, ms = self.t, self.training_time_ms
        avg = ms / max(self.step, 1)
        self.log.record(
            "val",
            f"step:{self.step}/{t.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
            f"train_time:{ms:.0f}ms step_avg:{avg:.2f}ms",
            step=self.step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=ms, step_avg_ms=avg,
            eval_time_ms=round(self.last_eval_ms, 1),
        )

    def checkpoint_state(self) -> dict[str, Any]:
        return dict(
            step=self.step, training_time_ms=self.training_time_ms, qat_step=self.qat_step,
            model=self.model.state_dict(), optimizers=self.opts.state_dict(),
            ema=self.ema.state_dict() if self.ema else None, loader=self.loader.state_dict(),
            rng=rng_state(), config=self.cfg.to_dict(), world_size=self.ctx.world_size,
            seq_len=self.seq_len, seq_change_step=self.seq_change_step, seq_changes=self.seq_changes,
            log_offsets=self.log.offsets() if self.ctx.is_main else None,
        )

    def save_checkpoint(self) -> None:
        start = time.perf_counter()
        if self.ctx.is_main:
            save_state(self.run_dir / "checkpoint" / "state.pt", **self.checkpoint_state())
        dist.barrier()
        self.last_checkpoint_time = time.perf_counter()
        self.log.phase("checkpoint", step=self.step, seconds=round(self.last_checkpoint_time - start, 3),
                       train_time_ms=self.training_time_ms)

    def load_checkpoint(self) -> None:
        path = self.run_dir / "checkpoint" / "state.pt"
        state = self.resume_state or load_state(path)
        self.resume_state = None
        self.check_resumable(state["config"])
        self.model.load_state_dict(state["model"])
        self.opts.load_state_dict(state["optimizers"])
        if self.ema is not None:
            if state["ema"] is None:
                raise TrainingError(f"{path} was saved with EMA off; resume with EMA_DECAY=0")
            self.ema.load_state_dict(state["ema"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.training_time_ms = int(state["step"]), float(state["training_time_ms"])
        self.qat_step = state["qat_step"]
        self.seq_len = int(state.get("seq_len", self.seq_len))
        self.seq_change_step = state.get("seq_change_step")
        self.seq_changes = list(state.get("seq_changes", []))
        if self.qat_step is not None:
            self.model.set_qat(True)
        self.log.phase("resume", f"resume: step:{self.step} train_time:{self.training_time_ms:.0f}ms from {path}",
                       step=self.step, train_time_ms=self.training_time_ms)

    def check_resumable(self, saved: dict[str, Any]) -> None:
        now = self.cfg.to_dict()
        for section, values in saved.items():
            if not isinstance(values, dict):
                continue
            for key, old in values.items():
                new = now.get(section, {}).get(key)
                if new == old:
                    continue
                if key in RESUMABLE_CHANGES:
                    self.log.line(f"resume: {key.upper()} changed {old!r} -> {new!r}")
                else:
                    raise TrainingError(f"--resume: {key.upper()} was {old!r} in the checkpoint but is {new!r} "
                                        "now; resume with the same config (or start a new run)")

    # ---- the loop ----------------------------------------------------------------------------

    def loop(self, interrupt_after_step: int | None) -> TrainResult:
        t = self.t
        self.resume_clock()
        while True:
            last = self.step >= t.iterations or self.stop_reason is not None
            if last or (t.val_loss_every > 0 and self.step % t.val_loss_every == 0):
                self.pause_clock()
                self.last_val = self.validate()
                self.log_val(*self.last_val)
                self.resume_clock()
            if last:
                break
            mult = self.schedule()
            loss, grad_norm = self.train_step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            want_checkpoint = self.after_step(loss, grad_norm, mult)
            if want_checkpoint:
                self.pause_clock()
                self.save_checkpoint()
                self.resume_clock()
            if interrupt_after_step is not None and self.step >= interrupt_after_step:
                return self.result(stop_reason="interrupted")
        self.pause_clock()
        return self.finish()

    def after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, mult: float) -> bool:
        """One collective per step: mean loss, the wallclock stop, the checkpoint decision."""
        t = self.t
        self.sync_device()
        elapsed = self.training_time_ms + self.clock_ms()
        reached_cap = self.cap_ms is not None and elapsed >= self.cap_ms
        due = (self.ctx.is_main and t.checkpoint_every_seconds > 0
               and time.perf_counter() - self.last_checkpoint_time >= t.checkpoint_every_seconds)
        flags = torch.tensor([float(reached_cap), float(due)], device=self.device)
        norm = grad_norm.detach().float().reshape(1) if grad_norm is not None else torch.zeros(1, device=self.device)
        stats = torch.cat([loss.detach().float().reshape(1), norm, flags])
        dist.all_reduce_(stats)  # sums: a flag is set if any rank set it (a max over ranks)
        loss_sum, norm_sum, cap_votes, due_votes = stats.tolist()
        train_loss = loss_sum / self.ctx.world_size
        if reached_cap or cap_votes > 0:
            if self.stop_reason is None and self.step < t.iterations:
                self.stop_reason = "wallclock_cap"
        finite = math.isfinite(train_loss)
        due_log = t.train_log_every > 0 and (
            self.step <= 10 or self.step % t.train_log_every == 0 or self.step == t.iterations
            or self.stop_reason is not None)
        if due_log or not finite:
            self.log.record(
                "train",
                f"step:{self.step}/{t.iterations} train_loss:{train_loss:.4f} train_time:{elapsed:.0f}ms "
                f"step_avg:{elapsed / self.step:.2f}ms",
                step=self.step, train_loss=train_loss, train_time_ms=elapsed, step_avg_ms=elapsed / self.step,
                lr_mult=mult, muon_momentum=momentum_at(self.step - 1, t.muon_momentum_warmup_start,
                                                        t.muon_momentum, t.muon_momentum_warmup_steps),
                grad_norm=norm_sum / self.ctx.world_size if grad_norm is not None else None,
                qat=self.qat_step is not None, tokens_seen=self.step * t.train_batch_tokens, seq_len=self.seq_len,
                tokens_per_s=self.step * t.train_batch_tokens / max(elapsed / 1000.0, 1e-9),
            )
        if not finite:
            self.log.event("error", step=self.step, train_loss=train_loss, reason="non-finite train loss")
            raise TrainingError(
                f"train loss is {train_loss} at step {self.step}; lower MATRIX_LR/SCALAR_LR/TIED_EMBED_LR "
                f"or check the data (see {self.run_dir}/train.log)"
            )
        return due_votes > 0

    def finish(self) -> TrainResult:
        """Stop line, memory line, EMA weights + their val, checkpoint/model.pt, train_summary.json."""
        t = self.t
        if self.stop_reason == "wallclock_cap":
            self.log.record("phase", f"stopping_early: wallclock_cap train_time:{self.training_time_ms:.0f}ms "
                            f"step:{self.step}/{t.iterations}", phase="stop", reason="wallclock_cap",
                            step=self.step, train_time_ms=self.training_time_ms)
        alloc, reserved = peak_memory_mib(self.device)
        self.log.record("phase", f"peak memory allocated: {alloc:.0f} MiB reserved: {reserved:.0f} MiB",
                        phase="memory", peak_memory_mib=alloc, reserved_mib=reserved)
        pre_ema = self.last_val
        if self.qat_step is not None:
            self.model.set_qat(False)  # the quantizer does the real rounding; export fp32 weights
        if self.loop_planned and not self.model.looping:  # a short run: validate and calibrate as evaluated
            self.switch_looping_on("end_of_training")
        if self.ema is not None:
            self.ema.copy_to(self.model)
            self.last_val = self.validate()
            loss, bpb = self.last_val
            self.log.record("val", f"post_ema val_loss:{loss:.4f} val_bpb:{bpb:.4f} "
                            f"eval_time:{self.last_eval_ms:.0f}ms ema_decay:{t.ema_decay}",
                            step=self.step, phase="post_ema", val_loss=loss, val_bpb=bpb,
                            train_time_ms=self.training_time_ms, eval_time_ms=round(self.last_eval_ms, 1))
            if pre_ema is not None and bpb > pre_ema[1]:
                self.log.line(f"warning: the EMA weights (val_bpb {bpb:.4f}) are worse than the live weights "
                              f"({pre_ema[1]:.4f}); EMA_DECAY={t.ema_decay} may be too slow for {self.step} steps")
        weights_path = self.run_dir / "checkpoint" / "model.pt"
        if self.ctx.is_main:
            atomic_torch_save(weights_path, export_weights(self.model))
        result = self.result(stop_reason=self.stop_reason or "iterations", pre_ema=pre_ema, peak=alloc)
        if self.ctx.is_main:
            summary = asdict(result)
            summary.update(ema_decay=t.ema_decay, late_qat_step=self.qat_step, looping_step=self.loop_step,
                           tokens_per_s=result.tokens_seen / max(result.train_time_ms / 1000.0, 1e-9),
                           val_files_read_by_training=self.val_reads, train_batch_tokens=t.train_batch_tokens,
                           seq_len_changes=self.seq_changes,
                           ema_worse_than_live=bool(self.ema and pre_ema and self.last_val[1] > pre_ema[1]))
            atomic_write_json(self.run_dir / "train_summary.json", summary)
        self.log.phase("done", steps=self.step, train_time_ms=self.training_time_ms)
        dist.barrier()
        return result

    def result(self, stop_reason: str, pre_ema: tuple[float, float] | None = None,
               peak: float | None = None) -> TrainResult:
        last = self.last_val
        return TrainResult(
            steps=self.step,
            train_time_ms=self.training_time_ms,
            step_avg_ms=self.training_time_ms / max(self.step, 1),
            tokens_seen=self.step * self.t.train_batch_tokens,
            peak_memory_mib=peak if peak is not None else peak_memory_mib(self.device)[0],
            last_val_loss=last[0] if last else None,
            last_val_bpb=last[1] if last else None,
            checkpoint_path=str(self.run_dir / "checkpoint" / ("state.pt" if stop_reason == "interrupted"
                                                                 else "model.pt")),
            stopped_early=stop_reason != "iterations",
            stop_reason=stop_reason,
            pre_ema_val_loss=pre_ema[0] if pre_ema else None,
            pre_ema_val_bpb=pre_ema[1] if pre_ema else None,
            world_size=self.ctx.world_size,
            grad_accum_steps=self.accum,
            compiles=compile_counts(self.compile_mark),
        )


def data_parallel(model: torch.nn.Module, loss_fn: Any, device: torch.device,
                  bucket_cap_mb: float = 25.0) -> torch.nn.Module:
    """DDP around `loss_fn(x, y)` over `model`'s parameters: gradients are averaged over ranks in
    buckets of `bucket_cap_mb`, each all-reduced as soon as its gradients are ready in backward.
    Broadcasts rank 0's weights at construction; `no_sync()` skips the reduction (accumulation).
    Every parameter gets a gradient in every pass, looped or not (the lane lambdas and skips an
    unlooped pass does not reach are rows of tensors it does use: zero rows, not missing grads)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_StepModule(model, loss_fn), device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb)  # no buffers to sync


class _StepModule(torch.nn.Module):
    """What DDP wraps: the model (its parameters) and the loss function that runs it (maybe compiled).

    DDP's own forward cannot be traced with fullgraph, so the compiled function runs inside it, where
    Dynamo sees the active DDP module and splits the graph at DDP's bucket boundaries."""

    def __init__(self, model: torch.nn.Module, loss_fn: Any):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(x, y)


# ---- small helpers ------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def peak_memory_mib(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peak MiB on CUDA; on CPU the process's max RSS and 0."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 0.0


def _check_ids(path: Path, vocab: int, pieces: int | None, tokenizer: str) -> None:
    """One max() over the shard against VOCAB_SIZE and the tokenizer's piece count."""
    tokens = read_shard(path)
    top = int(tokens.max()) if tokens.size else -1
    if top >= vocab:
        raise DataError(f"{path}: token id {top} >= VOCAB_SIZE={vocab}; the shards were made with a larger "
                        "vocabulary: set VOCAB_SIZE/TOKENIZER_PATH to match or fetch the matching variant")
    if pieces is not None and top >= pieces:
        raise DataError(f"{path}: token id {top} but the tokenizer {tokenizer} has only {pieces} pieces; "
                        "another tokenizer made these shards: point TOKENIZER_PATH at that one")


def _fingerprint(path: Path) -> tuple[int, str]:
    """(size, sha256 of the first MiB): cheap identity of a shard across names and folders."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    return path.stat().st_size, hashlib.sha256(head).hexdigest()
