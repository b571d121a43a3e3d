"""Image self-test: the imports, versions and tools a record run depends on, failing loudly.

`python docker/selftest.py` runs at the end of the image build (no GPU there): torch is the pinned
CUDA build, FA3, sentencepiece, boto3, zstandard, brotli and pgolf import, and a C file builds
against Python.h (torch.compile needs both at run time). `--cuda` runs in the cloud setup step,
before the data download: torch must also see the GPUs, FA3 must run a tiny attention on one of
them, and torch.compile must build the training step exactly as training does (pgolf.model.compiled:
inductor, fullgraph, static shapes): forward + backward of the preset's stack at the `debug` size
under bf16 autocast, and one Muon step with its compiled Newton-Schulz, with the expected number of
graphs. `--cpu` runs the same compile check on the CPU (the test suite does, on every run).
PR #1914's image swallowed FA3 import errors; this script never does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REQUIRED = ("sentencepiece", "boto3", "zstandard", "brotli", "numpy", "huggingface_hub", "pgolf")


def check(expect_torch: str | None, expect_cuda: str | None, fa3: bool, cuda: bool) -> list[str]:
    problems: list[str] = []
    import torch

    print(f"torch {torch.__version__} cuda {torch.version.cuda} python {sys.version.split()[0]}")
    if expect_torch and not torch.__version__.startswith(expect_torch):
        problems.append(f"torch {torch.__version__} is not the pinned {expect_torch}")
    if expect_cuda and torch.version.cuda != expect_cuda:
        problems.append(f"torch was built for CUDA {torch.version.cuda}, expected {expect_cuda}")
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
            print(f"{name} {getattr(module, '__version__', 'ok')}")
        except ImportError as exc:
            problems.append(f"import {name} failed: {exc}")
    problems += c_toolchain()
    if fa3:
        try:
            from flash_attn_interface import flash_attn_func  # noqa: F401

            print("flash_attn_interface ok")
        except ImportError as exc:
            problems.append(f"FA3 (flash_attn_interface) failed to import: {exc}")
    if cuda:
        if not torch.cuda.is_available():
            problems.append("torch.cuda.is_available() is False: no GPU visible to this container")
        else:
            print(f"cuda devices: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
            if fa3 and not problems:
                from flash_attn_interface import flash_attn_func

                q = torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
                out = flash_attn_func(q, q, q, causal=True)
                out = out[0] if isinstance(out, tuple) else out
                print(f"FA3 kernel ran: {tuple(out.shape)}")
    return problems


def c_toolchain() -> list[str]:
    """A C compiler (CC, gcc, cc or clang, as Triton looks for one) that builds against Python.h."""
    cc = next((c for c in (os.environ.get("CC"), "gcc", "cc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        return ["no C compiler (gcc, cc or clang) on PATH: torch.compile needs one; install gcc"]
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <Python.h>\nint main(void) { return 0; }\n")
        proc = subprocess.run([cc, f"-I{include}", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[0]
        return [f"{cc} cannot build against {include}/Python.h ({first}); install the python dev headers"]
    print(f"C toolchain ok: {cc} builds against {include}/Python.h")
    return []


def compile_check(device: str, preset: str) -> list[str]:
    """torch.compile of the training step and of Newton-Schulz, as training runs them (see the docstring)."""
    import contextlib

    import torch

    from pgolf.bench import at_shape
    from pgolf.model.compiled import Compiled
    from pgolf.model import build_model
    from pgolf.train.optim import Muon, build_optimizers

    from pgolf.config import resolve

    cfg = at_shape(preset, "debug")
    # the preset's own head dim (FA3 kernels exist for 64, not for the debug size's 32)
    cfg = cfg.with_overrides(model_dim=cfg.model.num_heads * resolve(preset, env={}).model.head_dim)
    t = cfg.train
    torch.manual_seed(0)
    model = build_model(cfg.model, device)
    loss_fn = Compiled("train_step", model.loss)
    opts = build_optimizers(model.param_groups(), t, cfg.model.tie_embeddings, torch_compile="on")
    # the trainer's batch: one piece of micro_batch_seqs * seq_len + 1 tokens, x and y views of it
    piece = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_seqs * t.train_seq_len + 1,), device=device)
    x, y = piece[:-1].view(-1, t.train_seq_len), piece[1:].view(-1, t.train_seq_len)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        opts.step()
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # a compiler or header missing surfaces here, as on the first real step
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return [f"torch.compile of the {preset} training step failed on {device} ({type(exc).__name__}: {first})"]
    ns = next(opt for opt in opts.optimizers if isinstance(opt, Muon))._orthogonalize
    problems = []
    if not torch.isfinite(loss):
        problems.append(f"the compiled training step gave a non-finite loss ({loss.item()})")
    if loss_fn.graphs != 1 or ns.graphs != ns.planned:
        problems.append(f"torch.compile made {loss_fn.graphs} train_step graph(s) (expected 1) and {ns.graphs} "
                        f"newton_schulz graph(s) (expected {ns.planned}, one per matrix shape)")
    print(f"torch.compile ok on {device}: {preset} stack at the debug size, train_step {loss_fn.graphs} graph, "
          f"newton_schulz {ns.graphs} graphs, loss {loss.item():.4f}, {time.perf_counter() - start:.1f} s")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default=None, help="expected torch version prefix, e.g. 2.9.1")
    parser.add_argument("--cuda-version", default=None, help="expected torch.version.cuda, e.g. 12.8")
    parser.add_argument("--no-fa3", action="store_true", help="do not require FlashAttention 3")
    parser.add_argument("--cuda", action="store_true", help="also require visible GPUs and compile on one (runtime)")
    parser.add_argument("--cpu", action="store_true", help="compile the training step on the CPU (no GPU, no FA3)")
    parser.add_argument("--preset", default="seed", help="whose stack the compile check builds (default seed)")
    args = parser.parse_args(argv)
    problems = check(args.torch, args.cuda_version, not args.no_fa3 and not args.cpu, args.cuda)
    if not problems and (args.cuda or args.cpu):
        problems += compile_check("cuda" if args.cuda else "cpu", args.preset)
    for problem in problems:
        print(f"selftest: FAIL: {problem}", file=sys.stderr)
    print("selftest: ok" if not problems else f"selftest: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
