"""Measurements of what the step and the artifact cost beyond the model's own FLOPs, for `make bench`.

    fake_quant_cost(cfg)       compiled train step with QAT off vs on: generated kernels and ms (a graph
                               that always traces the fake-quant, as before pgolf.model.compiled, is the QAT one)
    newton_schulz_cost(cfg)    Muon's Newton-Schulz over every matrix, eager vs compiled (one graph per shape)
    overlap_cost(cfg)          2 gloo ranks: one flat all-reduce after backward (the previous trainer) vs
                               DDP buckets reduced during backward (the trainer now), ms per step
    copy_counts(cfg)           host-to-device copies the scoring loop requests, per batch and per evaluation
    full_size_entries(...)     a full-size (seed) int6 artifact body whose values follow a trained model's
                               own distribution, per tensor role
    compression_cost(entries)  the previous compressor selection (threads) vs the new one (processes + probe)
    step_overheads / compression_at_full_size   the two `make bench` pieces built from the above

Every function returns plain dicts of numbers measured in this process (or its gloo children).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pgolf.bench import interleaved, median
from pgolf.config import Config

# ---------------------------------------------------------------------------------------------
# compiled graphs: kernels and time


def _no_compile_caches():
    """A context in which inductor really generates code (cache hits would count 0 kernels)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    patches = [inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False)]
    if hasattr(functorch_config, "enable_autograd_cache"):
        patches.append(functorch_config.patch(enable_autograd_cache=False))
    from contextlib import ExitStack

    stack = ExitStack()
    for p in patches:
        stack.enter_context(p)
    return stack


def generated_kernels(fn: Callable[[], Any]) -> int:
    """Kernels inductor generates while `fn` runs (its compiling call), caches off."""
    from torch._inductor import metrics

    with _no_compile_caches():
        before = metrics.generated_kernel_count
        fn()
        return metrics.generated_kernel_count - before


def fake_quant_cost(cfg: Config, rounds: int = 5) -> dict[str, Any]:
    """The compiled train step (fwd + bwd) with QAT off and on: kernels generated and median ms.

    Before pgolf.model.compiled the fake-quant was always in the graph (a 0/1 flag multiplied it away), so
    every seed step paid what the QAT-on column shows; now only late-QAT steps do."""
    import torch

    from pgolf.model.compiled import Compiled
    from pgolf.model import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, "cpu")
    step = Compiled("bench_train_step", model.loss, planned=2, state=lambda: {"qat": model.qat_enabled})
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    piece = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_seqs * t.train_seq_len + 1,), generator=g)
    x, y = piece[:-1].view(-1, t.train_seq_len), piece[1:].view(-1, t.train_seq_len)

    def run(qat: bool) -> float:
        model.set_qat(qat)
        t0 = time.perf_counter()
        step(x, y).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    kernels = {"qat_off": generated_kernels(lambda: run(False)), "qat_on": generated_kernels(lambda: run(True))}
    times = interleaved({"qat_off": lambda: run(False), "qat_on": lambda: run(True)}, rounds=rounds)
    model.set_qat(False)
    return {"graphs": step.graphs, "kernels": kernels, "step_ms": {k: 1e3 * median(v) for k, v in times.items()},
            "rounds": rounds}


def newton_schulz_cost(cfg: Config, rounds: int = 5) -> dict[str, Any]:
    """Newton-Schulz over every Muon matrix of `cfg`'s model: eager vs compiled (ms, graphs)."""
    import torch

    from pgolf.model.compiled import Compiled
    from pgolf.model import build_model
    from pgolf.train.optim import newton_schulz, ns_coefficients

    model = build_model(cfg.model, "cpu")
    mats = [p.detach().clone() + 0.01 * torch.randn_like(p) for _, p in model.param_groups()["matrix"]]
    coeffs = ns_coefficients(cfg.train.muon_ns_coeffs, cfg.train.muon_backend_steps)
    compiled = Compiled("bench_newton_schulz", newton_schulz, planned=len({tuple(m.shape) for m in mats}))

    def over_all(fn) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            for m in mats:
                fn(m, coeffs, torch.float32)
            return time.perf_counter() - t0
        return run

    compile_s = over_all(compiled)()
    times = interleaved({"eager": over_all(newton_schulz), "compiled": over_all(compiled)}, rounds=rounds)
    return {"matrices": len(mats), "shapes": compiled.planned, "graphs": compiled.graphs,
            "compile_s": compile_s, "ms": {k: 1e3 * median(v) for k, v in times.items()}, "rounds": rounds}


# ---------------------------------------------------------------------------------------------
# gradient averaging: flat after backward vs DDP buckets during backward (2 gloo ranks)


def _flat_allreduce_grads(model: Any, world_size: int) -> None:
    """The previous trainer's averaging: one flat all-reduce per dtype after the whole backward."""
    import torch
    import torch.distributed as dist

    by_dtype: dict[Any, list] = {}
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def _overlap_rank(rank: int, world_size: int, cfg_json: str, rdv: str, out: str, rounds: int,
                  bucket_mb: float) -> None:
    import torch
    import torch.distributed as dist

    from pgolf import config as cfgmod
    from pgolf.model import build_model
    from pgolf.train.loop import data_parallel

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world_size)
    cfg = cfgmod.from_dict(json.loads(cfg_json))
    t = cfg.train
    torch.manual_seed(0)
    flat_model, ddp_model = build_model(cfg.model, "cpu"), build_model(cfg.model, "cpu")
    ddp_model.load_state_dict(flat_model.state_dict())
    ddp = data_parallel(ddp_model, ddp_model.loss, torch.device("cpu"), bucket_cap_mb=bucket_mb)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_seqs, t.train_seq_len), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_seqs, t.train_seq_len), generator=g)

    # the two schemes average to the same gradients (before timing: one step each on the same batch)
    flat_model.loss(x, y).backward()
    _flat_allreduce_grads(flat_model, world_size)
    ddp(x, y).backward()
    same = all(torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
               for a, b in zip(flat_model.parameters(), ddp_model.parameters()))
    flat_model.zero_grad(set_to_none=True)
    ddp_model.zero_grad(set_to_none=True)

    def flat() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        flat_model.loss(x, y).backward()
        _flat_allreduce_grads(flat_model, world_size)
        ms = time.perf_counter() - t0
        flat_model.zero_grad(set_to_none=True)
        return ms

    def bucketed() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        ddp(x, y).backward()
        ms = time.perf_counter() - t0
        ddp_model.zero_grad(set_to_none=True)
        return ms

    times = interleaved({"flat_after_backward": flat, "ddp_buckets": bucketed}, rounds=rounds, warmup=2)
    if rank == 0:
        info = ddp._get_ddp_logging_data()  # DDP re-buckets after its first step, in gradient-ready order
        sizes = str(info.get("rebuilt_bucket_sizes") or info.get("bucket_sizes") or "")
        buckets = sizes.count(",") + 1 if sizes else None
        grad_mb = sum(p.numel() * p.element_size() for p in flat_model.parameters()) / 2**20
        Path(out).write_text(json.dumps({
            "world_size": world_size, "rounds": rounds, "grad_mb": grad_mb, "bucket_cap_mb": bucket_mb,
            "buckets": buckets, "same_gradients": same,
            "step_ms": {k: 1e3 * median(v) for k, v in times.items()},
            "step_ms_all": {k: [round(1e3 * s, 2) for s in v] for k, v in times.items()},
            "collectives_after_backward": {"flat_after_backward": 1, "ddp_buckets": 0}}))
    dist.destroy_process_group()


def overlap_cost(cfg: Config, rounds: int = 8, world_size: int = 2) -> dict[str, Any]:
    """fwd + bwd + gradient averaging on `world_size` gloo CPU ranks, eager, the two schemes interleaved.

    The bucket size is a fifth of the gradient bytes, the seed's proportion (108 MB in 25 MB buckets)."""
    import torch.multiprocessing as mp

    from pgolf.model import build_model

    grad_mb = sum(p.numel() * 4 for p in build_model(cfg.model, "cpu").parameters()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overlap.json"
        mp.start_processes(_overlap_rank, args=(world_size, cfg.to_json(), str(Path(tmp) / "rdv"), str(out), rounds,
                                                max(grad_mb / 5, 0.05)),
                           nprocs=world_size, start_method="spawn")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# host-to-device copies


def count_device_copies(fn: Callable[[], Any]) -> int:
    """`.to(<device>)` / `.cuda()` calls on host tensors and `torch.tensor(..., device=)` made by `fn`:
    on a GPU each is a host-to-device copy (on the CPU they are counted all the same)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Counter(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" \
                    and (name == "cuda" or any(isinstance(a, (torch.device, str)) for a in args[1:])
                         or "device" in kwargs):
                Counter.n += 1
            elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
                Counter.n += 1
            return func(*args, **kwargs)

    with Counter():
        fn()
    return Counter.n


def copy_counts(cfg: Config, batches: int = 4) -> dict[str, Any]:
    """Copies the sliding-window scoring loop requests for `batches` batches, and for one."""
    import torch

    from pgolf.evaluate.score import score_windows, window_table
    from pgolf.evaluate.windows import plan_windows
    from pgolf.model import build_model

    e, seq = cfg.eval, cfg.eval_seq_len
    model = build_model(cfg.model, "cpu").eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (seq + batches * e.eval_batch_seqs * e.eval_stride,))
    windows = plan_windows(len(tokens), seq, e.eval_stride)

    def scoring(n: int) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                table = window_table(windows, tokens.device)
                score_windows(model, tokens, windows[: n * e.eval_batch_seqs], seq, e.eval_batch_seqs, 1.0, True,
                              table[: n * e.eval_batch_seqs])
        return run

    one, many = count_device_copies(scoring(1)), count_device_copies(scoring(batches))
    per_batch = (many - one) / (batches - 1)
    return {"per_scoring_batch": per_batch, "per_evaluation": one - per_batch}


# ---------------------------------------------------------------------------------------------
# compression at full size


def _role(name: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "blocks.N.", name)


def full_size_entries(source: list, target: Config, seed: int = 0) -> list:
    """Artifact entries for every tensor of GPT(target.model) (e.g. the seed: 27M parameters), built the way
    the quantizer routes them (int6 matrices, int8 embeddings, fp16 small tensors), each filled with values
    drawn i.i.d. from the distribution of the trained `source` entries of the same role (q values and row
    scales; blocks pooled over depth). Drawn, not tiled: repeated trained bytes would let the LZ stages of
    the compressors match copies and flatter every size and speed."""
    import numpy as np
    import torch
    from torch import nn

    from pgolf.model import GPT
    from pgolf.quantize.artifact import Entry

    rng = np.random.default_rng(seed)
    pools: dict[tuple[str, str], np.ndarray] = {}
    for e in source:
        for role, part in e.parts.items():
            key = (_role(e.name), role)
            vals = part.detach().float().flatten().numpy() if part.is_floating_point() else part.flatten().numpy()
            pools[key] = np.concatenate([pools[key], vals]) if key in pools else vals
    kinds = {_role(e.name): (e.kind, e.bits) for e in source}
    with torch.device("meta"):
        model = GPT(target.model)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = []
    for name, t in model.state_dict().items():
        role, shape = _role(name), tuple(t.shape)
        kind, bits = kinds.get(role, ("fp16", 0))
        if t.numel() <= target.quant.passthrough_max_numel or t.ndim < 2:
            kind = "fp16"
        elif kind != "quant":  # a role the small model passed through is quantized at full size
            kind, bits = "quant", target.quant.matrix_bits if name in linears else target.quant.embed_bits
        if kind == "quant":
            q_pool = pools.get((role, "q"), np.arange(-31, 32))
            s_pool = pools.get((role, "scale"), np.full(1, 1e-3))
            q = torch.from_numpy(rng.choice(q_pool, size=shape).astype(np.int8))
            scale = torch.from_numpy(rng.choice(s_pool, size=shape[0]).astype(np.float16))
            out.append(Entry(name, "quant", shape, "float32", {"q": q, "scale": scale}, bits=bits))
        else:
            pool = pools.get((role, "data"), np.zeros(1))
            data = torch.from_numpy(rng.choice(pool, size=shape).astype(np.float16))
            out.append(Entry(name, "fp16", shape, "float32", {"data": data}))
    return out


def choose_with_threads(entries: list) -> tuple[bytes, dict]:
    """The compressor selection as it was before processes: every candidate on a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    from pgolf.quantize import artifact as A

    layouts = list(A.LAYOUTS)
    bodies = {lay: A.encode_body(entries, lay) for lay in layouts}
    jobs = [(lay, n) for lay in layouts for n in A.COMPRESSORS]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda j: A.compress(j[1], bodies[j[0]]), jobs))
    best = min(range(len(jobs)), key=lambda i: (len(results[i]), i))
    sizes = {f"{lay}+{n}": len(c) + A.HEADER_BYTES for (lay, n), c in zip(jobs, results)}
    return A.frame(bodies[jobs[best][0]], jobs[best][1], results[best]), {"candidates": sizes}


def compression_cost(entries: list) -> dict[str, Any]:
    """Seconds and bytes of the previous (threads) and the new (processes + probe) selection, same entries."""
    from pgolf.quantize import artifact as A

    params = sum(e.parts["q"].numel() if e.kind == "quant" else e.parts["data"].numel() for e in entries)
    t0 = time.perf_counter()
    old_blob, old_info = choose_with_threads(entries)
    old_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    new_blob, new_info = A.choose(entries)
    new_s = time.perf_counter() - t0
    return {"params": params, "body_bytes": new_info["body_bytes"], "cores": os.cpu_count(),
            "previous": {"seconds": old_s, "bytes": len(old_blob), "candidates": old_info["candidates"]},
            "now": {"seconds": new_s, "bytes": len(new_blob), "choice": f"{new_info['layout']}+{new_info['compressor']}",
                    "candidates": new_info["candidates"], "skipped": new_info["skipped"],
                    "workers": new_info["workers"]}}


# ---------------------------------------------------------------------------------------------
# the two `make bench` pieces


def step_overheads(cfg: Config, rounds: int) -> dict[str, Any]:
    from pgolf.bench import describe_shape

    return {"shape": describe_shape(cfg), "fake_quant": fake_quant_cost(cfg, rounds),
            "newton_schulz": newton_schulz_cost(cfg, rounds), "overlap": overlap_cost(cfg, max(rounds, 4)),
            "copies": copy_counts(cfg)}


def trained_artifact(cfg: Config, run_dir: Path) -> Path:
    """run_dir/artifact.pgz: the bench's own seed-plus run when it exists, else trained, calibrated and
    quantized here at `cfg`."""
    if not (run_dir / "artifact.pgz").is_file():
        from pgolf.quantize import calibrate, quantize
        from pgolf.train import train

        train(cfg, run_dir)
        if cfg.quant.quant_method == "gptq":
            calibrate(cfg, run_dir)
        quantize(cfg, run_dir)
    return run_dir / "artifact.pgz"


def compression_at_full_size(cfg: Config, run_dir: Path, quick: bool) -> dict[str, Any]:
    """compression_cost of a seed-plus-size body (tiny size with `quick`) drawn from run_dir's trained artifact."""
    from pgolf.bench import at_shape, describe_shape
    from pgolf.config import resolve
    from pgolf.quantize.artifact import read_artifact

    source = trained_artifact(cfg, run_dir)
    target = at_shape("seed-plus", "tiny") if quick else resolve("seed-plus", env={})
    out = compression_cost(full_size_entries(read_artifact(source).entries, target))
    out.update(source=str(source), target=describe_shape(target))
    return out
