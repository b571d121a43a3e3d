"""The GPT: embedding and input path, the U-Net stack of blocks, the tied head; init and build.

    tokens ─► tok_emb + BigramHash ─► RMSNorm ─► SmearGate ─► x0
    x0 ─► encoder blocks (push) ─► decoder blocks (pop skip ⊙ w) ─► RMSNorm ─► tied head ─► softcap

How the stack of blocks is run (which block at which depth, how often) lives in GPT.forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.errors import ConfigError
from pgolf.model.adapters import HEAD_SLOT, Adapter, add_delta
from pgolf.model.attention import attention_backend_in_use
from pgolf.model.blocks import Block
from pgolf.model.inputs import BigramHash, SmearGate
from pgolf.model.layers import CastedLinear, Rotary, rms_norm


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not 2 <= cfg.qat_bits <= 8:
            raise ConfigError(f"QAT_BITS={cfg.qat_bits} must be between 2 and 8")
        self.cfg = cfg
        L, d = cfg.num_layers, cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.bigram = BigramHash(cfg) if cfg.bigram_buckets else None
        self.smear = SmearGate(cfg) if cfg.smear_gate else None
        self.rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(L))
        # U-Net: the first L//2 blocks push their outputs, the rest pop them (LIFO) before running
        self.num_encoder = L // 2 if cfg.unet_skips else L
        num_skips = min(self.num_encoder, L - self.num_encoder) if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(num_skips, d)) if num_skips else None
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
        """x0 (B, T, d): RMSNorm(tok_emb + BigramHash), then SmearGate. Depends only on t_{i-1}, t_i."""
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx).to(x.dtype)
        x = rms_norm(x)
        if self.smear is not None:
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
        v0, skips = None, []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x, v_raw = block(x, x0, cos, sin, v0, backend, adapter, slot=i)
            if i == 0:
                v0 = v_raw
            if i < self.num_encoder and self.skip_weights is not None:
                skips.append(x)
        x = rms_norm(x)
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

    @property
    def num_slots(self) -> int:
        """Block applications per forward pass (the adapter hook's slots 0 .. num_slots-1)."""
        return len(self.blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Optimizer groups (spec §3 (a)), every parameter in exactly one.

        matrix: every 2-D weight of a block CastedLinear (incl. the attention gate W) + bigram.proj (Muon)
        embed:  tied tok_emb + bigram.table (AdamW tied_embed_lr; untied tok_emb uses embed_lr)
        head:   the untied lm_head, if any
        scalar: everything else: gains, scales, mixes, skip weights, lambdas, gate bias, smear, bigram.scale
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

