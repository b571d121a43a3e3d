"""What survives a step: the EMA shadow, the shipped weights and the resumable checkpoint.

* `EMA`: an fp32 shadow of every parameter, shadow <- d * shadow + (1 - d) * live after each step
  (spec §3 (a): decay 0.997, loaded before export). Buffers are not averaged (the QAT flag and the
  rotary caches are state, not weights).
* `export_weights`: the state dict that ships (`checkpoint/model.pt`): the model's exact keys, every
  float tensor fp32 on CPU, the parameters taken from the EMA when there is one.
* `save_state` / `load_state`: `checkpoint/state.pt` for long runs: live weights, optimizer state,
  EMA, loader position, RNG streams, step and train clock. Optimizer state is identical on every
  rank (see pgolf.train.optim), and every rank's loader walks the same stream, so rank 0's copy is complete.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pgolf.config import Config
from pgolf.errors import ConfigError, TrainingError
from pgolf.train.runlog import atomic_torch_save

STATE_VERSION = 1


class EMA:
    """Exponential moving average of a model's parameters, in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = [p.detach().float() for _, p in model.named_parameters()]
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, live, alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise TrainingError(f"EMA state lacks {len(missing)} parameters (first: {missing[0]}); "
                                "resume with the same model config")
        for name, buf in zip(self.names, self.shadow):
            buf.copy_(state[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into the model (cast to each parameter's dtype)."""
        for (_, p), buf in zip(model.named_parameters(), self.shadow):
            p.copy_(buf.to(p.dtype))


def export_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with float tensors as fp32 on CPU (call after EMA.copy_to)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        out[name] = t.float().clone() if t.is_floating_point() else t.clone()
    return out


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device training runs on (the machine's RAM for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def check_fits(cfg: Config, device: torch.device) -> None:
    """Refuse, before the model is built, a shape whose training state cannot fit on `device`.

    A lower bound, so it never refuses a model that fits: only the big matrices are counted
    (embedding, attention, MLP, an untied head), at 12 bytes a parameter for fp32 weights,
    gradients and one optimizer moment (16 with the EMA), plus one micro-batch of fp32 logits.
    Activations, the second Adam moment, small tensors and allocator slack come on top.
    """
    m, t = cfg.model, cfg.train
    kv_dim = m.num_kv_heads * m.head_dim
    per_layer = 2 * m.model_dim * m.model_dim + 2 * m.model_dim * kv_dim + 2 * m.model_dim * m.mlp_hidden
    params = m.vocab_size * m.model_dim * (1 if m.tie_embeddings else 2) + m.num_layers * per_layer
    need = params * (16 if t.ema_decay > 0 else 12) + 4 * t.micro_batch_seqs * t.train_seq_len * m.vocab_size
    have = device_memory_bytes(device)
    if need > have:
        raise ConfigError(
            f"the model cannot fit: over {params:,} parameters need at least {need / 2**30:,.1f} GiB for "
            f"weights, gradients, optimizer state and logits; {device} has {have / 2**30:,.1f} GiB: lower "
            "MODEL_DIM, NUM_LAYERS, MLP_MULT, VOCAB_SIZE or MICRO_BATCH_SEQS")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, **state: Any) -> None:
    """Write the resumable state atomically (rank 0 only; the caller decides)."""
    atomic_torch_save(path, {"version": STATE_VERSION, **state})


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}; set CHECKPOINT_EVERY_SECONDS>0 on the first run")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: checkpoint version {state.get('version')} != {STATE_VERSION}; start afresh")
    return state
