"""One frozen config tree for every stage, with named presets.

Resolution order: preset < environment variables < CLI flags. Every field's environment name is its
own name in upper case (`num_layers` <-> `NUM_LAYERS`), which keeps the upstream parameter-golf
names (`SEED`, `DATA_PATH`, `ITERATIONS`, `TTT_LR`, ...) working. Field names are unique across
sections, so one flat namespace serves env vars, CLI flags (`--num-layers`) and `config.json`.

This is the only module that reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping

from pgolf.errors import ConfigError

SIZE_CAP_BYTES = 16_000_000  # the challenge's artifact cap (decimal bytes)


@dataclass(frozen=True)
class DataConfig:
    data_path: str = "data/datasets/fineweb10B_sp1024"  # folder of fineweb_{train,val}_*.bin
    tokenizer_path: str = "data/tokenizers/fineweb_1024_bpe.model"  # SentencePiece model
    dataset_id: str = "willdepueoai/parameter-golf/fineweb10B_sp1024"  # recorded in environment.json
    data_uri: str = ""  # s3://… or file://… mirror holding staged shards (cloud runs)
    train_shards: int = 80  # how many train shards `data fetch` downloads (80 = the full 8B tokens)
    data_variant: str = "sp1024"  # what `data fetch` gets by default: sp1024 | caseops8192 (CaseOps + byte sidecar)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4  # GQA: heads share KV in groups of num_heads / num_kv_heads
    mlp_mult: float = 3.0  # hidden = mlp_mult * model_dim
    mlp_activation: Literal["relu2", "leaky_relu2"] = "leaky_relu2"
    leaky_relu_slope: float = 0.5
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0  # logits = softcap * tanh(z / softcap)
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotary dims per head; 0 = the whole head (partial RoPE uses 16)
    rope_ntk_ref_len: int = 0  # >0: NTK-rescale the base when seq_len exceeds this (PR #490 used 1024)
    qk_gain_init: float = 1.5  # learned per-head gain on RMS-normed queries
    unet_skips: bool = True  # encoder/decoder halves with learned skip weights
    value_residual: bool = True  # layers >= 1 mix layer 0's raw V with learned lambdas
    gated_attention: bool = True  # per-head sigmoid gate on the attention output
    gate_bias_init: float = 4.0  # sigmoid(4) ~ 0.982: the gate starts almost open
    bigram_buckets: int = 4096  # BigramHash table rows; 0 disables BigramHash
    bigram_dim: int = 128
    # projection bigram_dim -> model_dim: PR #490 builds it only when the widths differ ("if_needed")
    bigram_proj: Literal["if_needed", "always"] = "if_needed"
    smear_gate: bool = True  # mix the previous position in
    # BigramHash and SmearGate never reach across a BOS (or into position 0); PR #490 has no such mask
    bos_mask: bool = False
    xsa_last_n: int = 0  # exclusive self-attention on the last N layers
    ln_scale: bool = False  # scale normalized branch inputs by 1/sqrt(layer+1), layer = physical index
    # ---- PR #1855's elements (technique-spec §2.1-2.4 column (b)); every one off here, on in `frontier*`
    # depth recurrence: physical layers LOOP_START..LOOP_END (inclusive) run NUM_LOOPS extra times once
    # looping is on (#1855: 3..5, 2 -> 17 block applications); 0 = off
    num_loops: int = 0
    loop_start: int = 3
    loop_end: int = 5
    # two residual lanes (attention / MLP) in the decoder from physical layer PARALLEL_START_LAYER on
    parallel_lanes: bool = False
    parallel_start_layer: int = 8
    # U-Net skips blended by a learned per-channel gate: x <- lerp(w*skip, x, sigmoid(g)), g init 0
    skip_gates: bool = False
    # sparse per-head attention gate on the first GATE_WINDOW channels: y_h <- sigmoid(0.5 w_h u[:12]) y_h
    sparse_attn_gate: bool = False
    # #1855's BOS-masked SmearGate on raw embeddings: x_t += lam*sigmoid(w x_t[:12]) x_{t-1} (not at BOS)
    bos_smear_gate: bool = False
    gate_window: int = 12  # input channels of the sparse attention gate and the BOS SmearGate (#1855: 12)
    # attention never crosses a BOS inside a packed row (FA3 varlen on CUDA, a block mask on SDPA)
    doc_isolation: bool = False
    # linear init: "default" keeps nn.Linear's own (upstream baseline); "orthogonal" is PR #490's rule,
    # orthogonal where both dims >= orthogonal_min_dim (the PR: 64), else left as drawn
    weight_init: Literal["default", "orthogonal"] = "orthogonal"
    orthogonal_min_dim: int = 64
    qat_bits: int = 6  # fake-quant width of block matrices once QAT is switched on (int6: [-32, 31])
    attention_backend: Literal["auto", "fa3", "sdpa"] = "auto"  # auto: FA3 on CUDA if importable
    torch_compile: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA, off for CPU

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_mult * self.model_dim))


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1337
    iterations: int = 9000  # upper bound; the wallclock cap normally stops training first
    train_batch_tokens: int = 786_432  # global tokens per optimizer step, whatever the world size
    train_seq_len: int = 2048
    micro_batch_seqs: int = 48  # sequences per forward on one rank; accumulation fills the rest
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    gptq_reserve_seconds: float = 8.0  # quantizer calibration must fit inside the cap
    warmup_steps: int = 20  # compile-priming steps; weights, optimizer and loader restored after
    warmdown_iters: int = 1200  # LR decays linearly over the last warmdown_iters * step_avg of the cap
    # >0: the warmdown by training progress instead (#1855/#2014's WARMDOWN_FRAC): LR mult 1 while
    # progress < 1 - WARMDOWN_FRAC, then (1 - progress) / WARMDOWN_FRAC; overrides WARMDOWN_ITERS.
    # progress = the further along of elapsed / (cap - reserve) and step / ITERATIONS (pgolf.train.schedule)
    warmdown_frac: float = 0.0
    min_lr: float = 0.0  # floor of the LR multiplier (#1855: 0.10); 0 = decay to zero
    # training context grown by progress (#2014): "LEN@END,..." = LEN while progress <= END, e.g.
    # "1024@0.1,2048@0.7,3072@1.0"; empty = TRAIN_SEQ_LEN throughout. Tokens per step stay constant
    # (sequences per micro-batch adapt); the largest LEN must equal TRAIN_SEQ_LEN
    train_seq_schedule: str = ""
    seq_change_warmup_steps: int = 0  # LR ramps up again over this many steps after a length change (#2014: 32)
    matrix_lr: float = 0.025  # Muon
    scalar_lr: float = 0.025  # AdamW on vectors, gains, mixes
    tied_embed_lr: float = 0.035  # AdamW on the tied embedding and the bigram table
    embed_lr: float = 0.6  # untied input embedding (baseline-style untied runs only)
    head_lr: float = 0.008  # untied output head
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_ns_coeffs: Literal["classic", "polar_express"] = "classic"
    muon_ns_dtype: Literal["bf16", "fp32"] = "bf16"  # Newton-Schulz precision; both sources: bf16 everywhere
    muon_wd: float = 0.04
    # each row of the Nesterov update scaled to unit L2 norm before Newton-Schulz (#1855's MUON_ROW_NORMALIZE)
    muon_row_normalize: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.04
    # the embedding and scalar AdamW groups' own decay and beta2 (#1855: embed 0.085 / 0.99, scalar 0.02 /
    # 0.99); -1 = ADAM_WD / ADAM_BETA2, so the seed's shared values stay one knob
    embed_wd: float = -1.0
    embed_beta2: float = -1.0
    scalar_wd: float = -1.0
    scalar_beta2: float = -1.0
    grad_clip_norm: float = 0.3  # 0 = off
    ema_decay: float = 0.997  # 0 = off; the EMA weights are what ships
    late_qat_threshold: float = 0.0  # >0: int6 fake-quant once the LR multiplier drops below it
    # depth recurrence (NUM_LOOPS > 0): the training fraction (max of step/ITERATIONS and elapsed/cap) at
    # which looping switches on (#1855: 0.35); 0 = from the first step. A training knob, not the model's:
    # evaluation always runs a recurrent model looped, and artifacts do not record it.
    enable_looping_at: float = 0.35
    val_loss_every: int = 1000  # 0 = only at the end; the train clock pauses during validation
    val_batch_size: int = 524_288  # tokens per validation forward batch (all ranks together)
    train_log_every: int = 200
    checkpoint_every_seconds: float = 0.0  # >0: resumable checkpoints (unlimited-compute track)
    device: str = "auto"  # auto: cuda if available, else cpu


@dataclass(frozen=True)
class QuantConfig:
    quant_method: Literal["gptq", "rtn"] = "gptq"
    matrix_bits: int = 6  # block matrices
    embed_bits: int = 8  # tied embedding / bigram table
    # per-row scale: clip search, k * std, or the percentile clip of the baseline's int8 (EMBED_CLIP_PERCENTILE)
    row_clip: Literal["search", "sdclip", "percentile"] = "search"
    sdclip_k: float = 12.85  # SDClip sigmas of matrices without a role below (#1855's MATRIX_CLIP_SIGMAS)
    # per-role SDClip sigmas (#1855: MLP 11.5, attention 13.0, tied embedding 14.0); 0 = SDCLIP_K
    mlp_clip_sigmas: float = 0.0
    attn_clip_sigmas: float = 0.0
    embed_clip_sigmas: float = 0.0
    # row scales of the embedding-path tensors: the baseline's percentile clip, or SDClip (#1855's int7 tok_emb)
    embed_clip: Literal["percentile", "sdclip"] = "percentile"
    embed_clip_percentile: float = 99.99984
    # the tied embedding through GPTQ too, with the Hessian of the head's input (`final_norm` output)
    embed_gptq: bool = False
    passthrough_max_numel: int = 65_536  # tensors this small are stored as fp16
    # comma-separated fnmatch patterns: small 2-D tensors stored int8 per row (scale rowmax/127) instead of
    # fp16, e.g. #1855's 8x12 sparse attention gates; empty = none
    int8_row_tensors: str = ""
    prune_fraction: float = 0.0  # magnitude pruning before quantization
    lowrank_rank: int = 0  # >0: rank-k SVD correction of W - W_hat on the worst tensors (LQER; #1855: 4)
    lowrank_tensors: int = 0  # how many tensors, by largest ||W - W_hat||_F (#1855: 3)
    # factor storage: fp16, or asym = LQER's A as INT2 with one fp16 scale, B as INT4 with an fp16 scale
    # per LOWRANK_GROUP consecutive entries
    lowrank_packing: Literal["fp16", "asym"] = "fp16"
    lowrank_group: int = 64
    # AWQ-lite (#1908, #1945): the AWQ_LITE_GROUP_TOP_K most salient AWQ_LITE_GROUP_SIZE-column groups of the
    # whole model (act RMS x mean |w|) are quantized at AWQ_LITE_BITS inside the same GPTQ solve
    awq_lite_enabled: bool = False
    awq_lite_bits: int = 8
    awq_lite_group_top_k: int = 1
    awq_lite_group_size: int = 64
    gptq_block_size: int = 128
    gptq_damp: float = 0.01  # fraction of mean diag(H) added to the diagonal
    gptq_act_order: bool = True
    calib_source: Literal["train", "self"] = "train"  # self = text generated by the model itself
    calib_batches: int = 8
    # auto = the smallest of zlib/lzma/zstd/brotli; lrzip (ZPAQ, #2135) needs the lrzip binary where the
    # artifact is written AND read, so it is only tried when named: lrzip, or auto+lrzip (all five)
    compressor: Literal["auto", "zlib", "lzma", "zstd", "brotli", "lrzip", "auto+lrzip"] = "auto"
    # how sub-8-bit integers are stored: int8 containers, bit-packed, or auto = whichever compresses smaller
    q_layout: Literal["auto", "int8", "packed"] = "auto"
    # also try per-group streams (#2135's COMPRESSOR=pergroup): integers grouped by role across layers,
    # column-major, each group compressed on its own by the best compressor
    compress_groups: bool = False
    # grouped layout: roles whose rows are reordered by greedy nearest-neighbour chaining (L1), the
    # permutation stored (#2135: tok_emb,attn.c_q,mlp.fc); empty = no reordering
    sort_rows: str = ""
    size_cap_bytes: int = SIZE_CAP_BYTES


@dataclass(frozen=True)
class EvalConfig:
    eval_mode: Literal["rows", "sliding", "ttt", "lora_ttt"] = "ttt"
    eval_seq_len: int = 0  # 0 = train_seq_len
    eval_stride: int = 64
    eval_batch_seqs: int = 32  # windows per forward
    ttt_chunk_tokens: int = 131_072
    ttt_lr: float = 1e-4
    ttt_epochs: int = 3
    ttt_unfreeze_blocks: int = 2
    ttt_batch_seqs: int = 64  # sequences per TTT step across all ranks (seed: 8 ranks x 8 = one step per epoch)
    ttt_grad_clip: float = 1.0
    ttt_temperature: float = 1.0  # fixed divisor of the logits; never fitted on validation data
    eval_max_seconds: float = 600.0  # the eval clock includes loading and warm-up
    # token-only causal n-gram tilt (PR #1514; #2135's values): the hinted next token's logit gets
    # +TOKEN_BOOST where its share among the earlier continuations of the same context reaches TOKEN_THRESHOLD
    ngram_tilt_enabled: bool = False
    token_order: int = 16  # context = the last TOKEN_ORDER - 1 tokens
    token_threshold: float = 0.8
    token_boost: float = 2.625
    # AsymLogit (PR #1923): learnable positive / negative logit caps on the eval path, from LOGIT_SOFTCAP
    asym_logit_rescale: bool = False
    # phased score-first LoRA TTT (EVAL_MODE=lora_ttt, technique-spec §5.2 = PR #1855; deltas #1953/#2014/#2135
    # in the `frontier` preset): per-document LoRA on every block application, global SGD phases on a prefix
    ttt_lora_rank: int = 80
    ttt_lora_alpha: float = 144.0  # output scale alpha/rank = 1.8 (PR #1767)
    ttt_lora_sites: str = "q,k,v,o,mlp,head"  # adapter-hook sites; #1953/#2014 drop q and v
    ttt_lora_lr: float = 1e-4  # #1953: x0.75
    ttt_lora_beta1: float = 0.0  # #1855: no first moment
    ttt_lora_beta2: float = 0.99
    ttt_lora_eps: float = 1e-10
    ttt_lora_wd: float = 0.5
    ttt_lora_warm_start_a: bool = True  # keep A from the previous batch, zero B (PR #1767)
    ttt_lora_chunk: int = 48  # target positions per document per step
    ttt_lora_short_chunks: str = ""  # "LEN:CHUNK,...": smaller chunks for documents <= LEN (#2014: 256:8,2000:24)
    ttt_lora_doc_batch: int = 64  # documents per batch (per forward)
    ttt_phases: int = 3  # global SGD phases over the prefix (#1855: 3; #2135: 1); 0 = LoRA only
    ttt_phase_prefix_docs: int = 2500  # documents (in processing order) the phases cover
    ttt_phase_lr: float = 1e-3  # SGD, cosine over the phase's steps
    ttt_phase_momentum: float = 0.9
    ttt_phase_grad_clip: float = 1.0
    ttt_phase_batch_seqs: int = 16  # EVAL_SEQ_LEN rows per SGD step over all ranks (#1855: 16 x 2048)


@dataclass(frozen=True)
class RunConfig:
    run_id: str = ""  # default: <preset>-s<seed>-<UTC stamp>-<4 hex>
    runs_dir: str = "runs"
    results_uri: str = ""  # s3://bucket/prefix or file:///dir; empty = no sync
    sync_every_seconds: float = 30.0
    # longest wait for the store at the end of a run (and on SIGTERM): fits a spot VM's notice
    sync_deadline_seconds: float = 25.0
    image: str = ""  # docker image tag in use (recorded in environment.json)
    image_digest: str = ""


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "quant": QuantConfig,
    "eval": EvalConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class Config:
    preset: str = "seed"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def eval_seq_len(self) -> int:
        return self.eval.eval_seq_len or self.train.train_seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """Every field as NAME -> value (the env-var view), in section order."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            for f in fields(getattr(self, section)):
                out[f.name] = getattr(getattr(self, section), f.name)
        return out

    def with_overrides(self, **values: Any) -> "Config":
        """A copy with fields replaced by name (`cfg.with_overrides(num_layers=4)`)."""
        return apply_overrides(self, values)


# ---------------------------------------------------------------------------------------------
# validation


def _fail(msg: str) -> None:
    raise ConfigError(msg)


DAY_S = 86_400.0
LORA_SITES = ("q", "k", "v", "o", "mlp", "head")  # pgolf.model.adapters.SITES (a test checks they agree)
# Inclusive [low, high] of every numeric field (a test checks that none is missing). Bounds are
# what the code can run, not what is sensible: they turn a crash hours in, or a silent nonsense
# run, into one line before any work. Cross-field rules live in validate().
RANGES: dict[str, tuple[float, float]] = {
    "train_shards": (0, 100_000),
    "vocab_size": (2, 65_536), "num_layers": (1, 256), "model_dim": (2, 32_768),
    "num_heads": (1, 1024), "num_kv_heads": (1, 1024), "mlp_mult": (0.01, 64),
    "leaky_relu_slope": (0, 1), "tied_embed_init_std": (0, 10), "logit_softcap": (0, 1e4),
    "rope_base": (1, 1e12), "rope_dims": (0, 32_768), "rope_ntk_ref_len": (0, 1 << 24),
    "qk_gain_init": (0, 1e3), "gate_bias_init": (0, 100), "bigram_buckets": (0, 1 << 24),
    "bigram_dim": (1, 32_768), "xsa_last_n": (0, 256), "qat_bits": (2, 8),
    "orthogonal_min_dim": (0, 32_768),
    "num_loops": (0, 64), "loop_start": (0, 255), "loop_end": (0, 255), "enable_looping_at": (0, 1),
    "parallel_start_layer": (0, 256), "gate_window": (1, 32_768),
    "seed": (0, 2**32 - 1),  # numpy's seed range
    "iterations": (0, 10**9), "train_batch_tokens": (2, 1 << 34), "train_seq_len": (2, 1 << 20),
    "micro_batch_seqs": (1, 1 << 16), "max_wallclock_seconds": (0, 365 * DAY_S),
    "gptq_reserve_seconds": (0, DAY_S), "warmup_steps": (0, 10**6),
    "warmdown_iters": (0, 10**9), "warmdown_frac": (0, 1), "min_lr": (0, 1),
    "seq_change_warmup_steps": (0, 10**9), "embed_wd": (-1, 100), "embed_beta2": (-1, 1),
    "scalar_wd": (-1, 100), "scalar_beta2": (-1, 1), "matrix_lr": (0, 100), "scalar_lr": (0, 100),
    "tied_embed_lr": (0, 100), "embed_lr": (0, 100), "head_lr": (0, 100),
    "muon_momentum": (0, 1), "muon_momentum_warmup_start": (0, 1),
    "muon_momentum_warmup_steps": (0, 10**9), "muon_backend_steps": (1, 100),
    "muon_wd": (0, 100), "adam_beta1": (0, 1), "adam_beta2": (0, 1), "adam_eps": (1e-30, 1),
    "adam_wd": (0, 100), "grad_clip_norm": (0, 1e9), "ema_decay": (0, 1),
    "late_qat_threshold": (0, 1), "val_loss_every": (0, 10**9), "val_batch_size": (2, 1 << 34),
    "train_log_every": (0, 10**9), "checkpoint_every_seconds": (0, 365 * DAY_S),
    "matrix_bits": (2, 8), "embed_bits": (2, 8), "sdclip_k": (1e-3, 1e3),
    "embed_clip_percentile": (50, 100), "passthrough_max_numel": (0, 1 << 40),
    "prune_fraction": (0, 1), "lowrank_rank": (0, 1 << 16), "lowrank_tensors": (0, 1 << 20),
    "mlp_clip_sigmas": (0, 1e3), "attn_clip_sigmas": (0, 1e3), "embed_clip_sigmas": (0, 1e3),
    "lowrank_group": (1, 1 << 20), "awq_lite_bits": (3, 8), "awq_lite_group_top_k": (0, 1 << 20),
    "awq_lite_group_size": (1, 1 << 16),
    "gptq_block_size": (1, 1 << 16), "gptq_damp": (0, 100), "calib_batches": (1, 1 << 20),
    "size_cap_bytes": (1, 1 << 40),
    "eval_seq_len": (0, 1 << 20), "eval_stride": (1, 1 << 20), "eval_batch_seqs": (1, 1 << 16),
    "ttt_chunk_tokens": (1, 1 << 34), "ttt_lr": (0, 100), "ttt_epochs": (0, 10_000),
    "ttt_unfreeze_blocks": (0, 256), "ttt_batch_seqs": (1, 1 << 16), "ttt_grad_clip": (0, 1e9),
    "ttt_temperature": (1e-3, 1e3), "eval_max_seconds": (0, 365 * DAY_S),
    "token_order": (2, 1024), "token_threshold": (0, 1), "token_boost": (0, 100),
    "ttt_lora_rank": (1, 1 << 16), "ttt_lora_alpha": (0, 1e6), "ttt_lora_lr": (0, 100), "ttt_lora_beta1": (0, 0.999999),
    "ttt_lora_beta2": (0, 0.999999), "ttt_lora_eps": (1e-30, 1), "ttt_lora_wd": (0, 1e4),
    "ttt_lora_chunk": (1, 1 << 20), "ttt_lora_doc_batch": (1, 1 << 16), "ttt_phases": (0, 1000),
    "ttt_phase_prefix_docs": (0, 1 << 31), "ttt_phase_lr": (0, 100), "ttt_phase_momentum": (0, 1),
    "ttt_phase_grad_clip": (0, 1e9), "ttt_phase_batch_seqs": (1, 1 << 16),
    "sync_every_seconds": (0, DAY_S), "sync_deadline_seconds": (0.1, DAY_S),
}


def _check_ranges(cfg: Config) -> None:
    """Every number finite (NaN and inf are refused everywhere) and inside its RANGES entry."""
    for name, value in cfg.flat().items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            _fail(f"{name.upper()}={value} is not a finite number")
        low, high = RANGES.get(name, (0, math.inf))
        if not low <= value <= high:
            shown = f"{value:g}" if abs(value) >= 1e15 else value
            _fail(f"{name.upper()}={shown} is out of range: use a value from {_num(low)} "
                  f"to {_num(high)}")


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def parse_seq_schedule(text: str, default_len: int) -> list[tuple[float, int]]:
    """TRAIN_SEQ_SCHEDULE "LEN@END,..." -> [(END, LEN)] sorted by END, the last END 1.0 (#2014's syntax):
    LEN is used while training progress <= END. Empty -> [(1.0, default_len)]."""
    plan: list[tuple[float, int]] = []
    for stage in (s.strip() for s in text.split(",")):
        if not stage:
            continue
        length, sep, end = stage.partition("@")
        try:
            if not sep:
                raise ValueError(stage)
            seq_len, frac = int(length), float(end)
        except ValueError:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE stage {stage!r} is not LEN@END (e.g. 1024@0.1)") from None
        if seq_len < 2 or not 0 < frac <= 1:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE stage {stage!r}: LEN must be >= 2 and END in (0, 1]")
        plan.append((frac, seq_len))
    if not plan:
        return [(1.0, default_len)]
    plan.sort()
    if len({f for f, _ in plan}) != len(plan):
        raise ConfigError(f"TRAIN_SEQ_SCHEDULE={text!r} names one END twice")
    if plan[-1][0] < 1.0:
        plan.append((1.0, plan[-1][1]))
    return plan


def _check_seq_schedule(t: TrainConfig) -> None:
    plan = parse_seq_schedule(t.train_seq_schedule, t.train_seq_len)
    lengths = {n for _, n in plan}
    if max(lengths) != t.train_seq_len:
        _fail(f"TRAIN_SEQ_SCHEDULE={t.train_seq_schedule!r} grows to {max(lengths)}, but TRAIN_SEQ_LEN="
              f"{t.train_seq_len}: set TRAIN_SEQ_LEN to the longest stage (validation, calibration and "
              "memory checks are sized by it)")
    micro = t.micro_batch_seqs * t.train_seq_len  # tokens per micro-batch and rank, whatever the stage
    bad = sorted(n for n in lengths if micro % n)
    if bad:
        _fail(f"TRAIN_SEQ_SCHEDULE lengths {bad} do not divide the {micro} tokens of a micro-batch "
              f"(MICRO_BATCH_SEQS={t.micro_batch_seqs} x TRAIN_SEQ_LEN={t.train_seq_len}); the token count "
              "per step stays fixed, so every length must divide it")


def validate(cfg: Config) -> None:
    m, t, q, e = cfg.model, cfg.train, cfg.quant, cfg.eval
    _check_ranges(cfg)
    if m.num_heads < 1 or m.model_dim % m.num_heads:
        _fail(f"MODEL_DIM={m.model_dim} is not divisible by NUM_HEADS={m.num_heads}")
    if m.num_kv_heads < 1 or m.num_heads % m.num_kv_heads:
        _fail(f"NUM_HEADS={m.num_heads} is not a multiple of NUM_KV_HEADS={m.num_kv_heads}")
    if m.head_dim % 2:
        _fail(f"head dim MODEL_DIM/NUM_HEADS={m.head_dim} must be even for RoPE")
    if m.rope_dims % 2 or m.rope_dims > m.head_dim:
        _fail(f"ROPE_DIMS={m.rope_dims} must be even and <= head dim {m.head_dim} (0 = all)")
    if m.xsa_last_n > m.num_layers:
        _fail(f"XSA_LAST_N={m.xsa_last_n} exceeds NUM_LAYERS={m.num_layers}")
    if m.num_layers < 1 or m.vocab_size < 2 or m.mlp_hidden < 1:
        _fail("NUM_LAYERS, VOCAB_SIZE and MLP_MULT*MODEL_DIM must be positive")
    if m.vocab_size > 65_536:
        _fail(f"VOCAB_SIZE={m.vocab_size} does not fit the uint16 shard format (max 65536)")
    if m.num_loops and not m.loop_start <= m.loop_end < m.num_layers:
        _fail(f"LOOP_START={m.loop_start}..LOOP_END={m.loop_end} must be a span inside NUM_LAYERS={m.num_layers}")
    if m.parallel_lanes and m.num_loops and m.parallel_start_layer <= m.loop_end:
        _fail(f"PARALLEL_START_LAYER={m.parallel_start_layer} must come after the looped span (LOOP_END={m.loop_end})")
    if (m.sparse_attn_gate or m.bos_smear_gate) and m.gate_window > min(m.model_dim, 32_768):
        _fail(f"GATE_WINDOW={m.gate_window} exceeds MODEL_DIM={m.model_dim}")
    if m.smear_gate and m.bos_smear_gate:
        _fail("SMEAR_GATE and BOS_SMEAR_GATE are two variants of one element; switch one off")
    if m.gated_attention and m.sparse_attn_gate:
        _fail("GATED_ATTENTION and SPARSE_ATTN_GATE are two variants of one element; switch one off")
    if m.bigram_buckets and m.bigram_buckets < 2:
        _fail(f"BIGRAM_BUCKETS={m.bigram_buckets} must be 0 (off) or >= 2")
    if t.train_batch_tokens < t.train_seq_len or t.train_batch_tokens % t.train_seq_len:
        _fail(
            f"TRAIN_BATCH_TOKENS={t.train_batch_tokens} is not a multiple of "
            f"TRAIN_SEQ_LEN={t.train_seq_len}"
        )
    if t.micro_batch_seqs < 1:
        _fail("MICRO_BATCH_SEQS must be >= 1")
    _check_seq_schedule(t)
    for name, value in (("EMBED_WD", t.embed_wd), ("EMBED_BETA2", t.embed_beta2), ("SCALAR_WD", t.scalar_wd),
                        ("SCALAR_BETA2", t.scalar_beta2)):
        if value < 0 and value != -1:
            _fail(f"{name}={value} must be >= 0, or -1 for the shared ADAM_* value")
    if t.max_wallclock_seconds and t.gptq_reserve_seconds >= t.max_wallclock_seconds:
        _fail(
            f"GPTQ_RESERVE_SECONDS={t.gptq_reserve_seconds} leaves no training time under "
            f"MAX_WALLCLOCK_SECONDS={t.max_wallclock_seconds}"
        )
    if not 0 <= t.ema_decay < 1:
        _fail(f"EMA_DECAY={t.ema_decay} must be in [0, 1) (0 = off)")
    for name, bits in (("MATRIX_BITS", q.matrix_bits), ("EMBED_BITS", q.embed_bits)):
        if not 2 <= bits <= 8:
            _fail(f"{name}={bits} must be between 2 and 8")
    if q.awq_lite_enabled and q.awq_lite_bits <= q.matrix_bits:
        _fail(f"AWQ_LITE_BITS={q.awq_lite_bits} must exceed MATRIX_BITS={q.matrix_bits} (the protected groups get more bits)")
    if not 0 <= q.prune_fraction < 1:
        _fail(f"PRUNE_FRACTION={q.prune_fraction} must be in [0, 1)")
    if e.eval_stride < 1 or e.eval_stride > cfg.eval_seq_len:
        _fail(f"EVAL_STRIDE={e.eval_stride} must be between 1 and the eval seq len {cfg.eval_seq_len}")
    if e.ttt_chunk_tokens < cfg.eval_seq_len:
        _fail(f"TTT_CHUNK_TOKENS={e.ttt_chunk_tokens} is smaller than one window ({cfg.eval_seq_len})")
    if e.ttt_temperature <= 0:
        _fail(f"TTT_TEMPERATURE={e.ttt_temperature} must be > 0")
    if e.asym_logit_rescale and m.logit_softcap <= 0:
        _fail(f"ASYM_LOGIT_RESCALE=1 starts from the model's cap, but LOGIT_SOFTCAP={m.logit_softcap}; "
              "set LOGIT_SOFTCAP > 0 or turn AsymLogit off")
    sites = [x.strip() for x in e.ttt_lora_sites.split(",") if x.strip()]
    if not sites or set(sites) - set(LORA_SITES):
        _fail(f"TTT_LORA_SITES={e.ttt_lora_sites!r}: choose a comma list from {','.join(LORA_SITES)}")
    if e.ttt_lora_short_chunks and not re.fullmatch(r"\s*\d+:\d+\s*(,\s*\d+:\d+\s*)*", e.ttt_lora_short_chunks):
        _fail(f"TTT_LORA_SHORT_CHUNKS={e.ttt_lora_short_chunks!r}: write DOC_LEN:CHUNK pairs, e.g. 256:8,2000:24")
    if cfg.preset not in PRESETS:
        _fail(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")


# ---------------------------------------------------------------------------------------------
# presets: functions returning a Config; variants use dataclasses.replace on another preset


def _seed() -> Config:
    """PR #490's record script at the PR head, its file defaults: 11L, VR, GA, LeakyReLU(0.5)^2,
    BigramHash (no projection when its width is the model's), SmearGate without a BOS mask, PR #490's
    orthogonal init, bf16 Newton-Schulz, TTT."""
    # the ModelConfig / TrainConfig defaults are the seed's values
    return Config(
        preset="seed",
        model=ModelConfig(rope_ntk_ref_len=1024),
        train=TrainConfig(),
        quant=QuantConfig(),
        eval=EvalConfig(),
    )


def _seed_plus() -> Config:
    """The seed plus the extras of PR #490's final script (XSA-4, partial RoPE 16, LN scale, late QAT)
    and pgolf's fixes: the BOS mask (spec §7.1 item 8) and orthogonal init at every width (below 64 the
    PR leaves its zero-initialized bigram projection at zero, so that path never trains)."""
    base = _seed()
    return replace(
        base,
        preset="seed-plus",
        model=replace(base.model, xsa_last_n=4, rope_dims=16, rope_ntk_ref_len=0, ln_scale=True,
                      bos_mask=True, orthogonal_min_dim=0),
        train=replace(base.train, late_qat_threshold=0.15),
    )


def _baseline() -> Config:
    """The challenge's naive baseline (upstream train_gpt.py): 9L x 512, ReLU^2, MLP 2x, seq 1024,
    nn.Linear's default init, SDPA attention, int8 + zlib, no TTT."""
    return Config(
        preset="baseline",
        model=ModelConfig(
            num_layers=9,
            mlp_mult=2.0,
            mlp_activation="relu2",
            value_residual=False,
            gated_attention=False,
            bigram_buckets=0,
            smear_gate=False,
            weight_init="default",
            attention_backend="sdpa",
        ),
        train=TrainConfig(
            iterations=20_000,
            train_batch_tokens=524_288,
            train_seq_len=1024,
            micro_batch_seqs=64,
            gptq_reserve_seconds=0.0,
            matrix_lr=0.04,
            scalar_lr=0.04,
            tied_embed_lr=0.05,
            muon_wd=0.0,
            adam_wd=0.0,
            grad_clip_norm=0.0,
            ema_decay=0.0,
        ),
        quant=QuantConfig(quant_method="rtn", matrix_bits=8, embed_bits=8, row_clip="percentile",
                          compressor="zlib"),
        eval=EvalConfig(eval_mode="rows"),
    )


def _tiny() -> Config:
    """A small shape of seed-plus that trains in minutes on 2 CPU cores (see docs/tiny-scale)."""
    base = _seed_plus()
    steps = 200  # ~1.5 s/step on 2 CPU cores: the demo trains in about five minutes
    return replace(
        base,
        preset="tiny",
        data=replace(
            base.data,
            data_path="data/offline",
            tokenizer_path="data/offline/tokenizer.model",
            dataset_id="offline-sotu-brown",
        ),
        model=replace(
            base.model,
            num_layers=4,
            model_dim=128,
            num_heads=4,
            num_kv_heads=2,
            bigram_buckets=1024,
            bigram_dim=64,
            xsa_last_n=2,
            rope_dims=16,
        ),
        train=replace(
            base.train,
            iterations=steps,
            train_batch_tokens=8192,
            train_seq_len=256,
            micro_batch_seqs=32,
            max_wallclock_seconds=600.0,
            gptq_reserve_seconds=5.0,
            warmup_steps=2,
            warmdown_iters=60,
            muon_momentum_warmup_steps=50,
            # 1 - 1/(0.1 * steps): a 0.997 EMA would still be 41% initial weights after 300 steps
            ema_decay=1 - 1 / (0.1 * steps),
            val_loss_every=100,
            val_batch_size=16_384,
            train_log_every=25,
        ),
        # the tiny block matrices are 16K-49K entries: quantize them (GPTQ) instead of passing fp16
        quant=replace(base.quant, calib_batches=4, passthrough_max_numel=4096),
        eval=replace(base.eval, ttt_chunk_tokens=16_384, ttt_batch_seqs=16, eval_batch_seqs=16),
    )


def _debug() -> Config:
    """The smallest real code path, for tests: seconds on one CPU core."""
    base = _tiny()
    return replace(
        base,
        preset="debug",
        model=replace(base.model, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1,
                      bigram_buckets=256, bigram_dim=32, xsa_last_n=1),
        train=replace(base.train, iterations=20, train_batch_tokens=2048, train_seq_len=64,
                      micro_batch_seqs=32, gptq_reserve_seconds=1.0, warmup_steps=1,
                      warmdown_iters=5, muon_momentum_warmup_steps=5, ema_decay=0.5,
                      val_loss_every=0, val_batch_size=4096, train_log_every=5),
        quant=replace(base.quant, calib_batches=2, passthrough_max_numel=1024),
        eval=replace(base.eval, eval_stride=16, ttt_chunk_tokens=2048, ttt_batch_seqs=8,
                     eval_batch_seqs=8, ttt_epochs=1),
    )


def _frontier() -> Config:
    """The final audited top of the leaderboard (PR #1855's stack, technique-spec column (b), with the
    accepted deltas of #1945/#1953/#2014/#2135, spec §10) on SP8192 CaseOps data scored through the byte
    sidecar. Each element is a knob; this preset switches them on."""
    base = _seed()
    return replace(
        base,
        preset="frontier",
        data=replace(
            base.data,
            data_path="data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
            tokenizer_path="data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
            dataset_id="romeerp/parameter-golf-caseops-v1/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
            data_variant="caseops8192",
        ),
        model=replace(
            base.model, vocab_size=8192, mlp_mult=4.0, rope_dims=16, rope_ntk_ref_len=0, qk_gain_init=5.25,
            value_residual=False, gated_attention=False, bigram_buckets=0, smear_gate=False,
            xsa_last_n=11, ln_scale=True, bos_mask=True, orthogonal_min_dim=0,
            # spec §2.1/§2.3 (b): layers 3-5 looped 3x from 35% of training, lanes from layer 8, gated skips,
            # sparse attention gate and BOS-fixed SmearGate (window 12), document-isolated attention
            num_loops=2, loop_start=3, loop_end=5, parallel_lanes=True,
            parallel_start_layer=8, skip_gates=True, sparse_attn_gate=True, bos_smear_gate=True, gate_window=12,
            doc_isolation=True,
        ),
        # column (b)'s optimizer and schedule plus #2014's context growth and #2135's 32 calibration batches
        # (docs/frontier-training.md): one packed 98,304-token micro-batch per rank (32 x 3072 = 48 x 2048
        # = 96 x 1024), the reserve sized for 32 batches of Hessians (#1950 measured 3.5 s for 16)
        train=replace(
            base.train, iterations=20_000, train_seq_len=3072, micro_batch_seqs=32,
            train_seq_schedule="1024@0.1,2048@0.7,3072@1.0", seq_change_warmup_steps=32,
            gptq_reserve_seconds=10.0, warmdown_frac=0.85, min_lr=0.10, grad_clip_norm=0.3,
            matrix_lr=0.026, muon_momentum=0.97, muon_momentum_warmup_start=0.92,
            muon_momentum_warmup_steps=1500, muon_ns_coeffs="polar_express", muon_wd=0.095, muon_row_normalize=True,
            tied_embed_lr=0.03, scalar_lr=0.02, adam_beta2=0.99, embed_wd=0.085, embed_beta2=0.99,
            scalar_wd=0.02, scalar_beta2=0.99, ema_decay=0.9965, val_loss_every=0,
        ),
        # every quantizer element on (tests check this equals pgolf.quantize.compare.frontier_overrides())
        quant=replace(
            base.quant, calib_batches=32, row_clip="sdclip", sdclip_k=12.85, mlp_clip_sigmas=11.5,
            attn_clip_sigmas=13.0, embed_bits=7, embed_clip="sdclip", embed_clip_sigmas=14.0, embed_gptq=True,
            awq_lite_enabled=True, awq_lite_bits=8, awq_lite_group_top_k=1, awq_lite_group_size=64,
            lowrank_rank=4, lowrank_tensors=3, lowrank_packing="asym", lowrank_group=64,
            int8_row_tensors="*attn.gate*", compress_groups=True, sort_rows="tok_emb,attn.c_q,mlp.fc",
        ),
        # phased LoRA TTT as #2135 runs it: #1855's mode, no Q/V LoRA and LoRA lr x0.75 (#1953), short-document
        # chunks (#2014), one phase over a 2,500-document prefix (#2135), eval context 2560 (#1953)
        eval=replace(base.eval, eval_seq_len=2560, ngram_tilt_enabled=True, asym_logit_rescale=True,
                     eval_mode="lora_ttt", ttt_lora_sites="k,o,mlp,head", ttt_lora_lr=0.75e-4,
                     ttt_lora_short_chunks="256:8,2000:24", ttt_phases=1, ttt_phase_prefix_docs=2500),
    )


def _frontier_optimizer(t: TrainConfig) -> dict[str, Any]:
    """The frontier's optimizer and LR-schedule fields that small shapes keep (not its step counts); among
    them no late QAT (column (b) has none; tiny's 0.15 comes from seed-plus)."""
    names = ("warmdown_frac", "min_lr", "late_qat_threshold", "grad_clip_norm", "matrix_lr", "muon_momentum", "muon_momentum_warmup_start",
             "muon_ns_coeffs", "muon_wd", "muon_row_normalize", "tied_embed_lr", "scalar_lr", "adam_beta2",
             "embed_wd", "embed_beta2", "scalar_wd", "scalar_beta2")
    return {name: getattr(t, name) for name in names}


def _frontier_tiny() -> Config:
    """`frontier` at the tiny shape, on CaseOps-transformed offline text (`pgolf data offline --caseops`)."""
    base, tiny = _frontier(), _tiny()
    return replace(
        base,
        preset="frontier-tiny",
        data=replace(tiny.data, data_path="data/offline-caseops", tokenizer_path="data/offline-caseops/tokenizer.model",
                     dataset_id="offline-sotu-brown-caseops", data_variant="sp1024"),
        model=replace(base.model, vocab_size=tiny.model.vocab_size, num_layers=tiny.model.num_layers,
                      model_dim=tiny.model.model_dim, num_heads=tiny.model.num_heads,
                      num_kv_heads=tiny.model.num_kv_heads, xsa_last_n=tiny.model.num_layers,
                      # 4 layers: layers 1-2 looped 3x -> [0,1,2,1 | 2,1,2,3], lanes on layer 3
                      loop_start=1, loop_end=2, parallel_start_layer=3),
        # tiny's step counts, sizes and EMA; frontier's optimizer settings and the same shape of schedule
        # (context 1/4 -> 1/2 -> full: 8,192-token batches divide only by powers of two)
        train=replace(tiny.train, train_seq_schedule="64@0.1,128@0.7,256@1.0", seq_change_warmup_steps=2,
                      **_frontier_optimizer(base.train)),
        quant=replace(base.quant, calib_batches=tiny.quant.calib_batches,
                      passthrough_max_numel=tiny.quant.passthrough_max_numel),
        # LoRA TTT scaled down (same alpha/rank 1.8): seconds on 2 CPU cores
        eval=replace(_frontier_lora_eval(base.eval, tiny.eval), eval_seq_len=2 * tiny.train.train_seq_len,
                     ttt_lora_rank=16, ttt_lora_alpha=28.8, ttt_lora_doc_batch=8, ttt_phase_prefix_docs=32,
                     ttt_phase_batch_seqs=4),
    )


def _frontier_lora_eval(frontier: EvalConfig, small: EvalConfig) -> EvalConfig:
    """A small preset's eval section with the frontier's evaluator switches (mode, tilt, AsymLogit, LoRA)."""
    keep = ("eval_mode", "ngram_tilt_enabled", "asym_logit_rescale", "ttt_lora_sites", "ttt_lora_lr",
            "ttt_lora_short_chunks", "ttt_phases")
    return replace(small, **{name: getattr(frontier, name) for name in keep})


def _frontier_debug() -> Config:
    """`frontier` at the debug shape: the smallest frontier code path, for tests."""
    base, debug = _frontier_tiny(), _debug()
    return replace(
        base,
        preset="frontier-debug",
        # 3 layers (debug has 2), so every element has a place: layer 1 looped 3x -> [0,1 | 1,1,2], lanes on 2
        model=replace(base.model, num_layers=3, model_dim=debug.model.model_dim,
                      num_heads=debug.model.num_heads, num_kv_heads=debug.model.num_kv_heads,
                      xsa_last_n=3, loop_start=1, loop_end=1, parallel_start_layer=2),
        train=replace(debug.train, train_seq_schedule="16@0.1,32@0.7,64@1.0", seq_change_warmup_steps=1,
                      **_frontier_optimizer(base.train)),
        quant=replace(base.quant, calib_batches=debug.quant.calib_batches,
                      passthrough_max_numel=debug.quant.passthrough_max_numel),
        eval=replace(_frontier_lora_eval(base.eval, debug.eval), eval_seq_len=2 * debug.train.train_seq_len,
                     ttt_lora_rank=4, ttt_lora_alpha=7.2, ttt_lora_doc_batch=4, ttt_phase_prefix_docs=8,
                     ttt_phase_batch_seqs=4),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "baseline": _baseline,
    "seed": _seed,
    "seed-plus": _seed_plus,
    "tiny": _tiny,
    "debug": _debug,
    "frontier": _frontier,
    "frontier-tiny": _frontier_tiny,
    "frontier-debug": _frontier_debug,
}


# ---------------------------------------------------------------------------------------------
# resolution: preset < env < CLI flags


def field_types() -> dict[str, tuple[str, Any]]:
    """NAME -> (section, resolved type) for every config field."""
    out: dict[str, tuple[str, Any]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            out[f.name] = (section, hints[f.name])
    return out


def parse_value(name: str, raw: Any, typ: Any) -> Any:
    """Convert an env/CLI string (or a JSON value) to the field's type, or fail in one line."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if typ is int:
            try:
                return int(text)
            except ValueError:
                number = float(text)  # accept "1e6" and "600.0" for integer fields
                if not number.is_integer():
                    raise
                return int(number)
        if typ is float:
            return float(text)
        if typing.get_origin(typ) is Literal:
            choices = typing.get_args(typ)
            if text not in choices:
                raise ValueError(text)
            return text
        return text
    except ValueError:
        if typing.get_origin(typ) is Literal:
            expected = "choice: one of " + "|".join(typing.get_args(typ))
        else:
            expected = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{name.upper()}={raw!r} is not a valid {expected}") from None


def apply_overrides(cfg: Config, values: Mapping[str, Any]) -> Config:
    """Replace fields by (case-insensitive) name; unknown names fail with the closest match."""
    types = field_types()
    per_section: dict[str, dict[str, Any]] = {}
    preset = cfg.preset
    for key, raw in values.items():
        name = key.lower().replace("-", "_")
        if name == "preset":
            preset = str(raw)
            continue
        if name not in types:
            import difflib

            close = difflib.get_close_matches(name, types, n=1)
            tip = f" (did you mean {close[0].upper()}?)" if close else ""
            raise ConfigError(f"unknown config field {key!r}{tip}")
        section, typ = types[name]
        per_section.setdefault(section, {})[name] = parse_value(name, raw, typ)
    changes = {s: replace(getattr(cfg, s), **v) for s, v in per_section.items()}
    return replace(cfg, preset=preset, **changes)


def env_overrides(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The config fields set in the environment (upstream names, upper case)."""
    env = os.environ if env is None else env
    names = field_types()
    return {name: env[name.upper()] for name in names if name.upper() in env}


def resolve(
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """preset (default: $PRESET or 'seed') < environment < explicit overrides (CLI flags)."""
    env = os.environ if env is None else env
    name = preset or env.get("PRESET") or "seed"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg = apply_overrides(cfg, env_overrides(env))
    return apply_overrides(cfg, dict(overrides or {}))


def from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a Config from `config.json` (unknown fields are refused, not ignored)."""
    cfg = PRESETS.get(data.get("preset", "seed"), _seed)()
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        flat.update(data.get(section, {}))
    return apply_overrides(cfg, flat)


def load(path: str | os.PathLike[str]) -> Config:
    with open(path, encoding="utf-8") as fh:
        return from_dict(json.load(fh))


def env_flag(name: str, default: str = "") -> str:
    """Read a non-config environment value (e.g. IMAGE_DIGEST, CI) through the one env reader."""
    return os.environ.get(name, default)


def environment() -> dict[str, str]:
    """A copy of the whole environment, for launching subprocesses (torchrun, weed, npm)."""
    return dict(os.environ)
