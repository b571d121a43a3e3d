"""pgolf.bench.perf: the bench's step and compression measurements, at sizes that run in seconds.

The two compiled measurements (fake_quant_cost, newton_schulz_cost) only wrap pgolf.model.compiled, which
test_compiled and the compiled-pipeline test cover; they run in `make bench`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pgolf.bench import perf
from pgolf.bench import at_shape
from pgolf.quantize import artifact as A
from pgolf.quantize.quantizer import matrix_keys_of, quantize_state_dict


@pytest.fixture(scope="module")
def debug_entries():
    """A debug-size model's artifact entries, from RTN on perturbed weights (a stand-in for trained ones)."""
    from pgolf.model import build_model

    cfg = at_shape("seed-plus", "debug")
    torch.manual_seed(0)
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in build_model(cfg.model, "cpu").state_dict().items()}
    return cfg, quantize_state_dict(state, replace(cfg.quant, quant_method="rtn"), matrix_keys_of(cfg))[0]


def test_scoring_loop_copies_nothing_per_batch():
    counts = perf.copy_counts(at_shape("seed-plus", "debug"), batches=3)
    assert counts == {"per_scoring_batch": 0, "per_evaluation": 1}  # the window table, once


def test_copy_counter_counts_host_to_device_requests():
    def three() -> None:
        x = torch.zeros(4)
        x.to("cpu")
        x.to(torch.device("cpu"), non_blocking=True)
        torch.tensor([1, 2], device="cpu")
        x.float()  # a dtype change is not a copy to a device

    assert perf.count_device_copies(three) == 3


def test_full_size_entries_follow_the_source_distribution(debug_entries):
    cfg, source = debug_entries
    target = at_shape("seed-plus", "tiny")
    entries = perf.full_size_entries(source, target)
    from pgolf.model import build_model

    state = build_model(target.model, "cpu").state_dict()
    assert sorted(e.name for e in entries) == sorted(state)
    by_name = {e.name: e for e in entries}
    for name, t in state.items():
        assert by_name[name].shape == tuple(t.shape)
    src = np.concatenate([e.parts["q"].numpy().ravel() for e in source if e.name.endswith("mlp.fc.weight")])
    out = np.concatenate([e.parts["q"].numpy().ravel() for e in entries if e.name.endswith("mlp.fc.weight")])
    assert set(np.unique(out)) <= set(np.unique(src))  # values drawn from the source's own
    assert abs(out.std() - src.std()) < 0.05 * src.std()
    assert by_name["blocks.0.mlp.fc.weight"].bits == target.quant.matrix_bits


def test_compression_cost_compares_the_two_selections(debug_entries):
    _, entries = debug_entries
    out = perf.compression_cost(entries)
    assert out["previous"]["bytes"] == out["now"]["bytes"]  # same winner: the smallest of the same candidates
    assert set(out["previous"]["candidates"]) == {f"{lay}+{n}" for lay in A.LAYOUTS for n in A.COMPRESSORS}
    assert out["previous"]["seconds"] > 0 and out["now"]["seconds"] > 0


@pytest.mark.slow
def test_overlap_cost_on_two_gloo_ranks():
    out = perf.overlap_cost(at_shape("seed-plus", "debug"), rounds=2)
    assert out["world_size"] == 2 and out["same_gradients"] is True and out["buckets"] >= 2
    assert all(v > 0 for v in out["step_ms"].values())
