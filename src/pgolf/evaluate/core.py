"""`evaluate()`: load the shipped weights from disk, score every validation target once, write the record.

    clock starts ─► load (artifact/checkpoint, val tokens, byte counts) ─► build (+ compile)
      ─► warm-up on random tokens (compiled models only) ─► [n-gram hints for every target]
      ─► for each chunk: score, commit, [adapt]
      ─► all-reduce float64 sums (and the audit array) ─► eval_summary.json (+ .npz), rank 0

Compiled graphs (TORCH_COMPILE; pgolf.model.compiled): `score` (one, under the mode's grad context:
inference_mode for rows/sliding, no_grad for TTT) and, in TTT mode, `ttt_step` (one). The warm-up
runs the very code path of scoring and adapting (same batch builder, same grad mode, same kind of
input tensors) on random tokens, so nothing compiles on validation tokens or inside the loop. The
window plan is copied to the device once; the loop then builds every batch on the device.

Modes: `rows` (non-overlapping seq_len rows), `sliding` (stride EVAL_STRIDE), `ttt` (sliding windows in
TTT_CHUNK_TOKENS chunks, score-first adaptation between chunks; see ttt.py), `lora_ttt` (documents cut at
BOS, per-document LoRA with global SGD phases, scored longest document first; see phased.py). Every rank calls
`evaluate`; each chunk's windows are split contiguously over the ranks, which move in lockstep.

Extras, each off unless its knob is set: the n-gram tilt (NGRAM_TILT_ENABLED, ngram.py: hints built on
the eval clock, checked by the Tally before each range is scored), AsymLogit (ASYM_LOGIT_RESCALE,
head.py: the model is built uncapped and wrapped; TTT also trains the two caps), and eval context above
the training context (EVAL_SEQ_LEN > TRAIN_SEQ_LEN: windows, rows and TTT sequences all take EVAL_SEQ_LEN;
RoPE is NTK-rescaled past ROPE_NTK_REF_LEN, as the model config says).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from pgolf import dist
from pgolf.model.compiled import compile_counts, compile_enabled, compile_events, is_compiled, maybe_compiled
from pgolf.config import Config
from pgolf.fileio import atomic_write, atomic_write_json
from pgolf.errors import ArtifactError, ConfigError
from pgolf.evaluate.budget import BudgetGuard, Clock, EvalClock
from pgolf.evaluate.head import AsymLogitHead
from pgolf.evaluate.ngram import NgramHints, build_hints, check_same_on_all_ranks
from pgolf.evaluate.score import DocTally, Tally, score_windows, window_table
from pgolf.evaluate.ttt import Adapter, cosine_lr, select_trainable
from pgolf.evaluate.windows import Chunk, Window, check_tiling, plan_chunks, plan_rows, plan_windows, shard

log = logging.getLogger("pgolf.evaluate")

MODES = ("rows", "sliding", "ttt", "lora_ttt")
StateDictLoader = Callable[[Path], Mapping[str, torch.Tensor]]


@dataclass
class EvalResult:
    mode: str
    val_loss: float
    val_bpb: float
    targets: int  # targets scored (== expected_targets == val tokens - 1)
    bytes: int  # UTF-8 bytes of the scored targets
    eval_time_s: float  # the whole eval clock, from before the artifact was read
    parts: dict[str, float] = field(default_factory=dict)  # load, build, warmup, score, ttt seconds
    ttt_steps: int = 0
    guard_fired: bool = False
    guard_reason: str = ""
    expected_targets: int = 0
    ttt_chunks: int = 0
    ttt_chunks_adapted: int = 0
    score_first_checks: int = 0  # optimizer steps whose targets were verified as already scored
    score_first_violations: int = 0  # always 0 in a finished run: a violation raises
    seq_len: int = 0
    stride: int = 0
    world_size: int = 1
    source: str = ""  # the weights file that was scored
    eval_max_seconds: float = 0.0
    compiles: dict[str, int] = field(default_factory=dict)  # graphs compiled by this evaluation, per purpose
    ngram_hinted: int = 0  # targets whose distribution the n-gram tilt changed (0 = tilt off)
    ngram_checks: int = 0  # scored ranges whose hints the Tally verified as causal
    softcap_pos: float = 0.0  # AsymLogit caps after the evaluation (0 = AsymLogit off)
    softcap_neg: float = 0.0
    # lora_ttt (phased per-document LoRA TTT, phased.py); ttt_steps counts its batched LoRA steps
    docs: int = 0
    doc_batches: int = 0
    lora_doc_steps: int = 0  # per-document optimizer steps
    lora_params_per_doc: int = 0
    phases_run: int = 0
    phase_steps: int = 0
    phase_tokens: int = 0


# ---------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """An unquantized state dict saved with torch.save (bare, or under a 'model' key)."""
    if not Path(path).is_file():
        raise ArtifactError(f"checkpoint {path} not found; train first or pass the right --checkpoint")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ArtifactError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def default_loader(path: Path) -> Mapping[str, torch.Tensor]:
    """*.pt / *.pth: torch checkpoint; anything else: the quantized artifact, dequantized."""
    if Path(path).suffix in (".pt", ".pth"):
        return load_checkpoint(path)
    from pgolf.quantize import load_artifact

    return load_artifact(path)


def _load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    result = model.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        what = (f"missing {result.missing_keys[:3]}" if result.missing_keys
                else f"unexpected {result.unexpected_keys[:3]}")
        raise ArtifactError(f"{source} does not match the model config ({what}); evaluate with the run's config.json")


# ---------------------------------------------------------------------------------------------
# the chunk loop


def _windows_for(mode: str, n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    return plan_rows(n_tokens, seq_len) if mode == "rows" else plan_windows(n_tokens, seq_len, stride)


def _warm_up(score_fn: Any, cfg: Config, device: torch.device, adapter: Adapter | None,
             grad_ctx: Callable[[], Any]) -> None:
    """Compile on RANDOM tokens (never validation tokens: spec §7.1 item 6) by the loop's own code path:
    `score_windows` under `grad_ctx` (so inputs are built the same way, e.g. as inference tensors) and
    the adapter's forward + backward. Weights untouched."""
    g = torch.Generator().manual_seed(0)
    seq_len, e = cfg.eval_seq_len, cfg.eval
    rows = max(e.eval_batch_seqs, adapter.batch_seqs if adapter is not None else 0)
    tokens = torch.randint(0, cfg.model.vocab_size, (rows * seq_len + 1,), generator=g).to(device)
    windows = plan_rows(len(tokens), seq_len)[: e.eval_batch_seqs]
    table = window_table(windows, device)
    for _ in range(2):
        with grad_ctx():
            score_windows(score_fn, tokens, windows, seq_len, e.eval_batch_seqs, e.ttt_temperature, True, table)
    if adapter is not None:
        for _ in range(2):
            adapter.warm_up(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _score_chunks(*, model_fn: Any, tokens: torch.Tensor, windows: list[Window], chunks: list[Chunk],
                  tally: Tally, guard: BudgetGuard, clock: EvalClock, adapter: Adapter | None,
                  cfg: Config, rank: int, world_size: int, pad_rows: bool,
                  grad_ctx: Callable[[], Any], hints: NgramHints | None = None) -> tuple[int, int]:
    """Score chunk by chunk; between chunks adapt (TTT) while the budget allows. (steps, chunks adapted)"""
    e, seq_len = cfg.eval, cfg.eval_seq_len
    table = window_table(windows, tokens.device)  # the plan's one host-to-device copy
    n_chunks = len(chunks)
    windows_left = len(windows)
    steps = adapted = 0
    report_every = max(1, n_chunks // 10)
    for chunk in chunks:
        t_score = clock.clock()
        a, b = shard(chunk.last_window - chunk.first_window, rank, world_size)
        lo, hi = chunk.first_window + a, chunk.first_window + b
        mine = windows[lo:hi]
        with clock.part("score"), grad_ctx():
            if hints is not None and mine:
                tally.require_causal_hints(mine[0].score_from, mine[-1].score_to, hints)
            nll = score_windows(model_fn, tokens, mine, seq_len, e.eval_batch_seqs, e.ttt_temperature, pad_rows,
                                table[lo:hi], hints)
            if mine:
                tally.add(mine[0].score_from, nll)
        n_win = chunk.last_window - chunk.first_window
        windows_left -= n_win
        guard.record_score(clock.clock() - t_score, n_win)
        will_adapt = adapter is not None and chunk.index < n_chunks - 1
        if adapter is not None:
            was_fired = guard.fired
            seq_epochs = -(-(chunk.hi - chunk.lo) // seq_len) * e.ttt_epochs
            ok = not will_adapt or guard.allow_adapt(clock.elapsed(), windows_left, seq_epochs, chunk.index,
                                                     n_chunks)
            # lockstep: every rank has scored this chunk once this reduce returns; any rank can stop TTT
            stop = dist.all_reduce_(torch.tensor([0.0 if ok else 1.0], device=_comm_device(tokens.device)), "max")
            if stop.item() and not guard.fired:
                guard.fire(f"another rank projected an overrun of EVAL_MAX_SECONDS at chunk {chunk.index + 1}")
            if guard.fired and not was_fired and rank == 0:
                log.warning("budget guard: %s", guard.reason)
            will_adapt = will_adapt and not guard.fired
        tally.commit(chunk.lo, chunk.hi)
        if will_adapt:
            assert adapter is not None
            t_adapt = clock.clock()
            with clock.part("ttt"):
                adapter.set_lr(cosine_lr(e.ttt_lr, chunk.index, n_chunks))
                steps += adapter.adapt(tokens, chunk.lo, chunk.hi, tally, e.ttt_epochs)
                if tokens.device.type == "cuda":
                    torch.cuda.synchronize(tokens.device)  # charge the GPU time to adapting, not scoring
            guard.record_adapt(clock.clock() - t_adapt, -(-(chunk.hi - chunk.lo) // seq_len) * e.ttt_epochs)
            adapted += 1
        if rank == 0 and n_chunks > 1 and ((chunk.index + 1) % report_every == 0 or chunk.index == n_chunks - 1):
            local = tally.nll_sum / max(tally.count, 1)
            log.info("eval chunk:%d/%d rank0_loss:%.4f ttt_steps:%d elapsed:%.1fs", chunk.index + 1, n_chunks,
                     local, steps, clock.elapsed())
    return steps, adapted


def _rope_note(cfg: Config) -> str:
    """How RoPE treats positions past the training context (#1953 scored 2560 after training at 2048)."""
    m, seq = cfg.model, cfg.eval_seq_len
    if m.rope_ntk_ref_len and seq > m.rope_ntk_ref_len:
        dims = m.rope_dims or m.head_dim
        factor = (seq / m.rope_ntk_ref_len) ** (dims / (dims - 2)) if dims > 2 else 1.0
        return f"RoPE base NTK-rescaled to {m.rope_base * factor:g} (ROPE_NTK_REF_LEN={m.rope_ntk_ref_len})"
    return (f"RoPE not rescaled (ROPE_NTK_REF_LEN={m.rope_ntk_ref_len}): positions past {cfg.train.train_seq_len} "
            "were never trained")


def _comm_device(device: torch.device) -> torch.device:
    if dist.is_distributed() and torch.distributed.get_backend() == "nccl":
        return device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the stage


def evaluate(cfg: Config, run_dir: Path, artifact_path: Path | None = None, mode: str | None = None,
             per_token_out: Path | None = None, state_dict_loader: StateDictLoader | None = None, *,
             checkpoint: Path | None = None, summary_name: str = "eval_summary.json",
             clock: Clock | None = None) -> EvalResult:
    """Score the validation split with the weights read from disk (all ranks call this).

    Weights: `checkpoint` (unquantized torch state dict) if given, else `artifact_path`, else
    run_dir/artifact.pgz. `state_dict_loader(path)` replaces the file reader (tests). Rank 0 writes
    run_dir/`summary_name` and, with `per_token_out`, the audit .npz (nll float32, bytes int32)."""
    from pgolf.data.bpb import bits_per_byte, val_target_bytes
    from pgolf.data.loader import load_val_tokens
    from pgolf.model import build_model

    eval_clock = EvalClock(clock)  # the eval clock starts before anything is read
    mode = mode or cfg.eval.eval_mode
    if mode not in MODES:
        raise ConfigError(f"eval mode {mode!r} is not one of {'|'.join(MODES)}")
    run_dir = Path(run_dir)
    source = Path(checkpoint or artifact_path or run_dir / "artifact.pgz")
    loader = state_dict_loader or (load_checkpoint if checkpoint else default_loader)
    rank, world_size, _, device = dist.distributed_context(cfg.train.device)
    e, seq_len = cfg.eval, cfg.eval_seq_len
    compile_mark = len(compile_events())

    with eval_clock.part("load"):
        if state_dict_loader is None and not checkpoint and source.suffix not in (".pt", ".pth"):
            from pgolf.quantize.artifact import read_artifact
            from pgolf.quantize.meta import check

            artifact = read_artifact(source)
            check(artifact.meta, cfg, str(source))  # wrong model, tokenizer or data: one line, now
            state = artifact.state_dict()
            del artifact
        else:
            state = loader(source)
        tokens_np = load_val_tokens(cfg.data.data_path, cfg.model.vocab_size)
        target_bytes = val_target_bytes(cfg.data.data_path, tokens_np, cfg.data.tokenizer_path)
    with eval_clock.part("build"):
        # AsymLogit: the model returns raw logits and the head caps them (the cap is config, not a weight)
        model = build_model(replace(cfg.model, logit_softcap=0.0) if e.asym_logit_rescale else cfg.model, device)
        _load_weights(model, state, source)
        del state
        model.eval().requires_grad_(False)
        net = AsymLogitHead(model, cfg.model.logit_softcap) if e.asym_logit_rescale else model
        trainable = select_trainable(model, e.ttt_unfreeze_blocks) if mode == "ttt" else []
        if mode == "ttt" and isinstance(net, AsymLogitHead):
            trainable += [(name, p.requires_grad_(True)) for name, p in net.named_parameters(recurse=False)]
        model_fn = net if mode == "lora_ttt" else maybe_compiled("score", net, cfg.model.torch_compile, device)
        compiled = is_compiled(model_fn)
        tokens = torch.from_numpy(tokens_np).to(device)
        adapter = None
        if mode == "ttt" and trainable:
            ttt_fn = maybe_compiled("ttt_step", net, cfg.model.torch_compile, device)
            adapter = Adapter(ttt_fn, [p for _, p in trainable], seq_len=seq_len, batch_seqs=e.ttt_batch_seqs,
                              grad_clip=e.ttt_grad_clip, temperature=e.ttt_temperature, rank=rank,
                              world_size=world_size, pad_rows=compiled)
    if mode == "lora_ttt":
        return _evaluate_lora(cfg, run_dir, summary_name, per_token_out, net=net, model=model, tokens=tokens,
                              tokens_np=tokens_np, target_bytes=target_bytes, clock=eval_clock, source=source,
                              compile_mark=compile_mark)
    # scoring in TTT must not make inference tensors (the model may cache them and backprop later)
    grad_ctx = torch.no_grad if mode == "ttt" else torch.inference_mode
    with eval_clock.part("warmup"):
        if compiled:
            _warm_up(model_fn, cfg, device, adapter, grad_ctx)

    hints = None
    if e.ngram_tilt_enabled:  # on the eval clock: the hints are part of the evaluation (#2018/#2130/#2135)
        with eval_clock.part("ngram"):
            hints = build_hints(tokens, e.token_order, e.token_threshold, e.token_boost)
            check_same_on_all_ranks(hints, _comm_device(device))
        if rank == 0:
            log.info("ngram_tilt:hints targets:%d hinted:%d order:%d threshold:%g boost:%g seconds:%.2f",
                     len(tokens_np) - 1, hints.fired, e.token_order, e.token_threshold, e.token_boost,
                     eval_clock.parts["ngram"])
    if rank == 0 and seq_len > cfg.train.train_seq_len:
        log.info("eval context %d > training context %d: %s", seq_len, cfg.train.train_seq_len, _rope_note(cfg))

    windows = _windows_for(mode, len(tokens_np), seq_len, e.eval_stride)
    n_targets = len(tokens_np) - 1
    check_tiling(windows, n_targets)
    chunks = plan_chunks(windows, e.ttt_chunk_tokens)  # rows/sliding: only for progress and bounded memory
    tally = Tally(target_bytes, keep_per_token=per_token_out is not None)
    guard = BudgetGuard(e.eval_max_seconds)
    if rank == 0:
        log.info("eval mode:%s targets:%d windows:%d chunks:%d seq_len:%d stride:%d world_size:%d "
                 "trainable_params:%d source:%s", mode, n_targets, len(windows), len(chunks), seq_len,
                 e.eval_stride, world_size, sum(p.numel() for _, p in trainable), source)
    steps, adapted = _score_chunks(model_fn=model_fn, tokens=tokens, windows=windows, chunks=chunks, tally=tally,
                                   guard=guard, clock=eval_clock, adapter=adapter, cfg=cfg, rank=rank,
                                   world_size=world_size, pad_rows=compiled, grad_ctx=grad_ctx, hints=hints)

    comm = _comm_device(device)
    sums = dist.all_reduce_(torch.tensor([tally.nll_sum, tally.count, tally.byte_sum], dtype=torch.float64,
                                         device=comm))
    nll_sum, count, byte_sum = float(sums[0]), int(sums[1]), int(sums[2])
    if count != n_targets or byte_sum != int(target_bytes.sum(dtype=np.int64)):
        raise AssertionError(f"scored {count} of {n_targets} targets ({byte_sum} bytes); the window plan is broken")
    per_token = None
    if tally.per_token is not None:  # each target was written by exactly one rank: the sum is exact
        per_token = dist.all_reduce_(torch.from_numpy(tally.per_token).to(comm)).cpu().numpy()
    result = EvalResult(
        mode=mode, val_loss=nll_sum / count, val_bpb=bits_per_byte(nll_sum, byte_sum), targets=count,
        bytes=byte_sum, eval_time_s=0.0, ttt_steps=steps, guard_fired=guard.fired, guard_reason=guard.reason,
        expected_targets=n_targets, ttt_chunks=len(chunks) if mode == "ttt" else 0, ttt_chunks_adapted=adapted,
        score_first_checks=tally.checks, seq_len=seq_len, stride=0 if mode == "rows" else e.eval_stride,
        world_size=world_size, source=str(source), eval_max_seconds=e.eval_max_seconds,
        compiles=compile_counts(compile_mark), ngram_hinted=hints.fired if hints is not None else 0,
        ngram_checks=tally.hint_checks,
    )
    _finish(result, net, eval_clock, rank == 0, run_dir, summary_name, per_token_out, per_token, target_bytes)
    if rank == 0:
        log.info("eval_%s val_loss:%.8f val_bpb:%.8f targets:%d bytes:%d eval_time:%.0fms ttt_steps:%d guard:%s",
                 mode, result.val_loss, result.val_bpb, count, byte_sum, result.eval_time_s * 1000, steps,
                 "fired" if guard.fired else "no")
    dist.barrier()
    return result


def _evaluate_lora(cfg: Config, run_dir: Path, summary_name: str, per_token_out: Path | None, *, net: torch.nn.Module,
                   model: torch.nn.Module, tokens: torch.Tensor, tokens_np: np.ndarray, target_bytes: np.ndarray,
                   clock: EvalClock, source: Path, compile_mark: int) -> EvalResult:
    """EVAL_MODE=lora_ttt: documents, n-gram hints in score order, the phased LoRA loop, the reduce."""
    from pgolf.data.bpb import bits_per_byte
    from pgolf.evaluate.docs import plan_documents, score_time
    from pgolf.evaluate.phased import PhasedLoRA

    e, seq_len = cfg.eval, cfg.eval_seq_len
    if e.ttt_temperature != 1.0:  # #1855 scores raw logits; a silently ignored knob would mislead
        raise ConfigError(f"TTT_TEMPERATURE={e.ttt_temperature} is not supported by EVAL_MODE=lora_ttt; leave it at 1")
    rank, world_size, _, device = dist.distributed_context(cfg.train.device)
    comm = _comm_device(device)
    with clock.part("build"):
        plan = plan_documents(tokens_np, doc_batch=e.ttt_lora_doc_batch, chunk=e.ttt_lora_chunk,
                              short_chunks=e.ttt_lora_short_chunks, prefix_docs=e.ttt_phase_prefix_docs,
                              phases=e.ttt_phases)
        tally = DocTally(target_bytes, per_token_out is not None, plan.lo, plan.hi)
        compile_fn = None
        if compile_enabled(cfg.model.torch_compile, device):
            compile_fn = lambda purpose, fn, planned: maybe_compiled(  # noqa: E731
                purpose, fn, cfg.model.torch_compile, device, planned=planned)
    hints = time = None
    if e.ngram_tilt_enabled:  # on the eval clock, in the order the documents are scored (docs.score_time)
        with clock.part("ngram"):
            time = torch.from_numpy(score_time(plan)).to(device)
            doc_start = torch.from_numpy(np.repeat(plan.lo, plan.hi - plan.lo)).to(device)
            hints = build_hints(tokens, e.token_order, e.token_threshold, e.token_boost, time=time,
                                doc_start=doc_start)
            check_same_on_all_ranks(hints, comm)
    runner = PhasedLoRA(net=net, model=model, tokens=tokens, plan=plan, tally=tally, e=e, seq_len=seq_len, rank=rank,
                        world_size=world_size, clock=clock, comm_device=comm, hints=hints, time=time,
                        compile_fn=compile_fn)
    with clock.part("warmup"):
        if compile_fn is not None:
            runner.warm_up()
    n_targets = len(tokens_np) - 1
    if rank == 0:
        log.info("eval mode:lora_ttt targets:%d docs:%d batches:%d phases_at_batches:%s seq_len:%d world_size:%d "
                 "lora_params_per_doc:%d sites:%s source:%s", n_targets, plan.n_docs, len(plan.batches),
                 plan.phase_ends, seq_len, world_size, runner.lora.num_params_per_doc(), e.ttt_lora_sites, source)
    stats = runner.run()

    sums = dist.all_reduce_(torch.tensor([tally.nll_sum, tally.count, tally.byte_sum, stats.steps, stats.doc_steps,
                                          float(stats.stopped)], dtype=torch.float64, device=comm))
    nll_sum, count, byte_sum = float(sums[0]), int(sums[1]), int(sums[2])
    if count != n_targets or byte_sum != int(target_bytes.sum(dtype=np.int64)):
        raise AssertionError(f"scored {count} of {n_targets} targets ({byte_sum} bytes); the document plan is broken")
    tally.merge(lambda t: dist.all_reduce_(t.to(comm), "max").cpu())
    if not np.array_equal(tally.upto, plan.hi):  # every document scored to its end, once
        raise AssertionError("some document was not scored to its end")
    per_token = None
    if tally.per_token is not None:  # each target was written by exactly one rank: the sum is exact
        per_token = dist.all_reduce_(torch.from_numpy(tally.per_token).to(comm)).cpu().numpy()
    result = EvalResult(
        mode="lora_ttt", val_loss=nll_sum / count, val_bpb=bits_per_byte(nll_sum, byte_sum), targets=count,
        bytes=byte_sum, eval_time_s=0.0, ttt_steps=int(sums[3]), guard_fired=bool(sums[5]), guard_reason=stats.reason,
        expected_targets=n_targets, score_first_checks=tally.checks, seq_len=seq_len, world_size=world_size,
        source=str(source), eval_max_seconds=e.eval_max_seconds, compiles=compile_counts(compile_mark),
        ngram_hinted=hints.fired if hints is not None else 0, ngram_checks=tally.hint_checks, docs=plan.n_docs,
        doc_batches=len(plan.batches), lora_doc_steps=int(sums[4]), lora_params_per_doc=runner.lora.num_params_per_doc(),
        phases_run=stats.phases, phase_steps=stats.phase_steps, phase_tokens=stats.phase_tokens,
    )
    _finish(result, net, clock, rank == 0, run_dir, summary_name, per_token_out, per_token, target_bytes)
    if rank == 0:
        log.info("eval_lora_ttt val_loss:%.8f val_bpb:%.8f targets:%d bytes:%d eval_time:%.0fms lora_steps:%d "
                 "phases:%d phase_steps:%d guard:%s", result.val_loss, result.val_bpb, count, byte_sum,
                 result.eval_time_s * 1000, result.ttt_steps, stats.phases, stats.phase_steps,
                 "fired" if result.guard_fired else "no")
    dist.barrier()
    return result


# ---------------------------------------------------------------------------------------------
# outputs


def _finish(result: EvalResult, net: torch.nn.Module, clock: Any, is_main: bool, run_dir: Path, summary_name: str,
            per_token_out: Path | None, per_token: np.ndarray | None, target_bytes: np.ndarray) -> None:
    """Every mode's last steps: learned caps, the audit file, the clock's total and parts, the summary."""
    if isinstance(net, AsymLogitHead):
        result.softcap_pos, result.softcap_neg = net.softcap_pos.item(), net.softcap_neg.item()
    if is_main and per_token_out is not None:
        write_per_token(Path(per_token_out), per_token, target_bytes)
    result.eval_time_s = clock.elapsed()
    result.parts = {k: round(v, 4) for k, v in clock.parts.items()}
    if is_main:
        write_summary(run_dir, summary_name, result, per_token_out)


def write_per_token(path: Path, nll: np.ndarray | None, target_bytes: np.ndarray) -> None:
    """The audit trail: nll (float32, nats) and bytes (int32) for every target, in stream order."""
    assert nll is not None and nll.shape == target_bytes.shape
    atomic_write(path, lambda fh: np.savez(fh, nll=nll.astype(np.float32), bytes=target_bytes.astype(np.int32)))


def write_summary(run_dir: Path, name: str, result: EvalResult, per_token_out: Path | None) -> None:
    """run_dir/name (atomic) and one `eval` event appended to run_dir/metrics.jsonl."""
    payload = asdict(result)
    payload["per_token_out"] = str(per_token_out) if per_token_out else None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / name, payload, default=None)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": "eval", "summary": name, **payload}, sort_keys=True) + "\n")
