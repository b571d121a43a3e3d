"""Optimizers of the seed recipe (technique-spec §3, column (a)): Muon for block matrices, AdamW for
embeddings and scalars, one global gradient clip.

Muon (Keller Jordan's "MomentUm Orthogonalized by Newton-Schulz"): for each 2-D weight,

    buf <- mu * buf + g                       (momentum, fp32)
    u   <- g + mu * buf                       (Nesterov)
    u   <- u / ||u_row||_2 per row            (only with MUON_ROW_NORMALIZE, spec §3 (b))
    O   <- NS(u)                              (approximate orthogonal polar factor, 5 iterations)
    W   <- W * (1 - lr * wd) - lr * sqrt(max(1, rows / cols)) * O

Newton-Schulz normalizes X = u / ||u||_F, transposes tall matrices, and iterates
X <- a X + (b A + c A^2) X with A = X X^T, in bf16 on every device as both sources do
(MUON_NS_DTYPE=fp32 to change it). The classic quintic uses one fixed (a, b, c); the "Polar Express"
schedule uses a tuned tuple per iteration (spec §3, column (b)).

Under data parallelism every rank keeps the full momentum state (grads are already averaged, so the
state is identical everywhere and a checkpoint from rank 0 is complete), but Newton-Schulz, the
expensive part, runs only on the rank that owns a matrix (round-robin); the orthogonalized updates
travel in one flat buffer that is all-reduced (sum; non-owners contribute zeros). With
TORCH_COMPILE on, Newton-Schulz is one compiled wrapper around `newton_schulz` holding one graph
per matrix shape this rank owns (pgolf.model.compiled).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.model.compiled import maybe_compiled
from pgolf.errors import ConfigError

log = logging.getLogger(__name__)

# The classic quintic (a, b, c) from modded-nanogpt, used by the seed for all 5 iterations.
NS_CLASSIC = (3.4445, -4.7750, 2.0315)

# Polar Express per-iteration tuples, as used by the #1 record (spec §3 column (b)).
NS_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # MUON_NS_DTYPE


def ns_coefficients(kind: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) used at each of `steps` iterations; Polar Express repeats its last tuple."""
    if steps < 1:
        raise ConfigError(f"MUON_BACKEND_STEPS={steps} must be >= 1")
    if kind == "classic":
        return [NS_CLASSIC] * steps
    if kind == "polar_express":
        tuples = list(NS_POLAR_EXPRESS[:steps])
        return tuples + [NS_POLAR_EXPRESS[-1]] * (steps - len(tuples))
    raise ConfigError(f"MUON_NS_COEFFS={kind!r} is not one of classic|polar_express")


def newton_schulz(g: Tensor, coeffs: Sequence[tuple[float, float, float]], dtype: torch.dtype) -> Tensor:
    """Approximate U V^T of g = U S V^T (every singular value pushed towards ~1), in `dtype`."""
    x = g.to(dtype)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the wide orientation so A = X X^T is the small Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)
    for a, b, c in coeffs:
        A = x @ x.T
        B = b * A + (c * A) @ A  # c A², in the sources' order, so bf16 rounds as theirs does
        x = a * x + B @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters. `rank`/`world_size` split the Newton-Schulz work (see module doc)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        backend_steps: int = 5,
        ns_coeffs: str = "classic",
        weight_decay: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        ns_dtype: torch.dtype = torch.bfloat16,
        torch_compile: str = "off",
        row_normalize: bool = False,
    ):
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ConfigError(f"Muon takes 2-D matrices only; got a tensor of shape {tuple(p.shape)}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.coeffs = ns_coefficients(ns_coeffs, backend_steps)
        self.rank, self.world_size = rank, world_size
        self.ns_dtype = ns_dtype  # bf16 as both sources, on every device (MUON_NS_DTYPE)
        self.torch_compile = torch_compile
        self.row_normalize = row_normalize  # MUON_ROW_NORMALIZE
        self._orthogonalize: Any = None  # newton_schulz, or its compiled wrapper; built at the first step

    def owned(self, i: int) -> bool:
        """Whether this rank runs Newton-Schulz for matrix i of a group (round-robin)."""
        return self.world_size <= 1 or i % self.world_size == self.rank

    def orthogonalize(self, u: Tensor, dtype: torch.dtype) -> Tensor:
        if self._orthogonalize is None:
            shapes = {tuple(p.shape) for g in self.param_groups for i, p in enumerate(g["params"]) if self.owned(i)}
            self._orthogonalize = maybe_compiled("newton_schulz", newton_schulz, self.torch_compile, u.device,
                                                 planned=max(1, len(shapes)))
        return self._orthogonalize(u, self.coeffs, dtype)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ConfigError("Muon.step does not take a closure")
        distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).float() for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                bufs.append(state["momentum_buffer"])
            # every rank keeps every momentum buffer (cheap, elementwise): identical state everywhere
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            dtype = self.ns_dtype
            flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            offset = 0
            for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
                n = p.numel()
                if not distributed or self.owned(i):
                    u = g.add(buf, alpha=mu) if group["nesterov"] else buf
                    if self.row_normalize:  # every output row gets the same say before the polar factor
                        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
                    o = self.orthogonalize(u, dtype)
                    o = o * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                    flat[offset : offset + n] = o.reshape(-1)
                offset += n
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # non-owners contributed exact zeros
            updates, offset = [], 0
            for p in params:
                updates.append(flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, updates, alpha=-lr)


# ---------------------------------------------------------------------------------------------
# the optimizer set of one run


NamedParams = Sequence[tuple[str, Tensor]]


@dataclass
class Optimizers:
    """Every optimizer of a run, driven together: LR multiplier, Muon momentum, step, zero_grad."""

    optimizers: list[torch.optim.Optimizer]
    params: list[Tensor] = field(default_factory=list)
    grad_clip_norm: float = 0.0

    def set_lr_mult(self, mult: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult

    def set_muon_momentum(self, momentum: float) -> None:
        for opt in self.optimizers:
            if isinstance(opt, Muon):
                for group in opt.param_groups:
                    group["momentum"] = momentum

    def clip_grad_norm(self) -> Tensor | None:
        """Global L2 clip over every parameter's gradient (after the cross-rank average)."""
        if self.grad_clip_norm <= 0:
            return None
        grads = [p for p in self.params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(grads, self.grad_clip_norm, foreach=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: Sequence[Mapping[str, Any]]) -> None:
        if len(states) != len(self.optimizers):
            raise ConfigError(
                f"checkpoint holds {len(states)} optimizer states but this run builds "
                f"{len(self.optimizers)}; resume with the same model config"
            )
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)

    def describe(self) -> list[str]:
        """One line per parameter group (name, tensors, elements, lr, wd), for the log."""
        lines = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                n = sum(p.numel() for p in group["params"])
                betas = f" betas:{tuple(group['betas'])}" if "betas" in group else ""
                lines.append(
                    f"optimizer:{type(opt).__name__} group:{group['name']} tensors:{len(group['params'])} "
                    f"params:{n} lr:{group['base_lr']} weight_decay:{group['weight_decay']}{betas}"
                )
        return lines


def momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Muon momentum, linear from `start` to `end` over the first `warmup_steps` steps."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


def adam_group_settings(train: Any, key: str) -> tuple[float, float]:
    """(weight decay, beta2) of an AdamW group: EMBED_*/SCALAR_* where set (>= 0), else ADAM_WD/ADAM_BETA2."""
    own = {"embed": (train.embed_wd, train.embed_beta2), "scalar": (train.scalar_wd, train.scalar_beta2)}
    wd, beta2 = own.get(key, (-1.0, -1.0))
    return (wd if wd >= 0 else train.adam_wd, beta2 if beta2 >= 0 else train.adam_beta2)


def build_optimizers(
    groups: Mapping[str, NamedParams],
    train: Any,
    tied_embeddings: bool = True,
    rank: int = 0,
    world_size: int = 1,
    torch_compile: str = "off",
) -> Optimizers:
    """Muon on `groups["matrix"]`; AdamW on embed / head / scalar groups (TrainConfig lrs and decays).

    `groups` is `model.param_groups()`: {"matrix", "embed", "scalar", "head"} -> [(name, param)].
    `torch_compile` (TORCH_COMPILE) decides whether Muon's Newton-Schulz is compiled.
    """
    unknown = set(groups) - {"matrix", "embed", "scalar", "head"}
    if unknown:
        raise ConfigError(f"unknown parameter groups {sorted(unknown)}; expected matrix/embed/scalar/head")
    seen: set[int] = set()
    for name, p in (item for g in groups.values() for item in g):
        if id(p) in seen:
            raise ConfigError(f"parameter {name} appears in two optimizer groups")
        seen.add(id(p))

    def tensors(key: str) -> list[Tensor]:
        return [p for _, p in groups.get(key, ()) if p.requires_grad]

    optimizers: list[torch.optim.Optimizer] = []
    matrix = tensors("matrix")
    if matrix:
        muon = Muon(
            matrix,
            lr=train.matrix_lr,
            momentum=train.muon_momentum_warmup_start if train.muon_momentum_warmup_steps else train.muon_momentum,
            backend_steps=train.muon_backend_steps,
            ns_coeffs=train.muon_ns_coeffs,
            weight_decay=train.muon_wd,
            rank=rank,
            world_size=world_size,
            torch_compile=torch_compile,
            ns_dtype=NS_DTYPES[train.muon_ns_dtype],
            row_normalize=train.muon_row_normalize,
        )
        muon.param_groups[0].update(name="matrix", base_lr=train.matrix_lr)
        optimizers.append(muon)

    embed_lr = train.tied_embed_lr if tied_embeddings else train.embed_lr
    adam_groups = []
    for key, lr in (("embed", embed_lr), ("head", train.head_lr), ("scalar", train.scalar_lr)):
        ps = tensors(key)
        if ps:
            wd, beta2 = adam_group_settings(train, key)
            adam_groups.append(dict(params=ps, lr=lr, base_lr=lr, name=key, weight_decay=wd,
                                    betas=(train.adam_beta1, beta2)))
    if adam_groups:
        first = adam_groups[0]["params"][0]
        adam = torch.optim.AdamW(
            adam_groups,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_eps,
            fused=first.is_cuda,
        )
        optimizers.append(adam)
    all_params = matrix + [p for g in adam_groups for p in g["params"]]
    return Optimizers(optimizers=optimizers, params=all_params, grad_clip_norm=train.grad_clip_norm)
