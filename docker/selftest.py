"""Image self-test: the imports and versions a record run depends on, failing loudly.

`python docker/selftest.py` runs at the end of the image build (no GPU there): torch is the pinned
CUDA build, FA3, sentencepiece, boto3, zstandard, brotli and pgolf import. `--cuda` runs in the
cloud setup step: torch must also see the GPUs and FA3 must run a tiny attention on one of them.
PR #1914's image swallowed FA3 import errors; this script never does.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default=None, help="expected torch version prefix, e.g. 2.9.1")
    parser.add_argument("--cuda-version", default=None, help="expected torch.version.cuda, e.g. 12.8")
    parser.add_argument("--no-fa3", action="store_true", help="do not require FlashAttention 3")
    parser.add_argument("--cuda", action="store_true", help="also require visible GPUs (runtime)")
    args = parser.parse_args(argv)
    problems = check(args.torch, args.cuda_version, not args.no_fa3, args.cuda)
    for problem in problems:
        print(f"selftest: FAIL: {problem}", file=sys.stderr)
    print("selftest: ok" if not problems else f"selftest: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
