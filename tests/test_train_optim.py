"""Muon + AdamW groups (pgolf.train.optim): Newton-Schulz, the update rule, schedules, DDP sharing."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf import config
from pgolf.errors import ConfigError
from pgolf.train.optim import (
    NS_CLASSIC,
    NS_POLAR_EXPRESS,
    Muon,
    build_optimizers,
    momentum_at,
    newton_schulz,
    ns_coefficients,
)


def _polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).float()


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 48)])
@pytest.mark.parametrize("kind", ["classic", "polar_express"])
def test_newton_schulz_approximates_the_polar_factor(shape, kind):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    o = newton_schulz(g, ns_coefficients(kind, 5), torch.float32)
    assert o.shape == g.shape
    sv = torch.linalg.svdvals(o)
    # the quintic is tuned for speed, not exactness: singular values land in a band around 1
    assert sv.min() > 0.5 and sv.max() < 1.25, sv
    cos = torch.nn.functional.cosine_similarity(o.flatten(), _polar(g).flatten(), dim=0)
    assert cos > 0.95


def test_ns_coefficients_schedules():
    assert ns_coefficients("classic", 5) == [NS_CLASSIC] * 5
    assert ns_coefficients("polar_express", 5) == list(NS_POLAR_EXPRESS)
    assert ns_coefficients("polar_express", 7)[5:] == [NS_POLAR_EXPRESS[-1]] * 2
    with pytest.raises(ConfigError, match="MUON_NS_COEFFS"):
        ns_coefficients("cubic", 5)


def test_newton_schulz_in_bf16_rounds_as_the_sources_do():
    """Both sources: X = G in bf16 / (‖X‖ + 1e-7), wide orientation, X <- aX + (bA + (cA)A)X, A = XXᵀ."""
    torch.manual_seed(2)
    for shape in ((48, 16), (16, 40)):
        g = torch.randn(*shape)
        x = g.bfloat16()
        x = x / (x.norm() + 1e-7)
        x = x.T if shape[0] > shape[1] else x
        for a, b, c in [NS_CLASSIC] * 5:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x  # Python: c * A @ A is (c * A) @ A
        x = x.T if shape[0] > shape[1] else x
        assert torch.equal(newton_schulz(g, ns_coefficients("classic", 5), torch.bfloat16), x)


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_newton_schulz_is_bf16_on_every_device_unless_asked(preset):
    matrix = _Toy().param_groups()
    muon = build_optimizers(matrix, config.resolve(preset, env={}).train).optimizers[0]
    assert muon.ns_dtype == torch.bfloat16  # as both sources, CPU included
    fp32 = build_optimizers(matrix, config.resolve(preset, env={"MUON_NS_DTYPE": "fp32"}).train).optimizers[0]
    assert fp32.ns_dtype == torch.float32


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_muon_step_matches_the_hand_written_rule(dtype, tol):
    torch.manual_seed(1)
    lr, mu, wd = 0.1, 0.9, 0.5
    tall = torch.nn.Parameter(torch.randn(16, 4))  # rows/cols = 4 -> update scaled by 2
    wide = torch.nn.Parameter(torch.randn(4, 16))  # rows/cols < 1 -> scale 1
    w0 = [tall.detach().clone(), wide.detach().clone()]
    grads = [[torch.randn(16, 4), torch.randn(4, 16)] for _ in range(2)]
    opt = Muon([tall, wide], lr=lr, momentum=mu, weight_decay=wd, ns_dtype=dtype)
    coeffs = ns_coefficients("classic", 5)

    expected = [w.clone() for w in w0]
    bufs = [torch.zeros_like(w) for w in w0]
    for step_grads in grads:
        for p, g in zip((tall, wide), step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):
            bufs[i] = mu * bufs[i] + g
            u = g + mu * bufs[i]
            scale = math.sqrt(max(1.0, g.size(0) / g.size(1)))
            update = (newton_schulz(u, coeffs, dtype) * scale).float()  # scaled in NS precision
            expected[i] = expected[i] * (1 - lr * wd) - lr * update
    torch.testing.assert_close(tall.detach(), expected[0], rtol=1e-5, atol=tol)
    torch.testing.assert_close(wide.detach(), expected[1], rtol=1e-5, atol=tol)
    assert opt.state[tall]["momentum_buffer"].dtype == torch.float32


def test_muon_refuses_vectors():
    with pytest.raises(ConfigError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def test_momentum_warmup_085_to_095_over_500_steps():
    values = [momentum_at(s, 0.85, 0.95, 500) for s in (0, 100, 250, 500, 5000)]
    assert values == pytest.approx([0.85, 0.87, 0.90, 0.95, 0.95])
    assert momentum_at(0, 0.85, 0.95, 0) == 0.95


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.w1 = torch.nn.Linear(8, 8, bias=False)
        self.w2 = torch.nn.Linear(8, 8, bias=False)
        self.gain = torch.nn.Parameter(torch.ones(8))

    def param_groups(self):
        return {"matrix": [("w1", self.w1.weight), ("w2", self.w2.weight)], "embed": [("emb", self.emb.weight)],
                "scalar": [("gain", self.gain)], "head": []}


def test_build_optimizers_uses_the_spec_learning_rates_and_decays():
    cfg = config.resolve("seed", env={})
    opts = build_optimizers(_Toy().param_groups(), cfg.train)
    muon, adam = opts.optimizers
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    assert muon.param_groups[0]["lr"] == 0.025 and muon.param_groups[0]["weight_decay"] == 0.04
    assert muon.param_groups[0]["momentum"] == 0.85  # warm-up start
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in adam.param_groups}
    assert lrs == {"embed": (0.035, 0.04), "scalar": (0.025, 0.04)}
    assert adam.defaults["betas"] == (0.9, 0.95) and adam.defaults["eps"] == 1e-8
    opts.set_lr_mult(0.5)
    assert muon.param_groups[0]["lr"] == 0.0125 and adam.param_groups[0]["lr"] == 0.0175
    opts.set_muon_momentum(0.93)
    assert muon.param_groups[0]["momentum"] == 0.93
    untied = build_optimizers(_Toy().param_groups(), cfg.train, tied_embeddings=False)
    assert untied.optimizers[1].param_groups[0]["lr"] == cfg.train.embed_lr


def test_build_optimizers_refuses_a_parameter_in_two_groups():
    toy = _Toy()
    groups = toy.param_groups()
    groups["scalar"].append(("w1 again", toy.w1.weight))
    with pytest.raises(ConfigError, match="two optimizer groups"):
        build_optimizers(groups, config.resolve("seed", env={}).train)


def test_global_grad_clip_at_0_3():
    toy = _Toy()
    opts = build_optimizers(toy.param_groups(), config.resolve("seed", env={}).train)
    for p in toy.parameters():
        p.grad = torch.full_like(p, 1.0)
    before = math.sqrt(sum(p.numel() for p in toy.parameters()))
    norm = opts.clip_grad_norm()
    assert float(norm) == pytest.approx(before)
    after = math.sqrt(sum(float(p.grad.square().sum()) for p in toy.parameters()))
    assert after == pytest.approx(0.3, rel=1e-4)


def test_optimizer_state_roundtrip_continues_identically():
    def run(steps, state=None):
        torch.manual_seed(0)
        toy = _Toy()
        opts = build_optimizers(toy.param_groups(), config.resolve("seed", env={}).train)
        if state:
            toy.load_state_dict(state[0])
            opts.load_state_dict(state[1])
        for s in steps:
            torch.manual_seed(100 + s)
            loss = (toy.w2(toy.w1(toy.emb(torch.arange(10)))) * toy.gain).square().mean()
            loss.backward()
            opts.step()
            opts.zero_grad()
        return toy, opts

    straight, _ = run(range(4))
    half, opts = run(range(2))
    import copy

    resumed, _ = run(range(2, 4), (copy.deepcopy(half.state_dict()), copy.deepcopy(opts.state_dict())))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---- two ranks over gloo: owner-computed Newton-Schulz, shared in one all-reduce ---------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _muon_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(8, 8 + i)) for i in range(3)]
        opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, rank=rank, world_size=world)
        for step in range(2):
            for i, p in enumerate(params):
                torch.manual_seed(10 * step + i)
                p.grad = torch.randn_like(p)
            opt.step()
        out[rank] = [p.detach().clone() for p in params]
    finally:
        dist.destroy_process_group()


def test_muon_under_two_gloo_ranks_matches_one_process():
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(8, 8 + i)) for i in range(3)]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    for step in range(2):
        for i, p in enumerate(params):
            torch.manual_seed(10 * step + i)
            p.grad = torch.randn_like(p)
        opt.step()
    out = mp.Manager().dict()
    # fork: the children inherit the imported modules instead of re-importing torch (seconds each)
    mp.start_processes(_muon_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        for single, shared in zip(params, out[rank]):
            # the summed buffer adds exact zeros from the non-owner, so the result is bit-identical
            assert torch.equal(single.detach(), shared)
