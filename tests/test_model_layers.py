"""pgolf.model.layers: per-row fake quantization, QAT through CastedLinear (eager and compiled), rotary."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model_fixtures import SMALL, perturbed, tokens
from pgolf.model.compiled import Compiled
from pgolf.model import GPT, CastedLinear, fake_quant_rows


def test_fake_quant_rows_int6():
    w = torch.tensor([[3.1, -1.0, 0.04, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.62, 0.31, 0.16, 0.0]])
    expected = torch.tensor([[3.1, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.62, 0.32, 0.16, 0.0]])
    torch.testing.assert_close(fake_quant_rows(w, 6), expected, rtol=0, atol=1e-6)
    q = fake_quant_rows(torch.randn(16, 64), 6)
    scale = q.abs().amax(1, keepdim=True) / 31
    steps = q / scale
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)  # on the int6 grid
    assert steps.abs().max() <= 31 + 1e-4


def test_qat_changes_forward_and_uses_straight_through_gradients():
    model = perturbed(SMALL)
    idx, tgt = tokens(), tokens(seed=1)
    with torch.no_grad():
        plain = model(idx)
        model.set_qat(True)
        assert model.qat_enabled
        quant = model(idx)
        model.set_qat(False)
        again = model(idx)
    assert (plain - quant).abs().max() > 1e-4
    torch.testing.assert_close(plain, again, rtol=0, atol=0)
    assert not any("qat" in k for k in model.state_dict())  # the flag is not saved

    # STE: grads with QAT on equal the grads of a model whose weights ARE the fake-quantized ones
    model.set_qat(True)
    model.loss(idx, tgt).backward()
    ref = GPT(SMALL)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in ref.blocks.modules():
            if isinstance(m, CastedLinear) and m.qat_bits:
                m.weight.copy_(fake_quant_rows(m.weight, 6))
    ref.loss(idx, tgt).backward()
    w, w_ref = model.blocks[1].mlp.fc.weight, ref.blocks[1].mlp.fc.weight
    assert w.grad.abs().max() > 0
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    # only block matrices are quantized: not the gate, not the bigram projection
    assert model.blocks[0].attn.gate.qat_bits == 0 and model.bigram.proj.qat_bits == 0


def _compiled_qat_roundtrip(backend: str):
    model = perturbed(replace(SMALL, num_layers=2))
    compiled = Compiled("qat_roundtrip", model, planned=2, state=lambda: {"qat": model.qat_enabled}, backend=backend)
    idx = tokens()
    with torch.no_grad():
        plain = compiled(idx)
        assert compiled.graphs == 1  # QAT off: the fake-quant is not traced at all
        model.set_qat(True)
        quant = compiled(idx)
        eager_quant = model(idx)
        model.set_qat(False)
        again = compiled(idx)
        model.set_qat(True)
        compiled(idx)
    # QAT on is the second graph; flipping back and forth reuses both (never frozen at trace time)
    assert compiled.graphs == 2 and [e.reason for e in compiled.events][1] == "qat False -> True"
    assert (plain - quant).abs().max() > 1e-4  # the flag took effect inside the compiled graph
    torch.testing.assert_close(quant, eager_quant, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, again, rtol=0, atol=0)


def test_qat_flag_takes_effect_under_torch_compile():
    _compiled_qat_roundtrip("aot_eager")  # dynamo tracing + functionalized graph, seconds on CPU


@pytest.mark.slow
def test_qat_flag_takes_effect_under_inductor():
    """The same on inductor, for one CastedLinear (the whole model costs ~40 s CPU of C++ compiles)."""
    torch.manual_seed(0)
    model = GPT(replace(SMALL, num_layers=1))
    linear = model.blocks[0].mlp.fc
    compiled = Compiled("qat_linear", linear, planned=2)
    x = torch.randn(4, 32)
    with torch.no_grad():
        plain = compiled(x)
        model.set_qat(True)
        quant = compiled(x)
        model.set_qat(False)
        again = compiled(x)
    assert compiled.graphs == 2
    torch.testing.assert_close(quant, F.linear(x, fake_quant_rows(linear.weight, 6)), rtol=1e-5, atol=1e-6)
    assert (plain - quant).abs().max() > 1e-4
    torch.testing.assert_close(plain, again, rtol=0, atol=0)


def test_rotary_ntk_base():
    seed = GPT(replace(SMALL, rope_dims=0, rope_ntk_ref_len=16))
    d = SMALL.head_dim
    for T, base in ((16, 1e4), (32, 1e4 * 2 ** (d / (d - 2)))):
        cos, _ = seed.rotary(T, torch.device("cpu"))
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        torch.testing.assert_close(cos[1].double(), torch.cos(inv_freq), rtol=0, atol=1e-6)
