"""Evaluation of the shipped artifact: rows, sliding window, score-first TTT and phased per-document LoRA
TTT (technique-spec §1.5, §1.6, §5.1, §5.2), under one eval clock with a budget guard, with an optional
per-token audit file.

    windows.py  window / chunk / training-sequence planning (pure; tiles every target exactly once)
    score.py    batched per-token NLL and the Tally that commits scored targets
    ttt.py      trainable-parameter selection and the score-first Adapter
    budget.py   the eval clock and the guard that stops TTT before the budget runs out
    docs.py     lora_ttt's documents (cut at BOS), batches, chunk sizes, phase boundaries and score order
    lora.py     batched per-document LoRA (the model's adapter hook) and its per-document AdamW
    phased.py   the lora_ttt loop: score a chunk, commit it, step the LoRA; global SGD phases
    ngram.py    the token-only causal n-gram tilt (stream order, or score order for lora_ttt)
    head.py     AsymLogit rescale
    core.py     evaluate(): load, build, warm up, score (and adapt), reduce, write the record
"""

from pgolf.evaluate.core import MODES, EvalResult, evaluate, load_checkpoint
from pgolf.evaluate.windows import Chunk, Window, plan_chunks, plan_rows, plan_windows, split_range

__all__ = [
    "MODES", "Chunk", "EvalResult", "Window", "evaluate", "load_checkpoint", "plan_chunks", "plan_rows",
    "plan_windows", "split_range",
]
