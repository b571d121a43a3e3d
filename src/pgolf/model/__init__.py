"""The GPT of the Parameter Golf seed (PR #490), its extras and PR #1855's elements, every element a
ModelConfig field.

References: technique-spec §2 (column (a) = the record script, (a-sub) = its final script, (b) = PR
#1855, the `frontier` presets; docs/frontier-model.md) and the challenge's naive baseline (`baseline`
preset). The files read leaf-first:

    layers.py     rms_norm / RMSNorm, fake_quant_rows, CastedLinear (QAT), Rotary / apply_rotary
    attention.py  the attention kernel (FA3 | SDPA, document isolation) and CausalSelfAttention
                  (dense or sparse gate, XSA)
    blocks.py     MLP and Block (the residual wiring of one layer; Block.parallel: two lanes)
    inputs.py     BigramHash, SmearGate and BosSmearGate (the input path, BOS mask)
    gpt.py        GPT (the block schedule with depth recurrence, U-Net skips and their gates, lanes,
                  final_norm, head, init, parameter groups) and build_model

    tokens ─► tok_emb + BigramHash ─► RMSNorm ─► SmearGate ─► x0
    x0 ─► encoder blocks (push) ─► decoder blocks (pop skip ⊙ w) ─► RMSNorm ─► tied head ─► softcap

Parameter names: matrices live in `CastedLinear` modules (c_q, c_k, c_v, proj, fc, and the attention
gate's W, the one matrix whose name says `gate`); every vector/control parameter's name contains one of
norm|scale|gain|mix|skip|lambda|gate|smear (the sparse gates' 2-D `gate_w` too), so optimizers and
TTT can select by name.

Calling convention under torch.compile / DDP: call the wrapper, `wrapped(idx)` for logits,
`wrapped(idx, targets)` for the mean loss and `wrapped(idx, targets, reduction="none")` for the
per-token NLL; the `loss` / `per_token_nll` methods are the same paths on the bare module.
"""

from pgolf.model.attention import attention_backend_in_use, causal_attention
from pgolf.model.gpt import GPT, build_model
from pgolf.model.inputs import BOS_ID, bigram_hash
from pgolf.model.layers import CastedLinear, fake_quant_rows

__all__ = [
    "BOS_ID", "CastedLinear", "GPT", "attention_backend_in_use", "bigram_hash", "build_model",
    "causal_attention", "fake_quant_rows",
]
