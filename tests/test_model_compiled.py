"""pgolf.model.compiled: each wrapper keeps its own graphs, counts them, and says why each one was compiled.

The counting does not depend on the backend, so these use the eager backend (Dynamo alone, no C++
build); the inductor path is exercised by the selftest and the compiled-pipeline test.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pgolf.model import compiled as C
from pgolf.config import PRESETS
from pgolf.model import GPT, build_model


def small_model() -> GPT:
    torch.manual_seed(0)
    return build_model(PRESETS["debug"]().model, "cpu")  # resolves the attention kernel outside any trace


def test_compile_rule():
    assert C.compile_enabled("auto", "cuda") and not C.compile_enabled("auto", "cpu")
    assert C.compile_enabled("on", "cpu") and not C.compile_enabled("off", "cuda")
    fn = lambda x: x  # noqa: E731
    assert C.maybe_compiled("score", fn, "auto", "cpu") is fn
    assert C.is_compiled(C.maybe_compiled("score", fn, "on", "cpu"))


def test_wrappers_of_the_same_model_keep_separate_graphs():
    """Two purposes over one model: each wrapper holds its own graph and GPT.forward's code holds none,
    so one purpose's variants never count against another's recompile limit."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = small_model()
    train = C.Compiled("t_train", model.loss, backend="eager")
    score = C.Compiled("t_score", model, backend="eager")
    x = torch.randint(0, 1024, (2, 16))
    train(x, x).backward()
    with torch.inference_mode():
        score(x)
        score(x)
    assert (train.graphs, score.graphs) == (1, 1)
    assert _debug_get_cache_entry_list(GPT.forward.__code__) == []
    assert train.entry.__code__ is not score.entry.__code__


def test_each_compile_is_logged_with_its_reason(caplog):
    model = small_model().eval()
    score = C.Compiled("t_reasons", model, planned=1, backend="eager")
    x = torch.randint(0, 1024, (2, 16))
    with caplog.at_level(logging.INFO, logger="pgolf.compile"):
        with torch.no_grad():
            score(x)
            score(x)  # same signature: no compile
            score(x[:1])  # short batch: a second graph, over the plan of 1
        with torch.inference_mode():
            score(torch.randint(0, 1024, (2, 16)))  # inference tensors + inference mode: a third
    reasons = [e.reason for e in score.events]
    assert score.graphs == 3 and [e.graph for e in score.events] == [1, 2, 3]
    assert reasons[0].startswith("first graph: arg0=(2, 16) int64 cpu, grad_mode=no_grad")
    assert reasons[1] == "arg0 (2, 16) int64 cpu -> (1, 16) int64 cpu"
    assert reasons[2] == ("arg0 (2, 16) int64 cpu -> (2, 16) int64 cpu inference tensor; "
                          "grad_mode no_grad -> inference_mode")
    over = [r for r in caplog.records if "OVER PLAN" in r.getMessage()]
    assert len(over) == 2 and all(r.levelno == logging.WARNING for r in over)
    mark = len(C.compile_events()) - 3
    assert C.compile_counts(mark) == {"t_reasons": 3}


def test_recompile_limit_has_headroom_over_every_plan():
    import torch._dynamo

    C.configure_dynamo()
    assert torch._dynamo.config.recompile_limit >= C.RECOMPILE_LIMIT >= 2 * 6  # NS: 6 shapes in the seed
    f = C.Compiled("t_many", lambda x: x * 2, planned=12, backend="eager")
    for n in range(1, 13):  # 12 shapes: past Dynamo's default limit of 8, no crash under fullgraph
        f(torch.ones(n))
    assert f.graphs == 12


def test_a_graph_break_is_an_error_not_a_silent_split():
    def breaks(x):
        print("side effect")  # noqa: T201 - what Dynamo cannot put in a graph
        return x + 1

    f = C.Compiled("t_break", lambda x: breaks(x) * 2, backend="eager")
    with pytest.raises(Exception, match="(?i)graph break|unsupported|print"):
        f(torch.ones(3))
