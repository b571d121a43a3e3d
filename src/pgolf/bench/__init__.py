"""Measurement helpers shared by `bench/cpu.py` (`make bench`) and `bench/gpu_check.py` (`make gpu-check`).

    at_shape(stack, shape, steps)    a preset's stack (architecture, optimizer, quantizer) at another
                                     preset's size (layers, width, sequence, batch, steps)
    train_flops_per_token(...)       model FLOPs for MFU (matmuls + causal attention, PaLM-style)
    peak_bf16_flops(name)            dense bf16 peak of a GPU, by its CUDA device name
    project_train / project_eval     8-GPU projections from one-GPU measurements + an all-reduce model
    StepRunner                       one model + its optimizers; times micro-steps and optimizer steps
    format_table / write_json        the plain-text table and the atomic JSON file both scripts print

Only `pgolf.config` is imported at module level; torch is imported where it is used, so the pure
parts (shapes, FLOPs, projections, tables) work anywhere and are unit-tested on CPU.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from pgolf import config as cfgmod
from pgolf.config import Config

# ---------------------------------------------------------------------------------------------
# a stack at a shape

# fields that define a preset's SIZE; everything else (activations, VR, gates, BigramHash/SmearGate on or
# off, XSA, RoPE dims, LN scale, learning rates, decays, clip, QAT, quantizer) is the preset's STACK
SHAPE_MODEL = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads")
SHAPE_TRAIN = ("iterations", "train_batch_tokens", "train_seq_len", "micro_batch_seqs", "max_wallclock_seconds",
               "warmup_steps", "warmdown_iters", "muon_momentum_warmup_steps", "val_loss_every", "val_batch_size",
               "train_log_every", "checkpoint_every_seconds", "device")
SHAPE_EVAL = ("eval_seq_len", "eval_stride", "eval_batch_seqs", "ttt_chunk_tokens", "ttt_batch_seqs", "ttt_epochs",
              "eval_max_seconds")
SHAPE_QUANT = ("calib_batches",)


def at_shape(stack: str, shape: str | None, steps: int | None = None) -> Config:
    """Preset `stack` with the size of preset `shape` (None or == stack: the preset as is).

    Size = SHAPE_* fields plus: BigramHash width/buckets and the XSA depth of the shape (only where the
    stack has them on), the GPTQ reserve (only where the stack calibrates) and the EMA decay (only where
    the stack has EMA). A NTK RoPE reference length scales with the sequence length, so the seed's
    "always rescaled at 2048 with ref 1024" stays true at 256. `steps` sets ITERATIONS and rescales the
    warm-down, the Muon momentum warm-up and the EMA decay (1 - 1/(0.1 steps), docs tiny-scale.md).
    PASSTHROUGH_MAX_NUMEL scales with width² (see `_scaled_passthrough`). So `at_shape("seed-plus",
    "tiny")` is the `tiny` preset under the name "seed-plus" (a test checks it).
    """
    base = cfgmod.resolve(stack, env={})
    if shape is None or shape == stack:
        cfg = base
        size = base
    else:
        size = cfgmod.resolve(shape, env={})
        m, t, sm, st = base.model, base.train, size.model, size.train
        model = {f: getattr(sm, f) for f in SHAPE_MODEL}
        if m.bigram_buckets:
            model.update(bigram_buckets=sm.bigram_buckets or m.bigram_buckets, bigram_dim=sm.bigram_dim)
        if m.xsa_last_n:
            model["xsa_last_n"] = sm.xsa_last_n or min(m.xsa_last_n, sm.num_layers)
        head_dim = sm.model_dim // sm.num_heads
        if m.rope_dims > head_dim:
            model["rope_dims"] = head_dim
        if m.rope_ntk_ref_len:
            model["rope_ntk_ref_len"] = max(1, m.rope_ntk_ref_len * st.train_seq_len // t.train_seq_len)
        if m.num_loops or m.parallel_lanes:
            model.update(_depth_layout(m, sm.num_layers))
        train = {f: getattr(st, f) for f in SHAPE_TRAIN}
        if t.train_seq_schedule:
            train["train_seq_schedule"] = st.train_seq_schedule or _scaled_seq_schedule(t, st)
        train["gptq_reserve_seconds"] = st.gptq_reserve_seconds if base.quant.quant_method == "gptq" else 0.0
        train["ema_decay"] = st.ema_decay if t.ema_decay > 0 else 0.0
        cfg = replace(
            base,
            data=size.data,
            model=replace(m, **model),
            train=replace(t, **train),
            quant=replace(base.quant, **{f: getattr(size.quant, f) for f in SHAPE_QUANT},
                          passthrough_max_numel=_scaled_passthrough(base, size)),
            eval=replace(base.eval, **{f: getattr(size.eval, f) for f in SHAPE_EVAL}),
        )
    if steps is not None and steps != cfg.train.iterations:
        t0 = size.train
        frac_warmdown = t0.warmdown_iters / max(t0.iterations, 1)
        frac_momentum = t0.muon_momentum_warmup_steps / max(t0.iterations, 1)
        cfg = replace(cfg, train=replace(
            cfg.train, iterations=steps,
            warmdown_iters=max(1, round(frac_warmdown * steps)),
            muon_momentum_warmup_steps=max(1, round(frac_momentum * steps)),
            ema_decay=(1 - 1 / max(0.1 * steps, 2.0)) if cfg.train.ema_decay > 0 else 0.0,
        ))
    return cfg


def _depth_layout(m, num_layers: int) -> dict[str, int]:
    """The looped span and the first parallel layer at the same relative depths in `num_layers` layers
    (11 -> 4: loop 3..5 -> 1..2, lanes 8 -> 3; the frontier-tiny and frontier-debug presets' own choices)."""
    at = lambda layer: min(num_layers - 1, round(layer * num_layers / m.num_layers))  # noqa: E731
    return {"loop_start": at(m.loop_start), "loop_end": at(m.loop_end),
            "parallel_start_layer": at(m.parallel_start_layer)}


def _scaled_seq_schedule(t, size) -> str:
    """TRAIN_SEQ_SCHEDULE with every length scaled to the shape's TRAIN_SEQ_LEN (same stage ends), each
    rounded down to a divisor of the shape's micro-batch tokens (their count per step stays fixed)."""
    from pgolf.config import parse_seq_schedule

    micro = size.micro_batch_seqs * size.train_seq_len
    fit = lambda n: max(d for d in range(1, n + 1) if micro % d == 0)  # noqa: E731
    stages = parse_seq_schedule(t.train_seq_schedule, t.train_seq_len)
    return ",".join(f"{fit(max(2, n * size.train_seq_len // t.train_seq_len))}@{end:g}" for end, n in stages)


def _scaled_passthrough(stack: Config, size: Config) -> int:
    """PASSTHROUGH_MAX_NUMEL scaled with width²: at full size (d=512) every block matrix is above the
    65,536 bound and gets quantized; at d=128 the same bound would pass every matrix through as fp16
    and leave GPTQ nothing to calibrate. Only shrinks (a wider shape keeps the stack's bound)."""
    ratio = min(1.0, size.model.model_dim / stack.model.model_dim) ** 2
    return max(1, round(stack.quant.passthrough_max_numel * ratio))


def describe_shape(cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    return (f"{m.num_layers} layers x {m.model_dim} wide, {m.num_heads} heads / {m.num_kv_heads} KV, vocab "
            f"{m.vocab_size}, seq {t.train_seq_len}, {t.train_batch_tokens:,} tokens/step, {t.iterations} steps")


# ---------------------------------------------------------------------------------------------
# FLOPs and peaks


def matmul_params(m: cfgmod.ModelConfig) -> int:
    """Weights that take part in a matmul once per token: q, k, v, o, gate, MLP, BigramHash proj, head.

    The embedding gather and the BigramHash table lookup are not matmuls; the tied head is (V x d)."""
    d, hd = m.model_dim, m.head_dim
    per_layer = d * m.num_heads * hd * 2 + d * m.num_kv_heads * hd * 2 + 2 * d * m.mlp_hidden
    if m.gated_attention:
        per_layer += d * m.num_heads
    total = m.num_layers * per_layer + m.vocab_size * d
    if m.bigram_buckets:
        total += m.bigram_dim * d
    return total


def attention_flops_per_token(m: cfgmod.ModelConfig, seq_len: int) -> float:
    """Forward QKᵀ + AV FLOPs per token with a causal mask: 2·L·H·hd·T (half of the full-matrix 4·L·H·hd·T)."""
    return 2.0 * m.num_layers * m.num_heads * m.head_dim * seq_len


def train_flops_per_token(m: cfgmod.ModelConfig, seq_len: int) -> float:
    """Forward + backward = 3 x forward: 6·N_matmul + 6·L·H·hd·T (PaLM appendix B, causal attention)."""
    return 6.0 * matmul_params(m) + 3.0 * attention_flops_per_token(m, seq_len)


def forward_flops_per_token(m: cfgmod.ModelConfig, seq_len: int) -> float:
    return 2.0 * matmul_params(m) + attention_flops_per_token(m, seq_len)


# dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets, TFLOP/s
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (CUDA name "NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of a GPU by its CUDA name (first match in PEAK_BF16_TFLOPS), None if unknown."""
    name = device_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------------------
# 8-GPU projections


@dataclass(frozen=True)
class Cluster:
    """What the projection assumes about the 8-GPU node (not measured on one GPU)."""

    gpus: int = 8
    # NCCL all-reduce bus bandwidth on 8 x H100 SXM (NVLink 4 + NVSwitch); nccl-tests reach ~450 GB/s
    # for 100 MB+ messages, 400 leaves room for the smaller ones
    busbw_gbs: float = 400.0
    latency_ms: float = 0.05  # per collective
    train_cap_s: float = 600.0
    eval_cap_s: float = 600.0


def allreduce_ms(nbytes: float, cluster: Cluster) -> float:
    """Ring all-reduce time: latency + 2(n-1)/n · bytes / bus bandwidth (nccl-tests' busbw definition)."""
    n = cluster.gpus
    if n <= 1 or nbytes <= 0:
        return 0.0
    return cluster.latency_ms + 2.0 * (n - 1) / n * nbytes / (cluster.busbw_gbs * 1e9) * 1e3


def sliding_window_count(n_targets: int, seq_len: int, stride: int) -> int:
    """len(pgolf.evaluate.plan_windows(n_targets + 1, seq_len, stride)), without building the list."""
    if n_targets <= seq_len:
        return 1
    regular = 1 + (n_targets - seq_len) // stride
    return regular + (1 if (regular - 1) * stride + seq_len < n_targets else 0)


DDP_BUCKET_BYTES = 25 * 2**20  # the trainer's DDP bucket cap (pgolf.train.loop.data_parallel)


def project_train(*, micro_ms: float, opt_ms: float, ns_ms: float, grad_bytes: float, muon_bytes: float,
                  train_batch_tokens: int, micro_batch_seqs: int, seq_len: int, gptq_reserve_s: float,
                  flops_per_token: float, peak_flops: float | None, cluster: Cluster = Cluster(),
                  grad_buckets: int | None = None) -> dict[str, Any]:
    """One 8-GPU optimizer step from one-GPU parts.

    step = accum·micro + (opt - NS) + NS/gpus + exposed all-reduce(grads) + all-reduce(Muon updates):
    DDP all-reduces gradient buckets while the backward runs, so only the last bucket's all-reduce is
    left after it (`grad_buckets` = ceil(grad_bytes / DDP_BUCKET_BYTES) by default; 1 = the flat
    all-reduce after backward of the previous trainer). Muon's Newton-Schulz work is split over the
    ranks and its bf16 updates all-reduced; the elementwise optimizer work is not split.
    """
    per_micro = cluster.gpus * micro_batch_seqs * seq_len
    accum = max(1, math.ceil(train_batch_tokens / per_micro))
    buckets = grad_buckets or max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES))
    comm = allreduce_ms(grad_bytes / buckets, cluster) + allreduce_ms(muon_bytes, cluster)
    step_ms = accum * micro_ms + max(opt_ms - ns_ms, 0.0) + ns_ms / cluster.gpus + comm
    cap_ms = 1000.0 * (cluster.train_cap_s - gptq_reserve_s)
    tok_s = train_batch_tokens / (step_ms / 1000.0)
    mfu = tok_s * flops_per_token / (cluster.gpus * peak_flops) if peak_flops else None
    return {
        "gpus": cluster.gpus, "grad_accum_steps": accum, "step_ms": step_ms, "allreduce_ms": comm,
        "grad_buckets": buckets,
        "steps_in_cap": int(cap_ms // step_ms), "train_cap_s": cluster.train_cap_s - gptq_reserve_s,
        "tokens_per_s": tok_s, "tokens_in_cap": int(cap_ms // step_ms) * train_batch_tokens, "mfu": mfu,
    }


def project_eval(*, n_targets: int, seq_len: int, stride: int, windows_per_s: float, warmup_s: float,
                 chunk_tokens: int, ttt_epochs: int, ttt_batch_seqs: int, ttt_step_ms: float | None,
                 trainable_bytes: float, ttt_warmup_s: float = 0.0, cluster: Cluster = Cluster()) -> dict[str, Any]:
    """Full sliding-window and score-first TTT eval times on `cluster.gpus` GPUs.

    `windows_per_s` is one GPU's scoring rate; `ttt_step_ms` one GPU's optimizer step on its share
    (ttt_batch_seqs / gpus sequences). Each TTT step adds an all-reduce of the trainable gradients.
    Warm-up (compiling the scoring graph, plus the training graph for TTT) is on the eval clock.
    """
    g = cluster.gpus
    windows = sliding_window_count(n_targets, seq_len, stride)
    sliding_s = windows / (g * windows_per_s)
    out: dict[str, Any] = {"gpus": g, "val_targets": n_targets, "windows": windows, "warmup_s": warmup_s,
                           "sliding_score_s": sliding_s, "sliding_total_s": warmup_s + sliding_s}
    if ttt_step_ms is not None:
        n_chunks = max(1, math.ceil(n_targets / chunk_tokens))
        seqs = math.ceil(chunk_tokens / seq_len)
        steps_per_chunk = ttt_epochs * math.ceil(seqs / ttt_batch_seqs)
        step_ms = ttt_step_ms + allreduce_ms(trainable_bytes, cluster)
        adapt_s = steps_per_chunk * step_ms / 1000.0
        score_s = windows / n_chunks / (g * windows_per_s)
        total = warmup_s + ttt_warmup_s + n_chunks * score_s + (n_chunks - 1) * adapt_s
        out.update(ttt_chunks=n_chunks, ttt_steps_per_chunk=steps_per_chunk, ttt_chunk_score_s=score_s,
                   ttt_chunk_adapt_s=adapt_s, ttt_chunk_s=score_s + adapt_s, ttt_total_s=total,
                   ttt_fits_cap=total <= cluster.eval_cap_s)
    return out


# ---------------------------------------------------------------------------------------------
# timing one model's training steps


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepRunner:
    """A model and its optimizers at `cfg`, fed random tokens; times fwd+bwd micro-steps and optimizer steps.

    Weights change as it steps (real optimizer updates), so the timed work is the trainer's own.
    """

    cfg: Config
    device: Any = "cpu"
    compile: bool | None = None  # None: the config's TORCH_COMPILE rule (on for CUDA)
    model: Any = field(init=False)
    model_fn: Any = field(init=False)
    opts: Any = field(init=False)

    def __post_init__(self) -> None:
        import torch

        from pgolf.model.compiled import maybe_compiled
        from pgolf.model import build_model
        from pgolf.train.optim import build_optimizers

        self.device = torch.device(self.device)
        torch.manual_seed(self.cfg.train.seed)
        self.model = build_model(self.cfg.model, self.device)
        setting = self.cfg.model.torch_compile if self.compile is None else ("on" if self.compile else "off")
        qat = self.cfg.train.late_qat_threshold > 0
        self.model_fn = maybe_compiled("train_step", self.model.loss, setting, self.device, planned=2 if qat else 1,
                                       state=lambda: {"qat": self.model.qat_enabled})
        self.opts = build_optimizers(self.model.param_groups(), self.cfg.train, self.cfg.model.tie_embeddings,
                                     torch_compile=setting)
        self.gen = torch.Generator().manual_seed(self.cfg.train.seed)

    @property
    def micro_tokens(self) -> int:
        return self.cfg.train.micro_batch_seqs * self.cfg.train.train_seq_len

    @property
    def accum(self) -> int:
        return max(1, self.cfg.train.train_batch_tokens // self.micro_tokens)

    def batch(self):
        import torch

        t = self.cfg.train
        xy = torch.randint(0, self.cfg.model.vocab_size, (t.micro_batch_seqs, t.train_seq_len + 1), generator=self.gen)
        return xy[:, :-1].to(self.device), xy[:, 1:].to(self.device)

    def micro_step(self) -> float:
        """One forward + backward of MICRO_BATCH_SEQS x TRAIN_SEQ_LEN (bf16 autocast on CUDA); seconds."""
        import contextlib

        import torch

        x, y = self.batch()
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        sync(self.device)
        t0 = time.perf_counter()
        with ctx:
            loss = self.model_fn(x, y)
        (loss / self.accum).backward()
        sync(self.device)
        return time.perf_counter() - t0

    def opt_step(self) -> float:
        """Clip + every optimizer's step + zero_grad; seconds."""
        sync(self.device)
        t0 = time.perf_counter()
        self.opts.clip_grad_norm()
        self.opts.step()
        self.opts.zero_grad()
        sync(self.device)
        return time.perf_counter() - t0

    def step(self) -> float:
        """A whole optimizer step (accum micro-steps + optimizer), seconds."""
        return sum(self.micro_step() for _ in range(self.accum)) + self.opt_step()

    def newton_schulz_s(self) -> float:
        """Seconds of Muon's Newton-Schulz iterations alone over every matrix (the part ranks split), through
        the optimizer's own (compiled when TORCH_COMPILE is on) orthogonalization."""
        from pgolf.train.optim import Muon

        muon = next(opt for opt in self.opts.optimizers if isinstance(opt, Muon))
        mats = [p for g in muon.param_groups for p in g["params"]]
        sync(self.device)
        t0 = time.perf_counter()
        for p in mats:
            muon.orthogonalize(p.detach().float(), muon.ns_dtype)
        sync(self.device)
        return time.perf_counter() - t0

    def grad_bytes(self) -> tuple[int, int]:
        """(bytes all-reduced for gradients, bytes of Muon's bf16 update buffer) at this config."""
        from pgolf.train.optim import Muon

        grads = sum(p.numel() * p.element_size() for p in self.model.parameters())
        muon = sum(p.numel() * 2 for opt in self.opts.optimizers if isinstance(opt, Muon) for g in opt.param_groups
                   for p in g["params"])
        return grads, muon


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def interleaved(runners: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each timer in turn for `rounds` rounds (after `warmup` untimed rounds): A B A B ...

    Interleaving keeps a shared, noisy machine's slow spells from landing on one side of a ratio."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            times[name].append(fn())
    return times


# ---------------------------------------------------------------------------------------------
# output


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ints with separators; floats by size (1,234 / 123.4 / 12.34 / 1.2345 / 1.234e-05);
    None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        a = abs(value)
        if not math.isfinite(value):
            return str(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.1f}"
        if a >= 10:
            return f"{value:.2f}"
        if a >= 10 ** -(digits - 1) or a == 0:
            return f"{value:.{digits}f}"
        return f"{value:.{digits - 1}e}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Aligned plain-text table (or a GitHub markdown table); first column left, the rest right."""
    cells = [[fmt(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for r in cells:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    if isinstance(obj, float):
        return None
    return str(obj)


def _clean(obj: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no literal for them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Atomic (temp + rename) pretty JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(_clean(payload), indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def utc_stamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))
