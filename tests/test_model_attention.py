"""pgolf.model.attention: the SDPA kernel against explicit GQA, backend choice on CPU, XSA."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model_fixtures import SMALL, perturbed, tokens
from pgolf.errors import ConfigError
from pgolf.model import attention_backend_in_use, build_model, causal_attention


def test_sdpa_matches_explicit_gqa_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 7, 4, 8, generator=gen), torch.randn(2, 7, 2, 8, generator=gen), torch.randn(2, 7, 2, 8, generator=gen)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv)
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), ref, rtol=1e-5, atol=1e-5)


def test_attention_backend_selection_on_cpu():
    assert attention_backend_in_use(SMALL, "cpu") == "sdpa"
    assert attention_backend_in_use("sdpa", "cpu") == "sdpa"
    with pytest.raises(ConfigError, match="ATTENTION_BACKEND=fa3"):
        attention_backend_in_use("fa3", "cpu")
    with pytest.raises(ConfigError):
        build_model(replace(SMALL, attention_backend="fa3"), "cpu")


def test_xsa_removes_the_own_value_direction():
    """At an XSA layer each head's output is orthogonal to its position's raw (pre-VR) value vector."""
    model = perturbed(SMALL)  # 3 layers, XSA on the last one
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.attn.c_v.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__((i, "v"), out))
        block.attn.proj.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__((i, "y"), inp[0]))
    with torch.no_grad():
        model(tokens())

    def overlap(layer: int) -> float:
        v = F.normalize(seen[layer, "v"].view(2, 24, 1, 16), dim=-1)  # 1 KV head for both query heads
        y = seen[layer, "y"].view(2, 24, 2, 16)
        assert y.abs().max() > 1e-2
        return (y * v).sum(-1).abs().max().item()

    assert overlap(2) < 1e-5
    assert overlap(1) > 1e-3  # a layer without XSA has no such constraint
