"""The GPT: embedding and input path, the U-Net stack of blocks, the tied head; init and build.

    tokens ─► tok_emb + BigramHash ─► [BosSmearGate] ─► RMSNorm ─► [SmearGate] ─► x0
    x0 ─► encoder slots (push) ─► decoder slots (pop skip) ─► [mean of lanes] ─► final_norm ─► head ─► softcap

How the stack of blocks is run lives here: `block_schedule` lists the physical block of every
application (slot). Depth recurrence (NUM_LOOPS, spec §2.3 (b)) repeats the span LOOP_START..LOOP_END
once looping is on; the first half of the slots is the encoder, the rest the decoder, and
min(encoder, decoder) skips connect them LIFO (x += w⊙skip, or with SKIP_GATES x = lerp(w⊙skip, x, σ(g))).
Decoder slots on physical layers >= PARALLEL_START_LAYER run as two lanes (Block.parallel), the skip
entering lane 0; the lanes' mean is the final hidden state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.errors import ConfigError
from pgolf.model.adapters import HEAD_SLOT, Adapter, add_delta
from pgolf.model.attention import attention_backend_in_use, doc_context
from pgolf.model.blocks import Block
from pgolf.model.inputs import BigramHash, BosSmearGate, SmearGate
from pgolf.model.layers import CastedLinear, RMSNorm, Rotary, rms_norm


def block_schedule(cfg: ModelConfig, looping: bool) -> list[int]:
    """The physical block of every application, in run order.

    Looping on (#1855: 11 layers, span 3..5, 2 loops): [0,1,2, 3,4,5, 3,4,5, 3,4,5, 6,7,8,9,10]."""
    order = list(range(cfg.num_layers))
    if looping and cfg.num_loops:
        span = order[cfg.loop_start : cfg.loop_end + 1]
        order = order[: cfg.loop_start] + span * (cfg.num_loops + 1) + order[cfg.loop_end + 1 :]
    return order


def num_encoder_slots(cfg: ModelConfig, slots: int) -> int:
    """The U-Net's encoder is the first half of the slots (all of them without skips)."""
    return slots // 2 if cfg.unet_skips else slots


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not 2 <= cfg.qat_bits <= 8:
            raise ConfigError(f"QAT_BITS={cfg.qat_bits} must be between 2 and 8")
        self.cfg = cfg
        L, d = cfg.num_layers, cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.bigram = BigramHash(cfg) if cfg.bigram_buckets else None
        # the two SmearGates are variants of one element (config refuses both): the seed's after the
        # norm, #1855's BOS-fixed one on the raw embedding
        self.smear = SmearGate(cfg) if cfg.smear_gate else BosSmearGate(cfg) if cfg.bos_smear_gate else None
        self.rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(L))
        # a recurrent model is built looping (how it is evaluated); the trainer starts it unlooped
        self.looping = cfg.num_loops > 0
        self.schedules = {False: block_schedule(cfg, False), True: block_schedule(cfg, True)}
        longest = len(self.schedules[self.looping])
        # U-Net: encoder slots push their outputs, decoder slots pop them (LIFO) before running; the
        # skip parameters are sized for the longest schedule (an unlooped pass uses the first ones)
        self.num_encoder = num_encoder_slots(cfg, longest)
        num_skips = min(self.num_encoder, longest - self.num_encoder) if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(num_skips, d)) if num_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, d)) if num_skips and cfg.skip_gates else None
        # parallel lanes: per physical layer r (2) init 1.1 and p (2x2) init 1, for every layer as in
        # #1855 (its parameter count includes them), used from PARALLEL_START_LAYER on
        self.lane_start = cfg.parallel_start_layer if cfg.parallel_lanes else L
        self.lane_resid_lambda = nn.Parameter(torch.full((L, 2), 1.1)) if cfg.parallel_lanes else None
        self.lane_post_lambda = nn.Parameter(torch.ones(L, 2, 2)) if cfg.parallel_lanes else None
        for looping, order in self.schedules.items():
            enc = num_encoder_slots(cfg, len(order))
            if any(i >= self.lane_start for i in order[:enc]):
                raise ConfigError(f"PARALLEL_START_LAYER={cfg.parallel_start_layer} puts a parallel layer in the "
                                  f"encoder of the {'looped' if looping else 'unlooped'} schedule {order}; "
                                  "lanes run in the decoder only: raise it")
        self.final_norm = RMSNorm()  # a module, so the quantizer can hook the head's input (EMBED_GPTQ)
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(d, cfg.vocab_size, zero_init=True)
        self._backends: dict[str, str] = {}  # device type -> "fa3" | "sdpa", resolved on first use
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Tied embedding N(0, std²); zero-init linears zero; the rest by WEIGHT_INIT.

        `default` (upstream baseline): every other linear keeps nn.Linear's Kaiming-uniform draw.
        `orthogonal` (PR #490, spec §2.4): a linear whose both dims are >= ORTHOGONAL_MIN_DIM is
        re-drawn orthogonal (gain 1), and bigram.proj (the one such linear named `proj`) is then
        scaled by 1/√(2L); narrower linears keep their draw (bigram.proj stays zero). Draws happen in
        construction order, then the embedding, then module order, as in both sources, so one seed
        gives their weights.
        """
        if self.tok_emb.weight.device.type == "meta":
            return
        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.table.weight)
        for name, module in self.named_modules():
            if not isinstance(module, CastedLinear):
                continue
            if module.zero_init:
                nn.init.zeros_(module.weight)
            elif self.cfg.weight_init == "orthogonal" and min(module.weight.shape) >= self.cfg.orthogonal_min_dim:
                nn.init.orthogonal_(module.weight)
                if name == "bigram.proj":
                    module.weight.mul_(1.0 / math.sqrt(2 * self.cfg.num_layers))

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """x0 (B, T, d): RMSNorm(tok_emb + BigramHash), with the SmearGate before (BOS-fixed, #1855) or
        after (the seed's) the norm. Depends only on t_{i-1}, t_i."""
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx).to(x.dtype)
        if isinstance(self.smear, BosSmearGate):
            x = self.smear(x, idx)
        x = rms_norm(x)
        if isinstance(self.smear, SmearGate):
            x = self.smear(x, idx)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", adapter: Adapter | None = None) -> torch.Tensor:
        """Softcapped fp32 logits (B, T, V); with targets, the fp32 CE (mean, or (B, T) for 'none').

        `adapter` (pgolf.model.adapters) adds test-time deltas at every block application and the head.
        """
        backend = self.attention_backend(idx.device)
        x0 = x = self.embed(idx)
        cos, sin = self.rotary(idx.size(1), idx.device)
        docs = doc_context(idx, backend) if self.cfg.doc_isolation else None
        order = self.schedules[self.looping]
        n_enc = num_encoder_slots(self.cfg, len(order))
        v0, skips, lanes = None, [], None
        for slot, i in enumerate(order):
            block = self.blocks[i]
            if slot >= n_enc and skips:
                j = slot - n_enc
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                into = x if lanes is None else lanes[0]  # the skip enters lane 0 only
                if self.skip_gates is None:
                    into = into + skip
                else:
                    into = torch.lerp(skip, into, torch.sigmoid(self.skip_gates[j].to(x.dtype)))
                x, lanes = (into, None) if lanes is None else (x, (into, lanes[1]))
            if slot >= n_enc and i >= self.lane_start:
                lane0, lane1 = (x, x) if lanes is None else lanes
                lanes = block.parallel(lane0, lane1, x0, cos, sin, v0, backend, self.lane_resid_lambda[i],
                                       self.lane_post_lambda[i], adapter, slot, docs)
                continue
            x, v_raw = block(x, x0, cos, sin, v0, backend, adapter, slot=slot, docs=docs)
            if slot == 0:
                v0 = v_raw
            if slot < n_enc and self.skip_weights is not None:
                skips.append(x)
        if lanes is not None:
            x = (lanes[0] + lanes[1]) / 2
        x = self.final_norm(x)
        z = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        z = add_delta(z, adapter, HEAD_SLOT, "head", x)
        cap = self.cfg.logit_softcap
        logits = cap * torch.tanh(z.float() / cap) if cap else z.float()
        if targets is None:
            return logits
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return nll.view(targets.shape) if reduction == "none" else nll

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats (fp32)."""
        return self(idx, targets)

    def per_token_nll(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32 NLL in nats, one per target."""
        return self(idx, targets, reduction="none")

    # ---- helpers the trainer, quantizer and evaluator use ------------------------------------

    def attention_backend(self, device: torch.device | str) -> str:
        """The attention kernel this model uses on `device` ('fa3' | 'sdpa'); ConfigError if fa3 can't run."""
        kind = torch.device(device).type
        if kind not in self._backends:  # resolved eagerly by build_model, so compiled code only reads
            self._backends[kind] = attention_backend_in_use(self.cfg.attention_backend, device)
        return self._backends[kind]

    def set_qat(self, enabled: bool) -> None:
        """Switch int-`qat_bits` straight-through fake quantization of every block matrix on/off."""
        for module in self.blocks.modules():
            if isinstance(module, CastedLinear) and module.qat_bits:
                module.qat_on = bool(enabled)

    @property
    def qat_enabled(self) -> bool:
        return self.blocks[0].attn.c_q.qat_on

    def set_looping(self, enabled: bool) -> None:
        """Depth recurrence on/off (a no-op switch for a model without NUM_LOOPS). Like QAT, the flag is a
        plain bool: torch.compile guards on it, so each state gets its own graph (pgolf.model.compiled)."""
        self.looping = bool(enabled) and self.cfg.num_loops > 0

    @property
    def num_slots(self) -> int:
        """Block applications per forward pass in the current looping state (the adapter hook's slots
        0 .. num_slots-1); 17 for #1855 with looping on."""
        return len(self.schedules[self.looping])

    @property
    def schedule(self) -> list[int]:
        """The physical block of every slot in the current looping state."""
        return list(self.schedules[self.looping])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Optimizer groups (spec §3 (a)), every parameter in exactly one.

        matrix: every 2-D weight of a block CastedLinear (incl. the attention gate W) + bigram.proj (Muon)
        embed:  tied tok_emb + bigram.table (AdamW tied_embed_lr; untied tok_emb uses embed_lr)
        head:   the untied lm_head, if any
        scalar: everything else: gains, scales, mixes, skip weights and gates, lambdas (VR, lanes), gate bias,
                the sparse attention gates (2-D `gate_w`, spec §3 (b): AdamW), smear, bigram.scale
        """
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "embed": [], "scalar": [], "head": []}
        for name, p in self.named_parameters():
            if name.startswith("lm_head."):
                group = "head"
            elif name in ("tok_emb.weight", "bigram.table.weight"):
                group = "embed"
            elif p.ndim == 2 and name.endswith(".weight") and (name.startswith("blocks.") or name == "bigram.proj.weight"):
                group = "matrix"
            else:
                group = "scalar"
            groups[group].append((name, p))
        return groups


def _cast_for_device(model: GPT, device: torch.device) -> GPT:
    """Spec §2.4 on CUDA: embeddings bf16, every linear weight and 1-D / control parameter fp32."""
    model = model.to(device=device, dtype=torch.float32)
    if device.type == "cuda":
        model.tok_emb.to(torch.bfloat16)
        if model.bigram is not None:
            model.bigram.table.to(torch.bfloat16)
    return model


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> GPT:
    """An initialized GPT on `device` (fails early if the requested attention kernel cannot run there)."""
    device = torch.device(device)
    model = GPT(cfg)
    model.attention_backend(device)
    return _cast_for_device(model, device)

