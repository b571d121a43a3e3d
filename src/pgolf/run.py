"""`pgolf run`: one record attempt, end to end, into one run folder.

    train -> calibrate (on the train clock) -> quantize (rank 0) -> evaluate from the artifact file
    -> summary.json + compliance.json -> final commit to the store (a generation, see pgolf.store.runstore)

Plain python on CPU, `torchrun` on GPUs; every rank calls `pipeline`. Stages talk only through the
run folder and small dataclasses; this module is the only place that chains them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pgolf import config as cfgmod
from pgolf.config import Config
from pgolf.errors import ConfigError, PgolfError, StoreError
from pgolf.fileio import atomic_write_json as write_json
from pgolf.runid import check_run_id
from pgolf.runinfo import CHALLENGE_EVAL_SECONDS, CHALLENGE_TRAIN_SECONDS, bundle_info, collect_environment

log = logging.getLogger("pgolf.run")


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if is_dataclass(obj):
        return asdict(obj)
    return dict(obj)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def source_sha256() -> str | None:
    """Identity of the code that ran: the bundle's digest, or the same digest of the package."""
    if bundle_info():
        return bundle_info().get("source_sha256")
    try:  # the bundler is not embedded in the single file, which never gets here
        from pgolf.submission.bundle import collect_modules, source_digest
    except ImportError:
        return None
    return source_digest(collect_modules())


def environment(cfg: Config, device: Any, world_size: int) -> dict[str, Any]:
    """environment.json: pgolf.runinfo's facts, plus those only the rooms above it know."""
    from pgolf.model import attention_backend_in_use
    from pgolf.quantize.report import code_facts

    return collect_environment(cfg, device, world_size, source_sha256=source_sha256(), code=code_facts(cfg),
                               attention_backend=attention_backend_in_use(cfg.model, device))


def check_inputs(cfg: Config, device: Any) -> None:
    """What can be refused before the run claims its id in the store: the shards and the
    tokenizer open, and the model fits on the device."""
    from pgolf.data.bpb import load_sentencepiece
    from pgolf.data.shards import shard_paths, sidecar_paths
    from pgolf.train import check_fits

    for split in ("train", "val"):
        shard_paths(cfg.data.data_path, split)
    if cfg.data.tokenizer_path and not sidecar_paths(cfg.data.data_path, "val"):
        load_sentencepiece(cfg.data.tokenizer_path)
    check_fits(cfg, device)


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """A new run never writes into a folder that holds one; --resume needs the folder."""
    check_run_id(run_dir.name)  # the folder's name is the run id, here and in the store
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: no run folder {run_dir}: pull the run first (pgolf "
                              f"results pull {run_dir.name} --to {run_dir.parent}) or drop --resume")
        return
    held = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) \
        if run_dir.is_dir() else []
    if held:
        raise ConfigError(f"run folder {run_dir} already holds a run ({', '.join(held[:3])}"
                          f"{', …' if len(held) > 3 else ''}): choose another --out or RUN_ID, "
                          "or pass --resume to continue it")


def prepare_run(cfg: Config, run_dir: Path, resume: bool, is_rank0: bool, device: Any) -> Any:
    """Before any work, checked on rank 0 and agreed by every rank: the inputs open, the model
    fits, the run folder may be used and, with RESULTS_URI, the store takes a write, reads it
    back, deletes it, and holds no other run under this id. Returns rank 0's RunSync (None
    elsewhere or without a store)."""
    from pgolf import dist

    error: BaseException | None = None
    sync = None
    if is_rank0:
        try:
            check_inputs(cfg, device)
            check_run_folder(run_dir, resume)
            if cfg.run.results_uri:
                from pgolf.store.sync import RunSync

                sync = RunSync(run_dir, cfg.run.results_uri,
                               every_seconds=cfg.run.sync_every_seconds,
                               deadline_s=cfg.run.sync_deadline_seconds, resume=resume)
                sync.attach()
        except (PgolfError, OSError) as exc:
            error = exc
    message = dist.agree(str(error) if error is not None else None)
    if error is not None:
        raise error
    if message:
        raise PgolfError(message)
    return sync


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json of a run folder whose last commit says complete (nothing left to resume)."""
    from pgolf.store.sync import read_local_generation

    try:
        local = read_local_generation(run_dir)
    except PgolfError:
        return None
    if local is None or not local.complete or not (run_dir / "summary.json").is_file():
        return None
    return _read_json(run_dir / "summary.json")


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
    """Run every stage; returns the summary dict (also written to summary.json on rank 0).

    `resume` continues the run in `run_dir` (a folder of an interrupted run, or one pulled from the
    store): from its checkpoint when it has one, else from step 0; a complete run is left as is.
    """
    from pgolf import dist, evaluate, quantize, train

    rank, world_size, _, device = dist.distributed_context(cfg.train.device)
    is_rank0 = rank == 0
    run_dir = Path(run_dir)
    sync = prepare_run(cfg, run_dir, resume, is_rank0, device)
    if resume:
        done = dist.agree(finished_summary(run_dir) if is_rank0 else None)
        if done:
            log.info("run %s is already complete: nothing to resume", run_dir.name)
            return done if is_rank0 else {}
    resume_training = resume and dist.agree((run_dir / "checkpoint" / "state.pt").is_file())
    if resume and not resume_training:  # killed before its first checkpoint: start again
        log.info("resume: no checkpoint in %s: training starts again from step 0", run_dir)
        train.RunLog(run_dir, is_rank0).rewind({"train.log": 0, "metrics.jsonl": 0})
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
        write_json(run_dir / "environment.json", environment(cfg, device, world_size))
    phase = PhaseTimer(run_dir, is_rank0)

    with sync if sync is not None else nullcontext():
        with phase("train"):
            trained = train.train(cfg, run_dir, resume=resume_training)
        calib_s = 0.0
        if cfg.quant.quant_method == "gptq":
            with phase("calibrate"):
                calib = quantize.calibrate(cfg, run_dir)
            calib_s = calib.seconds
            if is_rank0:
                log_calibration(cfg, run_dir, trained.train_time_ms / 1000.0, calib_s, calib.tokens)
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
                                    phase.seconds, enforce_time=device.type == "cuda")
            final_line = (f"final val_loss:{summary['val_loss']:.8f} val_bpb:{summary['val_bpb']:.8f} "
                          f"total_bytes:{summary['total_bytes']} compliance:{'ok' if summary['compliant'] else 'FAILED'}")
            append_to_train_log(run_dir, [final_line])
            log.info(final_line)
    if sync is not None and not sync.report.ok:
        raise StoreError(
            f"the results of run {sync.run_id} did not reach {sync.store.uri}: "
            f"{len(sync.report.unsynced)} file(s) not committed; the run folder is complete at "
            f"{run_dir.resolve()}: pgolf results push {run_dir.resolve()} --to {sync.store.uri}")
    return summary


def calibration_budget(cfg: Config, train_time_s: float, calib_s: float) -> dict[str, Any]:
    """Whether GPTQ calibration fit the train clock: training stopped at MAX_WALLCLOCK_SECONDS -
    GPTQ_RESERVE_SECONDS (the reserve is taken up front, pgolf.train.schedule.train_cap_ms), then the
    Hessians were collected; train + calibration must stay within the cap (#1855 overran by 4.7 s)."""
    t = cfg.train
    cap = t.max_wallclock_seconds if t.max_wallclock_seconds > 0 else None
    total = train_time_s + calib_s
    return {"calib_s": round(calib_s, 3), "calib_batches": cfg.quant.calib_batches,
            "gptq_reserve_s": t.gptq_reserve_seconds, "cap_s": cap, "train_plus_calib_s": round(total, 3),
            "calib_within_reserve": calib_s <= t.gptq_reserve_seconds,
            "train_plus_calib_within_cap": cap is None or total <= cap}


def log_calibration(cfg: Config, run_dir: Path, train_time_s: float, calib_s: float, tokens: int) -> None:
    """One train.log line and one metrics.jsonl event for the calibration's share of the train clock."""
    b = calibration_budget(cfg, train_time_s, calib_s)
    cap = f"{b['cap_s']:g}s" if b["cap_s"] is not None else "none"
    line = (f"gptq_calibration: batches:{b['calib_batches']} tokens_per_rank:{tokens} seconds:{calib_s:.2f} "
            f"reserve:{b['gptq_reserve_s']:g}s train+calib:{b['train_plus_calib_s']:.2f}s cap:{cap} "
            f"within_cap:{'yes' if b['train_plus_calib_within_cap'] else 'NO'}")
    if not b["calib_within_reserve"]:
        line += (f"\nwarning: calibration took {calib_s:.2f}s, more than GPTQ_RESERVE_SECONDS="
                 f"{b['gptq_reserve_s']:g}; raise the reserve (or lower CALIB_BATCHES) to keep it inside the cap")
    append_to_train_log(run_dir, [line])
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": "calibration", "tokens_per_rank": tokens, **b}) + "\n")
    log.info(line)


def append_to_train_log(run_dir: Path, lines: list[str]) -> None:
    """train.log is the log a submission ships (train_seed<S>.log): the sizes the run counted (code
    bytes: which file and why) and its final score go in it after the training lines."""
    with open(run_dir / "train.log", "a", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))


def write_summary(cfg: Config, run_dir: Path, trained: Any, calib_s: float, quant_result: Any,
                  post_quant: Any, final: Any, phases: Mapping[str, float],
                  enforce_time: bool = True) -> dict[str, Any]:
    from pgolf.cloud.cost import run_cost
    from pgolf.data.bpb import byte_source
    from pgolf.data.leakage import val_docs_in_training, val_shards_in_training

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
        "calibration": calibration_budget(cfg, train_time_s, calib_s),
        "eval_time_s": e.get("eval_time_s"),
        "eval_parts_s": e.get("parts"),
        "model_bytes": q.get("model_bytes"),
        "code_bytes": q.get("code_bytes"),
        "total_bytes": q.get("total_bytes"),
        "compressor": q.get("compressor"),
        "compress_s": q.get("compress_seconds"),
        "compiles": {"train": t.get("compiles") or {}, "eval_postquant": post.get("compiles") or {},
                     "eval": e.get("compiles") or {}},
        "val_shards_in_training": val_shards_in_training(cfg.data.data_path),
        "leakage_check": val_docs_in_training(cfg.data.data_path),
        "byte_source": byte_source(cfg.data.data_path, cfg.data.tokenizer_path),
        "phases_s": dict(phases),
        "cost_usd": cost.get("usd"),
        "cost": cost,
    }
    compliance = check_compliance(cfg, run_dir, summary, enforce_time=enforce_time)
    summary["compliant"] = all(rule["ok"] for rule in compliance.values() if rule["enforced"])
    summary["informational_failures"] = sorted(name for name, rule in compliance.items()
                                               if not rule["enforced"] and not rule["ok"])
    write_json(run_dir / "compliance.json", compliance)
    write_json(run_dir / "summary.json", summary)
    return summary


def check_compliance(cfg: Config, run_dir: Path, summary: Mapping[str, Any],
                     enforce_time: bool = True) -> dict[str, dict[str, Any]]:
    """Each challenge rule as a measured fact: {"ok", "value", "limit", "enforced", "how"}.

    The two time rules are 8xH100 rules: off CUDA (`enforce_time=False`) they are measured and
    reported but `enforced` is false, so a CPU run is judged only on what the code controls.
    """
    evals = _read_json(run_dir / "eval_summary.json")
    rules: dict[str, dict[str, Any]] = {}

    def rule(name: str, value: Any, limit: Any, ok: bool, how: str, enforced: bool = True) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/inf
        rules[name] = {"ok": bool(ok), "value": value, "limit": limit, "enforced": enforced, "how": how}

    on_h100 = "" if enforce_time else " (an 8xH100 rule: informational on this device)"
    train_s = summary["train_plus_calib_s"]
    rule("train_time", train_s, CHALLENGE_TRAIN_SECONDS, train_s <= CHALLENGE_TRAIN_SECONDS,
         "train clock (first real step to stop, validation paused) + GPTQ calibration seconds" + on_h100,
         enforce_time)
    cap = cfg.train.max_wallclock_seconds
    if cap > 0:
        rule("calibration_in_train_clock", train_s, cap, train_s <= cap,
             f"train clock + GPTQ calibration ({summary.get('calib_time_s', 0.0)} s of {cfg.quant.calib_batches} "
             f"batches) within MAX_WALLCLOCK_SECONDS; training stopped GPTQ_RESERVE_SECONDS="
             f"{cfg.train.gptq_reserve_seconds:g} early to leave room for it" + on_h100, enforce_time)
    eval_s = summary.get("eval_time_s")
    rule("eval_time", eval_s, CHALLENGE_EVAL_SECONDS, eval_s is not None and eval_s <= CHALLENGE_EVAL_SECONDS,
         "eval clock from before the artifact is read: load, build, warm-up, scoring and TTT" + on_h100,
         enforce_time)
    score = summary.get("val_bpb")
    rule("score_is_finite", score, "finite", isinstance(score, (int, float)) and math.isfinite(score),
         "val_bpb of the scored pass is a finite number (a NaN or inf score is never a result)")
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
    src, scored_bytes = summary.get("byte_source") or {}, summary.get("bytes")
    sidecar_ok = src.get("source") == "sidecar" and src.get("sidecar_bytes") == scored_bytes
    rule("bytes_are_original", src.get("source"), "sidecar" if src.get("caseops_tokenizer") else "sidecar|tokenizer",
         sidecar_ok or (src.get("source") == "tokenizer" and src.get("caseops_tokenizer") is False),
         f"bpb divides by the original text's bytes: {scored_bytes} scored bytes; from the val byte sidecar "
         f"({src.get('sidecar_bytes')} bytes, which must equal them) or, for a tokenizer that does not rewrite "
         "the text, its own byte tables (CaseOps tokenizers need the sidecar)")
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
