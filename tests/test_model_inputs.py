"""pgolf.model.inputs: BigramHash (hash values, projection rule) and the BOS mask (technique-spec §7.1 item 8)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model_fixtures import SMALL, perturbed
from pgolf.config import PRESETS
from pgolf.model import BOS_ID, GPT, bigram_hash


@pytest.mark.parametrize("bigram_dim, model_dim, rule, present", [
    (128, 512, "if_needed", True), (128, 128, "if_needed", False), (64, 128, "if_needed", True),
    (128, 128, "always", True), (32, 64, "always", True),
])
def test_bigram_projection_exists_exactly_when_the_widths_differ(bigram_dim, model_dim, rule, present):
    cfg = replace(PRESETS["seed"]().model, model_dim=model_dim, num_heads=4, num_kv_heads=2, num_layers=2,
                  bigram_dim=bigram_dim, bigram_proj=rule)
    with torch.device("meta"):
        model = GPT(cfg)
    assert (model.bigram.proj is not None) == present
    assert ("bigram.proj.weight" in dict(model.param_groups()["matrix"])) == present


def test_bigram_hash_values():
    idx = torch.tensor([[5, 7, BOS_ID, 9, 7]])
    expected = [15, (36313 * 7 ^ 27191 * 5) % 15, 15, (36313 * 9 ^ 27191 * BOS_ID) % 15, (36313 * 7 ^ 27191 * 9) % 15]
    assert bigram_hash(idx, 16, bos_mask=True).tolist() == [expected]
    expected[2] = (36313 * BOS_ID ^ 27191 * 7) % 15  # PR #490: a BOS is hashed with the token before it
    assert bigram_hash(idx, 16, bos_mask=False).tolist() == [expected]


def two_docs(prev_token: int) -> torch.Tensor:
    """Doc k = [BOS, 5, 9, 13, prev_token], doc k+1 = [BOS, 6, 11, ...] in one row."""
    return torch.tensor([[BOS_ID, 5, 9, 13, prev_token, BOS_ID, 6, 11, 20, 30]])


def test_x0_at_bos_ignores_the_previous_document():
    model = perturbed(SMALL)
    with torch.no_grad():
        a, b = model.embed(two_docs(40)), model.embed(two_docs(41))
    torch.testing.assert_close(a[:, 5], b[:, 5], rtol=0, atol=0)  # the BOS of doc k+1
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-3  # the changed token itself
    # control: the same change one position later (a non-BOS position) does reach x0
    c, d = model.embed(two_docs(40)[:, [0, 1, 2, 3, 4, 6]]), model.embed(two_docs(41)[:, [0, 1, 2, 3, 4, 6]])
    assert (c[:, 5] - d[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("path", ["smear", "bigram"])
def test_each_input_path_alone_respects_bos(path):
    off = dict(smear=dict(bigram_buckets=0), bigram=dict(smear_gate=False))[path]
    model = perturbed(replace(SMALL, **off))
    with torch.no_grad():
        a, b = model.embed(two_docs(40)), model.embed(two_docs(41))
    torch.testing.assert_close(a[:, 5], b[:, 5], rtol=0, atol=0)
    assert (a[:, 6] - b[:, 6]).abs().max() == 0  # pos 6 reads BOS and token 6 only, both unchanged


def test_without_the_mask_x0_is_pr490s_formula_and_leaks_across_bos():
    model = perturbed(replace(SMALL, bos_mask=False))
    idx = two_docs(40)
    with torch.no_grad():
        e = model.tok_emb(idx) + model.bigram(idx)
        x = F.rms_norm(e, (e.size(-1),))
        g = torch.sigmoid(model.smear.gate)
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)  # x_{-1} = 0
        torch.testing.assert_close(model.embed(idx), (1 - g) * x + g * prev, rtol=0, atol=0)
        a, b = model.embed(two_docs(40)), model.embed(two_docs(41))
    assert (a[:, 5] - b[:, 5]).abs().max() > 1e-3  # the BOS of doc k+1 sees doc k's last token


def test_full_forward_at_bos_ignores_the_previous_document_without_attention():
    """With attention outputs zeroed, position i sees only x0_i: BOS logits must not move."""
    model = perturbed(SMALL)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
        a, b = model(two_docs(40)), model(two_docs(41))
    torch.testing.assert_close(a[:, 5], b[:, 5], rtol=0, atol=0)
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-3
