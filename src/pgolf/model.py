"""The GPT of the Parameter Golf seed (PR #490) and its extras, every element a ModelConfig field.

References: technique-spec §2 (column (a) = the record script, (a-sub) = its final script) and the
challenge's naive baseline (`baseline` preset). Read leaf-first: quantization helper, linear layer,
rotary, attention, MLP, block, the input path (BigramHash, SmearGate), then the model.

    tokens ─► tok_emb + BigramHash ─► RMSNorm ─► SmearGate ─► x0
    x0 ─► encoder blocks (push) ─► decoder blocks (pop skip ⊙ w) ─► RMSNorm ─► tied head ─► softcap

Every block: x_in = a⊙x + b⊙x0; x = x_in + α⊙Attn(norm(x_in)·s); x = x + β⊙MLP(norm(x)·s).

Parameter names: matrices live in `CastedLinear` modules (c_q, c_k, c_v, proj, fc, and the attention
gate's W, the one matrix whose name says `gate`); every vector/control parameter's name contains one of
norm|scale|gain|mix|skip|lambda|gate|smear, so optimizers and TTT can select by name.

Calling convention under torch.compile / DDP: call the wrapper, `wrapped(idx)` for logits,
`wrapped(idx, targets)` for the mean loss and `wrapped(idx, targets, reduction="none")` for the
per-token NLL; the `loss` / `per_token_nll` methods are the same paths on the bare module.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.attention import attention_backend_in_use, causal_attention
from pgolf.config import ModelConfig
from pgolf.errors import ConfigError

BOS_ID = 1  # the sp1024 / CaseOps tokenizers' BOS id; every document starts with it (spec §1.1)

__all__ = [
    "BOS_ID", "CastedLinear", "GPT", "attention_backend_in_use", "bigram_hash", "build_model",
    "fake_quant_rows",
]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learned weight (the seed has none anywhere)."""
    return F.rms_norm(x, (x.size(-1),))


def fake_quant_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric quantize-dequantize: s = max|row| / (2^(bits-1) - 1), q in [-2^(bits-1), 2^(bits-1) - 1]."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


class CastedLinear(nn.Linear):
    """A linear (bias-free by default) whose fp32 weight is cast to the input dtype (bf16 under autocast).

    With `qat_bits` > 0, `qat_on` (a plain bool, not saved in the state dict) turns on straight-through
    fake quantization: w_eff = w + (fake_quant(w) - w).detach(). torch.compile guards on the bool, so
    flipping it switches to a second graph with the fake-quant traced in (spec §7.1 item 7: never
    frozen at trace time), and a run that never turns QAT on never traces it (pgolf.compiled).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 qat_bits: int = 0, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.qat_bits = qat_bits
        self.zero_init = zero_init  # output projections start at zero (read by GPT._init_weights)
        self.qat_on = False  # set through GPT.set_qat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_bits and self.qat_on:
            w = w + (fake_quant_rows(w, self.qat_bits) - w).detach()
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w.to(x.dtype), bias)


class Rotary(nn.Module):
    """RoPE tables for the first `rope_dims` dims of each head (0 = all), split-half pairing.

    With rope_ntk_ref_len > 0 and T above it, the base is NTK-rescaled to base·(T/ref)^(d/(d-2)):
    the seed always trains and scores 2048-token windows with ref 1024, i.e. base 1e4·2^(64/62).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dims = cfg.rope_dims or cfg.head_dim
        self.base = cfg.rope_base
        self.ntk_ref_len = cfg.rope_ntk_ref_len

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base
        if self.ntk_ref_len and seq_len > self.ntk_ref_len and self.dims > 2:
            base = base * (seq_len / self.ntk_ref_len) ** (self.dims / (self.dims - 2))
        inv_freq = 1.0 / base ** (torch.arange(0, self.dims, 2, device=device, dtype=torch.float32) / self.dims)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos(), freqs.sin()  # (T, dims/2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of the first d = 2·cos.size(-1) dims of x (B, T, H, D)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest), dim=-1)


class CausalSelfAttention(nn.Module):
    """GQA attention with RMS-normed q/k, q gain, RoPE, Value Residual, XSA and a per-head gate."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, h, kv, hd = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.c_q = CastedLinear(d, h * hd, qat_bits=cfg.qat_bits)
        self.c_k = CastedLinear(d, kv * hd, qat_bits=cfg.qat_bits)
        self.c_v = CastedLinear(d, kv * hd, qat_bits=cfg.qat_bits)
        self.proj = CastedLinear(h * hd, d, qat_bits=cfg.qat_bits, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h,), cfg.qk_gain_init))
        # Value Residual: layers >= 1 blend layer 0's raw V in, v <- l0 * v0 + l1 * v
        self.vr_lambda = nn.Parameter(torch.tensor([0.5, 0.5])) if cfg.value_residual and layer > 0 else None
        # XSA: remove from each head's output its component along the token's own value vector
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        # Gated attention: y_h <- sigmoid(W u + b)_h * y_h, W zero and b = 4 (gate ~0.98 open)
        self.gate = CastedLinear(d, h, bias=True, zero_init=True) if cfg.gated_attention else None
        if self.gate is not None:
            nn.init.constant_(self.gate.bias, cfg.gate_bias_init)

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v0: torch.Tensor | None,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """u: normalized block input (B, T, d). Returns (output (B, T, d), this layer's raw V)."""
        B, T, _ = u.shape
        q = self.c_q(u).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(u).view(B, T, self.num_kv_heads, self.head_dim)
        v_raw = self.c_v(u).view(B, T, self.num_kv_heads, self.head_dim)
        v = v_raw
        if self.vr_lambda is not None and v0 is not None:
            lam = self.vr_lambda.to(v.dtype)
            v = lam[0] * v0 + lam[1] * v
        q, k = rms_norm(q), rms_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, backend)
        if self.xsa:  # v_hat from the pre-VR v of the same position and KV group (a-sub)
            group = self.num_heads // self.num_kv_heads
            y = y.view(B, T, self.num_kv_heads, group, self.head_dim)
            v_hat = F.normalize(v_raw, dim=-1).unsqueeze(3)  # (B, T, KV, 1, D)
            y = (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).view(B, T, self.num_heads, self.head_dim)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(u)).unsqueeze(-1)
        return self.proj(y.reshape(B, T, self.num_heads * self.head_dim)), v_raw


class MLP(nn.Module):
    """fc -> ReLU² or LeakyReLU(slope)² -> proj (zero-init)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden, qat_bits=cfg.qat_bits)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim, qat_bits=cfg.qat_bits, zero_init=True)
        self.slope = cfg.leaky_relu_slope if cfg.mlp_activation == "leaky_relu2" else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))  # alpha, per channel
        self.mlp_scale = nn.Parameter(torch.ones(d))  # beta, per channel
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))  # (a, b)
        self.branch_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0  # LN scale s_l

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                v0: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        y, v_raw = self.attn(rms_norm(x) * self.branch_scale, cos, sin, v0, backend)
        x = x + self.attn_scale.to(x.dtype) * y
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.branch_scale)
        return x, v_raw


def bigram_hash(idx: torch.Tensor, buckets: int, bos_mask: bool) -> torch.Tensor:
    """Bucket of (previous token, token): (36313·t_i XOR 27191·t_{i-1}) mod (buckets - 1).

    Position 0 gets the reserved bucket buckets - 1. With `bos_mask` every BOS position does too, so a
    document's first position never sees the previous document's last token (the BigramHash half of
    the BOS fix; PR #490 hashes across the boundary).
    """
    idx = idx.long()
    prev = F.pad(idx[:, :-1], (1, 0))
    h = torch.bitwise_xor(36313 * idx, 27191 * prev).remainder(buckets - 1)
    reserved = idx == BOS_ID if bos_mask else torch.zeros_like(idx, dtype=torch.bool)
    reserved[:, 0] = True
    return torch.where(reserved, torch.full_like(h, buckets - 1), h)


class BigramHash(nn.Module):
    """e += scale · proj(table[hash(t_{i-1}, t_i)]); zero table, scale init 0.05.

    The projection bigram_dim -> model_dim exists when the widths differ (BIGRAM_PROJ=always: at every
    width). It is built zero, as in PR #490, and only an orthogonal init (GPT._init_weights) makes it
    non-zero: left at zero, neither it nor the zero table ever gets a gradient.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets, self.bos_mask = cfg.bigram_buckets, cfg.bos_mask
        self.table = nn.Embedding(cfg.bigram_buckets, cfg.bigram_dim)
        needed = cfg.bigram_proj == "always" or cfg.bigram_dim != cfg.model_dim
        self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim) if needed else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)  # after nn.Linear's own draw: the RNG stream stays the PR's
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.table(bigram_hash(idx, self.buckets, self.bos_mask))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """x_t <- (1 - σ(g)) x_t + σ(g) x_{t-1} per channel, g init 0.

    Without the BOS mask (PR #490) x_{-1} = 0, so position 0 is scaled by 1 - σ(g), and a BOS takes in
    the previous document's last position. With it, position 0 and every BOS are left unmixed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bos_mask = cfg.bos_mask
        self.gate = nn.Parameter(torch.zeros(cfg.model_dim))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if not self.bos_mask:
            return (1 - g) * x + g * prev
        keep = (idx != BOS_ID).unsqueeze(-1).to(x.dtype)  # no mixing into a document start
        keep[:, 0] = 0
        return x + keep * g * (prev - x)


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
                reduction: str = "mean") -> torch.Tensor:
        """Softcapped fp32 logits (B, T, V); with targets, the fp32 CE (mean, or (B, T) for 'none')."""
        backend = self.attention_backend(idx.device)
        x0 = x = self.embed(idx)
        cos, sin = self.rotary(idx.size(1), idx.device)
        v0, skips = None, []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x, v_raw = block(x, x0, cos, sin, v0, backend)
            if i == 0:
                v0 = v_raw
            if i < self.num_encoder and self.skip_weights is not None:
                skips.append(x)
        x = rms_norm(x)
        z = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
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

