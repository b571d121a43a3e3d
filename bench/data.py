"""`make bench-data`: the data pipeline's CPU figures (JSON + markdown in bench/results/data-<utc>.*).

    .venv/bin/python bench/data.py                  # 1 GB of synthetic train tokens, full-size val
    .venv/bin/python bench/data.py --quick          # seconds: 0.1 GB of train tokens, a tenth of val
    .venv/bin/python bench/data.py --train-gb 4     # a bigger synthetic export (needs 2x that on disk)

Every figure is measured in this run:
  1. CaseOps transform: encode / decode throughput (MB of original UTF-8 per second) on the offline
     corpus (data/offline/docs.jsonl, 16.7 MB), best of 3 passes;
  2. the byte sidecar: per-document original bytes (pgolf.data.caseops.doc_sidecar) on the same docs,
     timed apart from the SentencePiece encoding it needs;
  3. the leakage check (pgolf.data.leakage.check_leakage) on a synthetic export written to --work:
     50,000 val docs / 47.85 M tokens like the canonical one, and --train-gb of train tokens in
     100 M-token shards (documents of geometric length, mean 957 tokens); seconds per GB of train
     tokens with 1 thread and with every CPU, each run twice (the second on a warm page cache);
  4. bytes per token of the offline corpus: plain (the sp1024-style tokenizer, NFKC), an identity-
     normalized tokenizer without CaseOps (isolates the normalization), and CaseOps (data/offline-caseops),
     all 1,024 pieces: original UTF-8 bytes of the val documents per val target token.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from pgolf import bench as B  # noqa: E402
from pgolf.data import caseops, usable_cpus  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench-data {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def best_of(n: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load_docs(folder: Path) -> list[str]:
    with open(folder / "docs.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def transform_speed(docs: list[str]) -> dict[str, Any]:
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    encoded = [caseops.encode(d) for d in docs]
    enc_s = best_of(3, lambda: [caseops.encode(d) for d in docs])
    dec_s = best_of(3, lambda: [caseops.decode(d) for d in encoded])
    grown = sum(len(e.encode("utf-8")) for e in encoded) / 1e6
    return {"mb": round(mb, 2), "encode_mb_per_s": round(mb / enc_s, 1), "decode_mb_per_s": round(mb / dec_s, 1),
            "transformed_mb": round(grown, 2), "operators_per_kb": round((grown - mb) / 3 * 1000 / mb, 1)}


def sidecar_speed(docs: list[str], caseops_dir: Path) -> dict[str, Any]:
    from pgolf.data.bpb import load_sentencepiece

    sp = load_sentencepiece(caseops_dir / "tokenizer.model")
    table = caseops.ByteTable.from_sentencepiece(sp)
    texts = [caseops.encode(d) for d in docs]
    t0 = time.perf_counter()
    ids = sp.encode(texts, out_type=int, num_threads=usable_cpus())
    encode_s = time.perf_counter() - t0
    side_s = best_of(2, lambda: [caseops.doc_sidecar(d, i, table) for d, i in zip(docs, ids)])
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    return {"docs": len(docs), "tokens": sum(map(len, ids)), "sentencepiece_encode_s": round(encode_s, 2),
            "sidecar_s": round(side_s, 2), "sidecar_mb_per_s": round(mb / side_s, 1),
            "sidecar_docs_per_s": round(len(docs) / side_s)}


def synthetic_export(folder: Path, val_tokens: int, train_tokens: int, seed: int = 0) -> None:
    from pgolf.data.shards import write_shard

    rng = np.random.default_rng(seed)

    def stream(n: int) -> np.ndarray:
        tokens = rng.integers(2, 8192, n, dtype=np.uint16)
        starts = np.cumsum(rng.geometric(1 / 957, n // 957 * 2))
        tokens[starts[starts < n]] = 1
        tokens[0] = 1
        return tokens

    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "fineweb_val_000000.bin", stream(val_tokens))
    shard = 100_000_000
    for i in range(0, train_tokens, shard):
        write_shard(folder / f"fineweb_train_{i // shard:06d}.bin", stream(min(shard, train_tokens - i)))


def leakage_speed(work: Path, train_gb: float, val_tokens: int) -> dict[str, Any]:
    from pgolf.data.leakage import check_leakage, stream_docs
    from pgolf.data.shards import shard_paths

    train_tokens = int(train_gb * 1e9 / 2)
    folder = work / "synthetic-export"
    t0 = time.perf_counter()
    synthetic_export(folder, val_tokens, train_tokens)
    log(f"synthetic export: {val_tokens:,} val + {train_tokens:,} train tokens in {time.perf_counter() - t0:.0f} s")
    out: dict[str, Any] = {"val_tokens": val_tokens, "train_tokens": train_tokens, "train_gb": train_gb}
    try:
        out["val_hash_s"] = round(best_of(2, lambda: stream_docs(shard_paths(folder, "val"))), 3)
        for workers in sorted({1, usable_cpus()}):
            runs = []
            for _ in range(2):
                report = check_leakage(folder, workers=workers)
                runs.append(report.seconds)
            train_s = max(min(runs) - out["val_hash_s"], 1e-9)  # the one val shard is hashed by one thread first
            out[f"workers_{workers}"] = {"seconds": runs, "s_per_gb": round(train_s / train_gb, 2),
                                         "val_docs": report.checked_docs, "train_docs": report.train_docs,
                                         "overlapping_docs": report.overlapping_docs}
            log(f"leakage check, {workers} thread(s): {runs} s -> {train_s / train_gb:.2f} s/GB of train tokens")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def bytes_per_token(offline: Path, caseops_dir: Path, work: Path) -> dict[str, Any]:
    from pgolf.data.bpb import load_sentencepiece
    from pgolf.data.build import CASEOPS_TRAINER_ARGS, train_tokenizer
    from pgolf.data.loader import load_val_tokens

    manifest = json.loads((offline / "manifest.json").read_text())
    docs = load_docs(offline)
    val_docs, n_val = docs[: manifest["docs"]["val"]], manifest["docs"]["val"]
    original = sum(len(d.encode("utf-8")) for d in val_docs)
    identity_args = {**CASEOPS_TRAINER_ARGS, "user_defined_symbols": []}
    identity = train_tokenizer(docs[n_val:], work / "identity.model", 1024, trainer_args=identity_args)
    rows = {}
    for name, tokenizer, transform in (("plain (NFKC)", offline / "tokenizer.model", None),
                                       ("identity, no CaseOps", identity, None),
                                       ("CaseOps", caseops_dir / "tokenizer.model", caseops.encode)):
        sp = load_sentencepiece(tokenizer)
        texts = [transform(d) for d in val_docs] if transform else val_docs
        tokens = sum(len(ids) for ids in sp.encode(texts, out_type=int))  # targets: every token (BOS excluded)
        rows[name] = {"val_tokens": tokens, "original_bytes": original, "bytes_per_token": round(original / tokens, 4)}
    built = load_val_tokens(caseops_dir).size - n_val  # the shards agree with the direct count
    assert built == rows["CaseOps"]["val_tokens"], (built, rows["CaseOps"])
    return rows


def markdown(rep: dict[str, Any]) -> str:
    t, s, lk, bpt = rep["transform"], rep["sidecar"], rep["leakage"], rep["bytes_per_token"]
    lines = [f"# data bench {rep['utc']} ({rep['machine']})", "",
             f"- CaseOps encode {t['encode_mb_per_s']} MB/s, decode {t['decode_mb_per_s']} MB/s on {t['mb']} MB "
             f"({t['operators_per_kb']} operators per KB of text)",
             f"- sidecar {s['sidecar_mb_per_s']} MB/s ({s['sidecar_docs_per_s']:,} docs/s; SentencePiece encoding of "
             f"the same docs {s['sentencepiece_encode_s']} s vs sidecar {s['sidecar_s']} s)", ""]
    rows = [(k.split("_")[1], v["seconds"], v["s_per_gb"], v["train_docs"]) for k, v in lk.items() if k.startswith("workers_")]
    lines += [f"leakage check: {lk['val_tokens']:,} val tokens vs {lk['train_tokens']:,} train tokens ({lk['train_gb']} GB); "
              f"hashing the val split alone takes {lk['val_hash_s']} s (one thread), subtracted in s/GB", "",
              B.format_table(["threads", "seconds (cold, warm)", "s per GB of train tokens", "train docs"], rows, markdown=True), ""]
    lines += [B.format_table(["offline val, 1,024 pieces", "tokens", "original bytes", "bytes/token"],
                             [(k, v["val_tokens"], v["original_bytes"], v["bytes_per_token"]) for k, v in bpt.items()],
                             markdown=True)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="0.1 GB of train tokens, a tenth of val: a smoke run")
    p.add_argument("--train-gb", type=float, default=None, help="synthetic train tokens in GB (default 1.0)")
    p.add_argument("--work", type=Path, default=None, help="where the synthetic export goes (default: a temp dir)")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    from pgolf.data.offline import prepare_offline

    offline = prepare_offline(REPO / "data" / "offline")
    caseops_dir = prepare_offline(REPO / "data" / "offline-caseops", cache_dir=REPO / "data" / "cache", caseops=True)
    docs = load_docs(offline)
    train_gb = args.train_gb or (0.1 if args.quick else 1.0)
    val_tokens = 4_785_334 if args.quick else 47_853_343
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.work))
    try:
        rep: dict[str, Any] = {"utc": B.utc_stamp(), "machine": f"{usable_cpus()} usable CPUs, shared"}
        log("CaseOps transform")
        rep["transform"] = transform_speed(docs[:500] if args.quick else docs)
        log("byte sidecar")
        rep["sidecar"] = sidecar_speed(docs[:500] if args.quick else docs, caseops_dir)
        log("leakage check")
        rep["leakage"] = leakage_speed(work, train_gb, val_tokens)
        log("bytes per token")
        rep["bytes_per_token"] = bytes_per_token(offline, caseops_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stem = args.out_dir / f"data-{rep['utc']}"
    B.write_json(stem.with_suffix(".json"), rep)
    B.write_text(stem.with_suffix(".md"), markdown(rep))
    print(markdown(rep))
    log(f"report: {stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
