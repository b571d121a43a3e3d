"""What an artifact says about itself, inside its counted bytes (artifact format 2, body "meta"):

    {"model": {every ModelConfig field but how to run it: vocab_size, num_layers, model_dim, ...},
     "eval": {every EvalConfig field, eval_seq_len resolved: how the run scored it},
     "tokenizer": {"file": "fineweb_1024_bpe.model", "sha256": "..."}}

So an artifact copied anywhere rebuilds its own model (`pgolf evaluate X.pgz --data D --tokenizer T`
needs no preset), and a wrong tokenizer, data variant or model config fails in one line before any
weight is loaded, instead of a torch size-mismatch dump or a silently wrong score. This module is
embedded in train_gpt.py (its bytes count); building a config from a meta is the CLI's job
(`pgolf.cli.evaluate.config_of_artifact`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from pgolf.config import Config
from pgolf.errors import ArtifactError, DataError

# How to run the model on this machine, not what the model is: never stored, never checked.
EXECUTION_FIELDS = ("attention_backend", "torch_compile")


def tokenizer_fingerprint(tokenizer_path: str | Path) -> dict[str, str]:
    from pgolf.fileio import sha256_file

    path = Path(tokenizer_path)
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found: artifacts record their tokenizer's sha256; "
                        "pass the run's tokenizer with --tokenizer / TOKENIZER_PATH")
    return {"file": path.name, "sha256": sha256_file(path)}


def describe(cfg: Config) -> dict[str, Any]:
    """The meta block for an artifact of `cfg`'s model."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in EXECUTION_FIELDS}
    return {"model": model, "eval": {**dataclasses.asdict(cfg.eval), "eval_seq_len": cfg.eval_seq_len},
            "tokenizer": tokenizer_fingerprint(cfg.data.tokenizer_path)}


def model_mismatches(meta: Mapping[str, Any], cfg: Config) -> list[str]:
    """`NAME=artifact vs config` for every stored model field the config disagrees with."""
    stored = meta.get("model") or {}
    return [f"{name.upper()}={value} (config: {getattr(cfg.model, name)})" for name, value in sorted(stored.items())
            if hasattr(cfg.model, name) and getattr(cfg.model, name) != value]


def check(meta: Mapping[str, Any], cfg: Config, where: str) -> None:
    """The artifact fits this config, tokenizer and data folder, or one line saying which does not."""
    if not meta:
        return  # nothing stored to check against (a caller-supplied artifact without meta)
    wrong = model_mismatches(meta, cfg)
    if wrong:
        raise ArtifactError(f"{where} holds another model than the config: {', '.join(wrong[:4])}"
                            f"{' ...' if len(wrong) > 4 else ''}; drop those model knobs (the artifact sets its "
                            "own model) or evaluate it with its run's config.json")
    tok = meta.get("tokenizer") or {}
    if tok.get("sha256"):
        have = tokenizer_fingerprint(cfg.data.tokenizer_path)
        if have["sha256"] != tok["sha256"]:
            raise DataError(f"tokenizer {cfg.data.tokenizer_path} (sha256 {have['sha256'][:12]}) is not the one "
                            f"{where} was trained with ({tok.get('file')}, sha256 {tok['sha256'][:12]}); "
                            "pass that one with --tokenizer / TOKENIZER_PATH")
        data_tok = data_tokenizer_sha256(cfg.data.data_path)
        if data_tok and data_tok != tok["sha256"]:
            raise DataError(f"{cfg.data.data_path} was tokenized with another tokenizer (sha256 {data_tok[:12]}) "
                            f"than {where} ({tok.get('file')}, sha256 {tok['sha256'][:12]}): it is another data "
                            "variant; pass the matching shards with --data / DATA_PATH")


def data_tokenizer_sha256(data_path: str | Path) -> str | None:
    """The sha256 of the tokenizer a data folder's shards were encoded with, when its manifest says."""
    from pgolf.data.manifest import read_manifest

    manifest = read_manifest(data_path) or {}
    tok = manifest.get("tokenizer") or {}
    if isinstance(tok, dict) and tok.get("sha256"):
        return str(tok["sha256"])
    listed = [e.get("sha256") for e in manifest.get("files", []) if str(e.get("file", "")).endswith(".model")]
    return listed[0] if len(listed) == 1 and listed[0] else None
