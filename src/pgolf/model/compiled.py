"""Compiled entry points: one torch.compile wrapper per purpose, each with its own graphs, counted.

Dynamo keeps compiled graphs on the code object of the frame it compiles, with one recompile limit
per code object (8 by default), and `fullgraph=True` turns a variant past the limit into a crash.
Compiling `model` itself therefore puts every use of `GPT.forward` (training, validation, its short
last batch, scoring, TTT) into ONE cache. Instead, each purpose gets a `Compiled` wrapper around a
fresh copy of a two-line trampoline: its own code object, hence its own cache and its own count.

    train_step   the trainer's loss forward (+ backward): one graph per TRAIN_SEQ_SCHEDULE context length,
                 each +1 when late QAT is configured and +1 when depth recurrence switches on mid-run
    val_nll      validation NLL during training (batches padded to one shape); the same +1s
    score        evaluation forward under the evaluator's grad mode (rows, sliding or TTT scoring)
    ttt_step     TTT's training forward (+ backward)
    lora_ttt     phased LoRA TTT's forward under the per-document LoRA (+ backward): one graph per padded
                 window width (64, 128, ... up to EVAL_SEQ_LEN; 7 at 2560), all warmed on random tokens
    phase_step   the global SGD phase's forward (+ backward), EVAL_SEQ_LEN rows
    newton_schulz  Muon's orthogonalization, one graph per matrix shape

Each wrapper is told how many graphs it should need (`planned`). Every compile is logged with its
reason: what changed in the call from the graphs already held (shapes, dtypes, grad mode, autocast,
inference tensors, QAT, ...). A graph beyond the plan is a warning, not a crash: the Dynamo limit
is set to RECOMPILE_LIMIT, with headroom over every plan. Compiles are counted per stage in
`compile_counts()`, which the run records in summary.json.
"""

from __future__ import annotations

import logging
import time
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("pgolf.compile")

# graphs one wrapper may hold before Dynamo gives up (with fullgraph: raises); the largest plan is
# Newton-Schulz with one graph per matrix shape (6 for the seed), so 16 leaves room for surprises
RECOMPILE_LIMIT = 16


@dataclass(frozen=True)
class CompileEvent:
    purpose: str
    graph: int  # 1 for the first graph of this wrapper
    planned: int
    seconds: float  # the compiling call's wall time (tracing + codegen + the first run)
    reason: str


_events: list[CompileEvent] = []


def compile_enabled(setting: str, device: torch.device | str) -> bool:
    """TORCH_COMPILE: 'on' compiles everywhere, 'auto' only on CUDA, 'off' never."""
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def _fresh_entry(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A trampoline calling `fn` whose code object is new, so Dynamo caches its graphs apart."""

    def entry(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    names = {"co_name": name, **({"co_qualname": name} if hasattr(entry.__code__, "co_qualname") else {})}
    code = entry.__code__.replace(**names)  # python < 3.11 has no co_qualname
    return types.FunctionType(code, entry.__globals__, name, entry.__defaults__, entry.__closure__)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        flags = [str(tuple(value.shape)), str(value.dtype).removeprefix("torch."), value.device.type]
        if value.requires_grad:
            flags.append("requires_grad")
        if value.is_inference():
            flags.append("inference tensor")
        return " ".join(flags)
    if isinstance(value, (list, tuple)):
        if len(value) <= 3 and not any(isinstance(v, (list, tuple)) for v in value):
            return "(" + ", ".join(_describe(v) for v in value) + ")"
        return f"{type(value).__name__} of {len(value)}"
    return repr(value) if isinstance(value, (bool, int, float, str, type(None), torch.dtype)) else type(value).__name__


def call_signature(args: tuple, kwargs: dict[str, Any], state: dict[str, Any] | None = None) -> dict[str, str]:
    """What Dynamo's guards look at, in words: every argument, grad mode, autocast, and `state`."""
    sig = {f"arg{i}": _describe(a) for i, a in enumerate(args)}
    sig.update({k: _describe(v) for k, v in kwargs.items()})
    if torch.is_inference_mode_enabled():
        sig["grad_mode"] = "inference_mode"
    else:
        sig["grad_mode"] = "grad" if torch.is_grad_enabled() else "no_grad"
    on = [d for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
    sig["autocast"] = ", ".join(f"{d}:{str(torch.get_autocast_dtype(d)).removeprefix('torch.')}" for d in on) or "off"
    for key, value in (state or {}).items():
        sig[key] = str(value)
    return sig


def explain(new: dict[str, str], held: list[dict[str, str]]) -> str:
    """The recompile reason: the differences from the held signature closest to `new`."""
    if not held:
        return "first graph: " + ", ".join(f"{k}={v}" for k, v in new.items())
    closest = min(held, key=lambda old: sum(old.get(k) != v for k, v in new.items()))
    diffs = [f"{k} {closest.get(k)} -> {v}" for k, v in new.items() if closest.get(k) != v]
    return "; ".join(diffs) if diffs else "same arguments and modes as a held graph (run with TORCH_LOGS=recompiles)"


class Compiled:
    """`torch.compile(fn, fullgraph=True, dynamic=False)` with its own cache, a plan and a compile log.

    `state()` names extra things the compiled code branches on (e.g. {"qat": True}), for the reasons.
    `backend` is inductor everywhere but in fast tests of the counting itself.
    """

    def __init__(self, purpose: str, fn: Callable[..., Any], *, planned: int = 1,
                 state: Callable[[], dict[str, Any]] | None = None, backend: str = "inductor"):
        configure_dynamo()
        self.purpose, self.planned, self.state = purpose, planned, state
        self.entry = _fresh_entry(fn, f"pgolf_{purpose}")
        self.compiled = torch.compile(self.entry, fullgraph=True, dynamic=False, backend=backend)
        self.signatures: list[dict[str, str]] = []
        self.events: list[CompileEvent] = []

    @property
    def graphs(self) -> int:
        """Graphs this wrapper holds (Dynamo's cache entries on its code object)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self.entry.__code__))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = len(self.signatures)
        t0 = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        if self.graphs > before:  # this call compiled a graph
            self._record(call_signature(args, kwargs, self.state() if self.state else None),
                         time.perf_counter() - t0)
        return out

    def _record(self, sig: dict[str, str], seconds: float) -> None:
        event = CompileEvent(self.purpose, len(self.signatures) + 1, self.planned, round(seconds, 3),
                             explain(sig, self.signatures))
        self.signatures.append(sig)
        self.events.append(event)
        _events.append(event)
        over = event.graph > event.planned
        (log.warning if over else log.info)(
            "compile %s graph %d/%d%s in %.1f s: %s", event.purpose, event.graph, event.planned,
            " (OVER PLAN)" if over else "", event.seconds, event.reason)


def maybe_compiled(purpose: str, fn: Callable[..., Any], setting: str, device: torch.device | str, *,
                   planned: int = 1, state: Callable[[], dict[str, Any]] | None = None) -> Callable[..., Any]:
    """`Compiled(purpose, fn, ...)` when TORCH_COMPILE allows it on `device`, else `fn` itself."""
    if not compile_enabled(setting, device):
        return fn
    return Compiled(purpose, fn, planned=planned, state=state)


def is_compiled(fn: Any) -> bool:
    return isinstance(fn, Compiled)


def configure_dynamo() -> None:
    """The explicit recompile limit (per code object, i.e. per wrapper)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))


def compile_events() -> list[CompileEvent]:
    """Every compile of this process so far, in order."""
    return list(_events)


def compile_counts(since: int = 0) -> dict[str, int]:
    """Graphs compiled per purpose, from event number `since` on (`len(compile_events())` marks a stage)."""
    counts: dict[str, int] = {}
    for event in _events[since:]:
        counts[event.purpose] = counts.get(event.purpose, 0) + 1
    return counts
