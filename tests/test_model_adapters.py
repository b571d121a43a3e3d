"""The adapter hook: every site is called at every slot in run order, and its delta lands where it says."""

from __future__ import annotations

import torch

from model_fixtures import SMALL, perturbed, tokens
from pgolf.model.adapters import HEAD_SLOT, SITES


class Recorder:
    """Returns `scale` × a fixed random projection of x at one (slot, site), records every call."""

    def __init__(self, target: tuple[int, str] | None = None, scale: float = 0.0):
        self.calls: list[tuple[int, str, tuple[int, ...]]] = []
        self.target, self.scale = target, scale
        self.out_dims: dict[tuple[int, str], int] = {}

    def delta(self, slot, site, x):
        self.calls.append((slot, site, tuple(x.shape)))
        if (slot, site) != self.target:
            return None
        out = {"q": SMALL.num_heads * SMALL.head_dim, "k": SMALL.num_kv_heads * SMALL.head_dim,
               "v": SMALL.num_kv_heads * SMALL.head_dim, "head": SMALL.vocab_size}.get(site, SMALL.model_dim)
        w = torch.randn(x.size(-1), out, generator=torch.Generator().manual_seed(7))
        return self.scale * x @ w


def test_every_site_at_every_slot_in_run_order():
    model = perturbed(SMALL)
    rec = Recorder()
    idx = tokens()
    with torch.no_grad():
        plain = model(idx)
        hooked = model(idx, adapter=rec)
    assert torch.equal(plain, hooked)  # no delta, no change
    block_sites = [s for s in SITES if s != "head"]
    expected = [(slot, site) for slot in range(model.num_slots) for site in block_sites] + [(HEAD_SLOT, "head")]
    assert sorted((c[0], c[1]) for c in rec.calls) == sorted(expected)
    assert [c[0] for c in rec.calls] == sorted(c[0] for c in rec.calls[:-1]) + [HEAD_SLOT]
    assert all(shape == (*idx.shape, SMALL.model_dim) for _, _, shape in rec.calls)


def test_each_site_delta_changes_the_output_and_stays_causal():
    model = perturbed(SMALL)
    idx = tokens()
    with torch.no_grad():
        plain = model(idx)
        for site in SITES:
            slot = HEAD_SLOT if site == "head" else 1
            out = model(idx, adapter=Recorder((slot, site), scale=0.5))
            assert not torch.allclose(out, plain), site
            # the delta is per position, so changing the last token changes only the last logits
            idx2 = idx.clone()
            idx2[:, -1] = (idx2[:, -1] + 1) % SMALL.vocab_size
            out2 = model(idx2, adapter=Recorder((slot, site), scale=0.5))
            torch.testing.assert_close(out[:, :-1], out2[:, :-1])


def test_gradients_reach_the_adapter_only_through_its_delta():
    model = perturbed(SMALL)
    for p in model.parameters():
        p.requires_grad_(False)
    a = torch.zeros(SMALL.model_dim, SMALL.model_dim, requires_grad=True)

    class Lin:
        def delta(self, slot, site, x):
            return x @ a if site == "mlp" and slot == 0 else None

    loss = model(tokens(), tokens(seed=1), adapter=Lin())
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
