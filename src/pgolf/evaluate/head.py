"""AsymLogit rescale: the eval path's logit cap with separate scales for positive and negative logits.

As PR #1923 defines it and #1945 / #2130 / #2135 use it (technique-spec §10): the model's symmetric cap
`c·tanh(z / c)` is replaced, on the evaluation path only, by

    z > 0:  s₊·tanh(z / s₊)        z ≤ 0:  s₋·tanh(z / s₋)

with two learnable scalars s₊ = softcap_pos and s₋ = softcap_neg, both initialised to LOGIT_SOFTCAP, so
the head is exactly the model's own cap until something trains them. Training never touches them (the
train path keeps the symmetric cap), so the upstream artifacts ship them at their initial value; here
they are created at evaluation instead, with no artifact bytes. Only score-first TTT moves them (upstream:
the global SGD phase over already-scored documents; here: `ttt.Adapter`, with the other trainable
parameters, on committed chunks only), so they are fitted on already-scored targets and nothing else.

The wrapped model is built with LOGIT_SOFTCAP = 0, i.e. it returns its raw fp32 logits z.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class AsymLogitHead(nn.Module):
    """model(idx) -> raw logits z; this module -> the asymmetric cap of z (fp32)."""

    def __init__(self, model: nn.Module, softcap: float):
        super().__init__()
        if softcap <= 0:
            raise ValueError(f"AsymLogit needs a positive LOGIT_SOFTCAP to start from, got {softcap}")
        self.model = model
        device = next(model.parameters()).device
        self.softcap_pos = nn.Parameter(torch.tensor(float(softcap), device=device), requires_grad=False)
        self.softcap_neg = nn.Parameter(torch.tensor(float(softcap), device=device), requires_grad=False)

    def forward(self, idx: torch.Tensor, adapter=None) -> torch.Tensor:
        """`adapter`: the model's test-time adapter hook (per-document LoRA), passed through."""
        z = self.model(idx) if adapter is None else self.model(idx, adapter=adapter)
        return asym_softcap(z.float(), self.softcap_pos, self.softcap_neg)


def asym_softcap(z: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """s₊·tanh(z/s₊) where z > 0, s₋·tanh(z/s₋) elsewhere (equal to c·tanh(z/c) when s₊ = s₋ = c)."""
    return torch.where(z > 0, pos * torch.tanh(z / pos), neg * torch.tanh(z / neg))
