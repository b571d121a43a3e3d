"""README.md of a records folder: generated from submission.json, the config and the run folders."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from pgolf import config as cfgmod
from pgolf.submission.bundle import Bundle
from pgolf.submission.runs import PER_RUN_FIELDS, RunRecord


def _fmt(value: Any, digits: int = 5) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"


def stack_lines(cfg: cfgmod.Config) -> list[str]:
    m, t, q, e = cfg.model, cfg.train, cfg.quant, cfg.eval
    doc = " ".join((cfgmod.PRESETS[cfg.preset].__doc__ or "").split())  # docstrings may wrap
    lines = [f"Preset `{cfg.preset}`: {doc}", ""]
    lines += [
        f"- Model: {m.num_layers} layers × {m.model_dim} wide, {m.num_heads} heads ({m.num_kv_heads} KV), "
        f"MLP {m.mlp_mult}× {m.mlp_activation}, vocab {m.vocab_size}, tied embeddings: {_fmt(m.tie_embeddings)}, "
        f"BigramHash {m.bigram_buckets}×{m.bigram_dim}, SmearGate {_fmt(m.smear_gate)}, BOS mask {_fmt(m.bos_mask)}, "
        f"{m.weight_init} init, "
        f"XSA last {m.xsa_last_n}, RoPE dims {m.rope_dims or 'all'}",
        f"- Training: seq {t.train_seq_len}, {t.train_batch_tokens:,} tokens/step, at most {t.iterations:,} steps "
        f"under a {t.max_wallclock_seconds:g} s cap (GPTQ reserve {t.gptq_reserve_seconds:g} s), Muon lr "
        f"{t.matrix_lr:g}, EMA {t.ema_decay:g}",
        f"- Quantizer: {q.quant_method}, int{q.matrix_bits} matrices / int{q.embed_bits} embeddings, "
        f"compressor {q.compressor}",
        f"- Evaluation: {e.eval_mode} (stride {e.eval_stride}, eval seq {cfg.eval_seq_len}"
        + (f", TTT lr {e.ttt_lr:g} × {e.ttt_epochs} epochs on {e.ttt_chunk_tokens:,}-token chunks"
           if e.eval_mode == "ttt" else "") + ")",
    ]
    return lines


def config_changes(cfg: cfgmod.Config, defaults: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(NAME, preset value, submitted value) for every field the submission changes from its preset."""
    preset = cfgmod.PRESETS[cfg.preset]().flat()
    submitted = cfgmod.from_dict(defaults).flat()
    return [(k.upper(), preset[k], v) for k, v in submitted.items()
            if v != preset[k] and k not in PER_RUN_FIELDS]


def render_readme(sub: Mapping[str, Any], cfg: cfgmod.Config, defaults: Mapping[str, Any],
                  runs: Sequence[RunRecord], bundle: Bundle) -> str:
    seeds = sub["seeds"]
    n = len(seeds)
    out: list[str] = [f"# {sub['name']}", ""]
    out += [f"**val_bpb {sub['val_bpb']:.5f}** (mean of {n} seed{'s' if n != 1 else ''}, std "
            f"{sub['val_bpb_std']:.5f}); val_loss {sub['val_loss']:.5f} nats/token (std {sub['val_loss_std']:.5f}); "
            f"largest artifact {sub['bytes_total']:,} B of {sub['size_cap_bytes']:,}.", ""]
    if sub.get("blurb"):
        out += [sub["blurb"], ""]
    out += [f"By {sub['author']} (@{sub['github_id']}), {sub['date']}. Hardware: {_fmt(sub['hardware'])}.", ""]

    out += ["## The stack", ""] + stack_lines(cfg) + [""]
    changes = config_changes(cfg, defaults)
    if changes:
        out += [f"Fields changed from the `{cfg.preset}` preset (all embedded as defaults in train_gpt.py):", ""]
        out += _table(["field", "preset", "submitted"], [(f"`{k}`", repr(a), repr(b)) for k, a, b in changes])
        out += [""]

    seed_list = " ".join(str(r["seed"]) for r in seeds)
    out += ["## Run it", "",
            "From inside this folder, with the dataset and tokenizer where `DATA_PATH` and `TOKENIZER_PATH` "
            "point (defaults below; override by env var like any other field):", "",
            "```bash",
            "pip install -r requirements.txt",
            f"for SEED in {seed_list}; do",
            "  SEED=$SEED torchrun --standalone --nproc_per_node=8 train_gpt.py",
            "done",
            "```", "",
            "FlashAttention 3 (Hopper) is not on PyPI: install the `flash_attn_3` wheel built for the "
            "PyTorch/CUDA listed under Environment with `pip install --no-deps` (the runs used "
            f"{_fmt(sub['flash_attn_version'])}).",
            "",
            f"`DATA_PATH={cfg.data.data_path}`, `TOKENIZER_PATH={cfg.data.tokenizer_path}`. Every config "
            "field is an environment variable (its upper-case name); the embedded defaults are exactly the "
            "submitted runs' config, so no other variable is needed. Each run writes `runs/<run_id>/` "
            "(train.log, summary.json, compliance.json, artifact.pgz).", ""]

    out += ["## Results", ""]
    rows = []
    for r in seeds:
        rows.append((r["seed"], _fmt(r["val_bpb"]), _fmt(r["val_loss"]), _fmt(r["steps"]),
                     _fmt(r["step_avg_ms"], 2), _fmt(r["train_time_s"], 1), _fmt(r["eval_time_s"], 1),
                     _fmt(r["prequant_val_bpb"]), _fmt(r["postquant_val_bpb"]), _fmt(r["model_bytes"]),
                     _fmt(r["artifact_bytes"])))
    rows.append(("**mean**", f"**{sub['val_bpb']:.5f}**", f"**{sub['val_loss']:.5f}**", "", "", "", "", "", "",
                 "", ""))
    rows.append(("std", _fmt(sub["val_bpb_std"]), _fmt(sub["val_loss_std"]), "", "", "", "", "", "", "", ""))
    out += _table(["seed", "val_bpb", "val_loss (nats)", "steps", "step_avg ms", "train s", "eval s",
                   "pre-quant bpb", "post-quant bpb", "model B", "artifact B"], rows)
    out += ["", "Train seconds include GPTQ calibration; eval seconds run from before the artifact is read "
            "to the last scored token (load, build, warm-up, scoring, TTT).", ""]

    out += ["## Artifact bytes", "",
            f"- Code: `train_gpt.py` as shipped ({sub['bytes_code_form']} form) = **{sub['bytes_code']:,} B**. "
            f"Raw single file: {sub['bytes_code_raw']:,} B"
            + (f"; compressed stub (python-minifier, lzma, base85): {sub['bytes_code_compressed']:,} B."
               if sub.get("bytes_code_compressed") else "."),
            f"- Model: artifact.pgz, {_span([r['model_bytes'] for r in seeds])} B.",
            f"- Total per seed = model + shipped code; the largest is {sub['bytes_total']:,} B, "
            f"{sub['size_cap_bytes'] - sub['bytes_total']:,} B under the cap.",
            *([f"- Every `train_seed<S>.log` was written by this `train_gpt.py`: each run's environment.json "
               f"records the sha256 of the file it executed, `{sub['code_sha256']}`, the shipped file's, and "
               "its code-bytes line counts exactly these bytes."] if not sub.get("code_drift") else []), ""]

    out += ["## Compliance", ""]
    names = sorted({name for run in runs for name in run.compliance})
    if names:
        crow = []
        for name in names:
            how = next((run.compliance[name].get("how", "") for run in runs if name in run.compliance), "")
            if name == "artifact_bytes":
                how = "artifact.pgz size + the shipped train_gpt.py (recomputed by the build)"
            cells = []
            for run in runs:
                rule = run.compliance.get(name)
                if name == "artifact_bytes":
                    row = next(r for r in seeds if r["run_id"] == run.run_id)
                    cells.append(f"ok {row['artifact_bytes']:,}")  # recomputed with the shipped code
                elif rule is None:
                    cells.append("—")
                else:
                    cells.append(f"{'ok' if rule.get('ok') else 'FAIL'} {_fmt(rule.get('value'), 1)}")
            crow.append((f"`{name}`", *cells, how))
        out += _table(["rule", *[f"seed {run.seed}" for run in runs], "how it is measured"], crow)
    else:
        out += ["The runs carry no compliance.json."]
    if sub.get("compliance_failures"):
        out += ["", "**Failed rules (non-record):** " + "; ".join(sub["compliance_failures"])]
    out += ["", "Each rule is measured by the run itself and recorded in its compliance.json (values: "
            "seconds, bytes or counts against the limit); the byte rule is recomputed here with the code "
            "as shipped.", ""]

    env = runs[0].environment
    env_rows = [("hardware", sub["hardware"]), ("PyTorch", sub["pytorch_version"]), ("CUDA", sub["cuda_version"]),
                ("FlashAttention 3", sub["flash_attn_version"]), ("Python", sub["python_version"]),
                ("triton", env.get("triton")), ("NCCL", env.get("nccl")), ("driver", env.get("driver")),
                ("attention backend", env.get("attention_backend")), ("image", env.get("image")),
                ("image digest", env.get("image_digest")), ("dataset", env.get("dataset_id")),
                ("train / val shards", f"{env.get('train_shards')} / {env.get('val_shards')}"
                 if env.get("train_shards") is not None else None),
                ("runs' pgolf commit", sub["runs_git_commit"]), ("train_gpt.py generated from", sub["pgolf_commit"]),
                ("embedded source sha256", sub["pgolf_source_sha256"]),
                ("train_gpt.py sha256", sub["code_sha256"]),
                ("runs executed", "this very file (sha256 above)" if not sub.get("code_drift")
                 else "; ".join(sub["code_drift"]))]
    out += ["## Environment", ""] + _table(["", ""], [(k, _fmt(v)) for k, v in env_rows]) + [""]
    if sub.get("code_drift"):
        out += ["**These logs were not produced by the shipped train_gpt.py** (built with --allow-code-drift): "
                + "; ".join(sub["code_drift"]), ""]

    out += ["## The code", "",
            f"`train_gpt.py` is generated by `pgolf submission build` from the pgolf package "
            f"({len(bundle.modules)} modules: {', '.join(m.name for m in bundle.modules)}). It installs an import "
            "hook that serves the embedded `pgolf` package, so the modules run exactly as in the repository, "
            "then calls `pgolf.run.main_from_env(DEFAULTS)`. Do not edit it: fix the package and regenerate.", ""]
    if sub["bytes_code_form"] == "compressed":
        out += ["Print the program inside the compressed stub:", "", "```bash",
                "python3 -c \"import lzma,base64;exec(open('train_gpt.py').read().split('\\nexec(')[0]);"
                "print(lzma.decompress(base64.b85decode(B)).decode())\"",
                "```", ""]
    out += ["<details><summary>Embedded config (DEFAULTS)</summary>", "", "```json",
            json.dumps(defaults, indent=2, sort_keys=True), "```", "", "</details>", ""]
    return "\n".join(out)
