"""`pgolf run`: one record attempt, end to end, into one run folder.

    train -> calibrate (on the train clock) -> quantize (rank 0) -> evaluate from the artifact file
    -> summary.json + compliance.json -> final sync (manifest.json last)

Plain python on CPU, `torchrun` on GPUs; every rank calls `pipeline`. Stages talk only through the
run folder and small dataclasses; this module is the only place that chains them.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pgolf import config as cfgmod
from pgolf.config import Config
from pgolf.fileio import atomic_write_json as write_json
from pgolf.errors import ConfigError, PgolfError
from pgolf.runinfo import (
    CHALLENGE_EVAL_SECONDS,
    CHALLENGE_TRAIN_SECONDS,
    bundle_info,
    collect_environment,
    val_docs_in_training,
    val_shards_in_training,
)

log = logging.getLogger("pgolf.run")


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if is_dataclass(obj):
        return asdict(obj)
    return dict(obj)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _sync_context(cfg: Config, run_dir: Path, is_rank0: bool):
    """Background sync of the run folder to RESULTS_URI (rank 0 only); a no-op without a URI."""
    if not (is_rank0 and cfg.run.results_uri):
        return nullcontext()
    from pgolf.sync import RunSync

    return RunSync(run_dir, cfg.run.results_uri, every_seconds=cfg.run.sync_every_seconds)


class PhaseTimer:
    """Wall seconds per pipeline phase, logged as `phase` events in metrics.jsonl (rank 0)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled, self.seconds = run_dir, enabled, {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            if self.enabled:  # rank 0 only: one line per phase, not one per rank
                with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"event": "phase", "phase": name, "seconds": self.seconds[name]}) + "\n")
                log.info("phase:%s seconds:%.1f", name, self.seconds[name])


def pipeline(cfg: Config, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run every stage; returns the summary dict (also written to summary.json on rank 0)."""
    from pgolf import dist, evaluate, quantize, train

    rank, world_size, _, device = dist.distributed_context(cfg.train.device)
    is_rank0 = rank == 0
    run_dir = Path(run_dir)
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
        write_json(run_dir / "environment.json", collect_environment(cfg, device, world_size))
    phase = PhaseTimer(run_dir, is_rank0)

    with _sync_context(cfg, run_dir, is_rank0):
        with phase("train"):
            trained = train.train(cfg, run_dir, resume=resume)
        calib_s = 0.0
        if cfg.quant.quant_method == "gptq":
            with phase("calibrate"):
                calib_s = quantize.calibrate(cfg, run_dir).seconds
        quant_result = None
        with phase("quantize"):
            if is_rank0:
                quant_result = quantize.quantize(cfg, run_dir, check_cap=False)
                append_to_train_log(run_dir, quantize.size_lines(run_dir / "quant_report.json"))
            dist.barrier()
        # The trainer's final validation already scored the exported (post-EMA) weights in rows:
        # that is the pre-quant figure; the same rows on the artifact give the quantization gap.
        with phase("eval_postquant"):
            post_quant = evaluate.evaluate(cfg, run_dir, mode="rows", summary_name="eval_postquant.json")
        with phase("eval"):
            final = evaluate.evaluate(cfg, run_dir, per_token_out=run_dir / "eval_per_token.npz")

        summary: dict[str, Any] = {}
        if is_rank0:
            summary = write_summary(cfg, run_dir, trained, calib_s, quant_result, post_quant, final,
                                    phase.seconds)
            final_line = (f"final val_loss:{summary['val_loss']:.8f} val_bpb:{summary['val_bpb']:.8f} "
                          f"total_bytes:{summary['total_bytes']} compliance:{'ok' if summary['compliant'] else 'FAILED'}")
            append_to_train_log(run_dir, [final_line])
            log.info(final_line)
    return summary


def append_to_train_log(run_dir: Path, lines: list[str]) -> None:
    """train.log is the log a submission ships (train_seed<S>.log): the sizes the run counted (code
    bytes: which file and why) and its final score go in it after the training lines."""
    with open(run_dir / "train.log", "a", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))


def write_summary(cfg: Config, run_dir: Path, trained: Any, calib_s: float, quant_result: Any,
                  post_quant: Any, final: Any, phases: Mapping[str, float]) -> dict[str, Any]:
    from pgolf.cost import run_cost

    t, q, e, post = _as_dict(trained), _as_dict(quant_result), _as_dict(final), _as_dict(post_quant)
    train_time_s = t.get("train_time_ms", 0.0) / 1000.0
    cost = run_cost({"train": phases.get("train", 0.0) + phases.get("calibrate", 0.0),
                     "quantize": phases.get("quantize", 0.0),
                     "eval": phases.get("eval_postquant", 0.0) + phases.get("eval", 0.0)},
                    cfgmod.env_flag("PGOLF_PHASES_FILE") or None, cfgmod.env_flag("SKYPILOT_CLUSTER_INFO") or None)
    summary = {
        "run_id": run_dir.name,
        "preset": cfg.preset,
        "seed": cfg.train.seed,
        "steps": t.get("steps"),
        "step_avg_ms": t.get("step_avg_ms"),
        "stop_reason": t.get("stop_reason"),
        "tokens_seen": t.get("tokens_seen"),
        "peak_memory_mib": t.get("peak_memory_mib"),
        "world_size": t.get("world_size"),
        "pre_ema_val_loss": t.get("pre_ema_val_loss"),
        "pre_ema_val_bpb": t.get("pre_ema_val_bpb"),
        "prequant_val_loss": t.get("last_val_loss"),
        "prequant_val_bpb": t.get("last_val_bpb"),
        "postquant_val_loss": post.get("val_loss"),
        "postquant_val_bpb": post.get("val_bpb"),
        "eval_mode": e.get("mode", cfg.eval.eval_mode),
        "val_loss": e.get("val_loss"),
        "val_bpb": e.get("val_bpb"),
        "targets": e.get("targets"),
        "bytes": e.get("bytes"),
        "ttt_steps": e.get("ttt_steps"),
        "eval_guard_fired": e.get("guard_fired"),
        "train_time_s": round(train_time_s, 3),
        "calib_time_s": round(calib_s, 3),
        "train_plus_calib_s": round(train_time_s + calib_s, 3),
        "eval_time_s": e.get("eval_time_s"),
        "eval_parts_s": e.get("parts"),
        "model_bytes": q.get("model_bytes"),
        "code_bytes": q.get("code_bytes"),
        "total_bytes": q.get("total_bytes"),
        "compressor": q.get("compressor"),
        "val_shards_in_training": val_shards_in_training(cfg.data.data_path),
        "leakage_check": val_docs_in_training(cfg.data.data_path),
        "phases_s": dict(phases),
        "cost_usd": cost.get("usd"),
        "cost": cost,
    }
    compliance = check_compliance(cfg, run_dir, summary)
    summary["compliant"] = all(rule["ok"] for rule in compliance.values())
    write_json(run_dir / "compliance.json", compliance)
    write_json(run_dir / "summary.json", summary)
    return summary


def check_compliance(cfg: Config, run_dir: Path, summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each challenge rule as a measured fact: {"ok", "value", "limit", "how"}."""
    evals = _read_json(run_dir / "eval_summary.json")
    rules: dict[str, dict[str, Any]] = {}

    def rule(name: str, value: Any, limit: Any, ok: bool, how: str) -> None:
        rules[name] = {"ok": bool(ok), "value": value, "limit": limit, "how": how}

    train_s = summary["train_plus_calib_s"]
    rule("train_time", train_s, CHALLENGE_TRAIN_SECONDS, train_s <= CHALLENGE_TRAIN_SECONDS,
         "train clock (first real step to stop, validation paused) + GPTQ calibration seconds")
    eval_s = summary.get("eval_time_s")
    rule("eval_time", eval_s, CHALLENGE_EVAL_SECONDS, eval_s is not None and eval_s <= CHALLENGE_EVAL_SECONDS,
         "eval clock from before the artifact is read: load, build, warm-up, scoring and TTT")
    total = summary.get("total_bytes")
    rule("artifact_bytes", total, cfg.quant.size_cap_bytes, total is not None and total <= cfg.quant.size_cap_bytes,
         "artifact.pgz file size + code bytes (see quant_report.json)")
    violations, checks = evals.get("score_first_violations"), evals.get("score_first_checks", 0)
    rule("ttt_score_first", violations, 0, violations == 0,
         f"{checks} TTT optimizer steps checked: each trained only on targets whose scores were already "
         "committed (mode " + str(evals.get("mode")) + ")")
    scored, expected = evals.get("targets"), evals.get("expected_targets")
    rule("every_target_scored_once", scored, expected, scored is not None and scored == expected,
         "targets scored by the final pass == validation tokens - 1")
    overlap, leak = summary.get("val_shards_in_training"), summary.get("leakage_check") or {}
    rule("val_not_trained_on", leak.get("overlapping_docs"), leak.get("allowed_docs", 0),
         overlap == 0 and leak.get("ok") is True,
         f"val documents whose exact tokens are a train document ({leak.get('method') or leak.get('error')}); "
         f"and {overlap} val shards the training stream and calibration could read (same path or sha256)")
    return rules


def main_from_env(defaults: Mapping[str, Any] | None = None, argv: list[str] | None = None) -> int:
    """Entry point for the generated single-file submission: embedded defaults < env vars."""
    from pgolf import dist

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the `pgolf` CLI: progress on stderr
    try:
        base = cfgmod.from_dict(defaults) if defaults else cfgmod.resolve(env={})
        cfg = cfgmod.apply_overrides(base, cfgmod.env_overrides())
        if cfg.run.results_uri and bundle_info():  # every rank: the file has no store code (it would count)
            raise ConfigError(f"RESULTS_URI={cfg.run.results_uri} is set, but train_gpt.py does not sync itself; run "
                              "it as `pgolf results sync -- torchrun ... train_gpt.py` (sky/record.yaml does) or unset it")
        run_dir = Path(cfg.run.runs_dir) / dist.resolve_run_id(cfg)
        summary = pipeline(cfg, run_dir)
    except PgolfError as exc:  # the file has no CLI edge: the same one-line error as `pgolf`
        log.error("error: %s%s", exc, f"\nhint: {exc.hint}" if exc.hint else "")
        return 2
    return 0 if not summary or summary["compliant"] else 1
