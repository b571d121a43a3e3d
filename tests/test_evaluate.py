"""pgolf.evaluate end to end on CPU: real debug-preset GPTs trained here for a few seconds.

Two small models are trained in this module (AdamW, a few dozen steps):
* `skip2`: on a synthetic stream over 32 ids of the offline tokenizer where token i is a fixed
  permutation of token i-2 (10% noise). The bigram path cannot predict it; attention to two tokens
  back can, so context matters and a model learns to use it within seconds. (A model trained for
  seconds on English stays near unigram level and uses almost no context, so rows-vs-sliding and
  score-first checks on it would compare noise.)
* `english`: on the offline English corpus, for the style-shift TTT test (validated on Python source).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pgolf import config as cfgmod
from pgolf.data.bpb import load_sentencepiece, val_target_bytes
from pgolf.data.shards import read_shard, write_shard
from pgolf.errors import ArtifactError
from pgolf.evaluate import evaluate, plan_chunks, plan_windows
from pgolf.evaluate.score import ScoreFirstViolation
from pgolf.model import GPT, build_model
from rank_fixtures import evaluate_on_two_ranks

SKIP2_IDS = np.arange(300, 332)  # ordinary pieces of the offline tokenizer
SKIP2_EVAL = dict(eval_seq_len=32, eval_stride=8, eval_batch_seqs=16, ttt_chunk_tokens=512, ttt_batch_seqs=8,
                  ttt_epochs=2, ttt_lr=1e-3)


def skip2_stream(n: int, perm: np.ndarray, seed: int, noise: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.empty(n, dtype=np.int64)
    t[:2] = rng.integers(0, len(perm), 2)
    flips = rng.random(n) < noise
    fresh = rng.integers(0, len(perm), n)
    for i in range(2, n):
        t[i] = fresh[i] if flips[i] else perm[t[i - 2]]
    return SKIP2_IDS[t]


def train_tiny(cfg: cfgmod.Config, stream: np.ndarray, steps: int, lr: float, batch: int = 16,
               seq_len: int = 32) -> dict[str, torch.Tensor]:
    """A few dozen AdamW steps on random crops of `stream`; returns the state dict."""
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - seq_len - 1, batch)
        x = torch.from_numpy(np.stack([stream[a:a + seq_len] for a in starts]))
        y = torch.from_numpy(np.stack([stream[a + 1:a + seq_len + 1] for a in starts]))
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_val_dir(path: Path, tokens: np.ndarray, tokenizer: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_shard(path / "fineweb_val_000000.bin", np.asarray(tokens))
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def debug_cfg(data_dir: Path, **overrides) -> cfgmod.Config:
    return cfgmod.resolve("debug", {"data_path": str(data_dir), "tokenizer_path": str(data_dir / "tokenizer.model"),
                                    **overrides}, env={})


def run(cfg, tmp: Path, sd, mode: str, name: str = "run", **kwargs):
    """evaluate() with an in-memory state dict; returns (result, per-token nll)."""
    out = tmp / f"{name}-{mode}.npz"
    result = evaluate(cfg, tmp / name, mode=mode, per_token_out=out, state_dict_loader=lambda _: sd, **kwargs)
    return result, np.load(out)["nll"]


@pytest.fixture(scope="module")
def skip2(offline_data, tmp_path_factory):
    perm = np.random.default_rng(0).permutation(len(SKIP2_IDS))
    tmp = tmp_path_factory.mktemp("skip2")
    data = make_val_dir(tmp / "data", skip2_stream(2_500, perm, seed=7), offline_data / "tokenizer.model")
    cfg = debug_cfg(data, **SKIP2_EVAL)
    sd = train_tiny(cfg, skip2_stream(100_000, perm, seed=3), steps=50, lr=1e-2)
    tokens = np.asarray(read_shard(data / "fineweb_val_000000.bin")).astype(np.int64)
    return SimpleNamespace(tmp=tmp, data=data, cfg=cfg, sd=sd, tokens=tokens, perm=perm)


@pytest.fixture(scope="module")
def mode_results(skip2):
    return {mode: run(skip2.cfg, skip2.tmp, skip2.sd, mode) for mode in ("rows", "sliding", "ttt")}


# --- every mode scores every target exactly once -----------------------------------------------


@pytest.mark.parametrize("mode", ["rows", "sliding", "ttt"])
def test_every_target_scored_once(skip2, mode_results, mode):
    result, nll = mode_results[mode]
    n_targets = len(skip2.tokens) - 1
    assert result.targets == result.expected_targets == n_targets
    assert nll.shape == (n_targets,) and np.isfinite(nll).all() and (nll > 0).all()  # no target left at 0
    audit = np.load(skip2.tmp / f"run-{mode}.npz")
    expected_bytes = val_target_bytes(skip2.data, skip2.tokens, skip2.data / "tokenizer.model")
    assert audit["bytes"].dtype == np.int32 and (audit["bytes"] == expected_bytes).all()
    assert audit["nll"].dtype == np.float32
    # anyone can recompute the score from the audit file
    assert nll.astype(np.float64).sum() / (math.log(2) * audit["bytes"].sum()) == pytest.approx(result.val_bpb, rel=1e-9)
    assert result.bytes == int(expected_bytes.sum())
    summary = json.loads((skip2.tmp / "run" / "eval_summary.json").read_text())
    assert set(summary) >= {"mode", "val_loss", "val_bpb", "targets", "bytes", "eval_time_s", "parts", "ttt_steps",
                            "guard_fired", "score_first_violations", "expected_targets"}
    assert set(result.parts) == {"load", "build", "warmup", "score", "ttt"}
    assert 0 < sum(result.parts.values()) <= result.eval_time_s + 1e-6
    assert (result.ttt_steps > 0) == (mode == "ttt") and not result.guard_fired


def test_sliding_beats_rows_on_trained_model(mode_results):
    rows, rows_nll = mode_results["rows"]
    sliding, sliding_nll = mode_results["sliding"]
    # the first window is the first row: identical inputs, so identical scores
    np.testing.assert_allclose(rows_nll[:32], sliding_nll[:32], rtol=1e-6)
    # rows restart cold every 32 targets; sliding gives every later target >= 24 tokens of context
    assert sliding.val_bpb < rows.val_bpb - 0.02, (sliding.val_bpb, rows.val_bpb)


def test_metrics_event_per_evaluation(skip2, mode_results):
    events = [json.loads(line) for line in (skip2.tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["mode"] for e in events if e["event"] == "eval"][:3] == ["rows", "sliding", "ttt"]


# --- score-first -------------------------------------------------------------------------------


def perturbed_from(tokens: np.ndarray, p: int, seed: int) -> np.ndarray:
    """Tokens with every token from index p + 1 on (the labels of targets >= p) redrawn."""
    rng = np.random.default_rng(seed)
    out = tokens.copy()
    out[p + 1:] = rng.choice(SKIP2_IDS, size=len(tokens) - p - 1)
    assert (out[p + 1:] != tokens[p + 1:]).mean() > 0.9
    return out


def score_first_breaches(skip2, tmp: Path, base_nll: np.ndarray, cuts: list[int]) -> list[int]:
    """Cut points p where perturbing targets >= p changed the NLL of some target < p (must be none)."""
    breaches = []
    for i, p in enumerate(cuts):
        data = make_val_dir(tmp / f"cut{p}", perturbed_from(skip2.tokens, p, seed=i), skip2.data / "tokenizer.model")
        result, nll = run(debug_cfg(data, **SKIP2_EVAL), tmp, skip2.sd, "ttt", name=f"cut{p}")
        assert not np.array_equal(nll[p:], base_nll[p:])  # the perturbation did reach the scores
        if not np.array_equal(nll[:p], base_nll[:p]):
            breaches.append(p)
    return breaches


def test_score_first_perturbation(skip2, mode_results, tmp_path):
    """Perturb every token from a point on: every NLL before it is bit-identical (CPU, deterministic)."""
    ttt, base_nll = mode_results["ttt"]
    _, sliding_nll = mode_results["sliding"]
    chunks = plan_chunks(plan_windows(len(skip2.tokens), 32, 8), 512)
    assert len(chunks) == 5 and ttt.ttt_steps == 4 * 2 * 2  # 4 trained chunks x 2 epochs x 16/8 steps
    # TTT did change the weights: chunk 0 is scored as in plain sliding, later chunks are not
    np.testing.assert_allclose(base_nll[:512], sliding_nll[:512], rtol=1e-5)
    assert np.abs(base_nll[512:] - sliding_nll[512:]).max() > 1e-3
    cuts = [chunks[1].lo, chunks[2].lo + 200, chunks[-1].lo, chunks[-1].lo + 100]  # boundaries, mid, last
    assert score_first_breaches(skip2, tmp_path, base_nll, cuts) == []


def _train_one_chunk_ahead(monkeypatch):
    """An illegal evaluator: after scoring chunk c it trains on chunk c + 1 (not scored yet)."""
    from pgolf.evaluate import ttt as ttt_mod

    real = ttt_mod.split_range
    monkeypatch.setattr(ttt_mod, "split_range", lambda lo, hi, n: real(hi, min(2 * hi - lo, 2_499), n))


def test_training_ahead_of_the_scores_is_refused(skip2, tmp_path, monkeypatch):
    _train_one_chunk_ahead(monkeypatch)
    with pytest.raises(ScoreFirstViolation, match="only \\[0, 512\\) are scored"):
        run(skip2.cfg, tmp_path, skip2.sd, "ttt")


def test_perturbation_check_catches_a_leaky_evaluator(skip2, mode_results, tmp_path, monkeypatch):
    """The perturbation test has teeth: with the structural check disabled, lookahead is detected."""
    from pgolf.evaluate.score import Tally

    _train_one_chunk_ahead(monkeypatch)
    monkeypatch.setattr(Tally, "require_scored", lambda self, spans: None)
    _, leaky_nll = run(skip2.cfg, tmp_path, skip2.sd, "ttt", name="leaky")
    chunks = plan_chunks(plan_windows(len(skip2.tokens), 32, 8), 512)
    p = chunks[2].lo + 200  # mid-chunk: the first half of chunk 2 was scored after training on all of it
    assert score_first_breaches(skip2, tmp_path, leaky_nll, [p]) == [p]


# --- TTT on text of another style ----------------------------------------------------------------


def test_ttt_lowers_bpb_on_text_of_another_style(offline_data, tmp_path):
    """Train on the English corpus, evaluate on Python source: score-first TTT adapts to it."""
    sp = load_sentencepiece(offline_data / "tokenizer.model")
    code = "\n".join(inspect.getsource(m) for m in (json.decoder, json.encoder, shutil))
    val = np.array(sp.encode(code), dtype=np.int64)[:3_000]
    data = make_val_dir(tmp_path / "code", val, offline_data / "tokenizer.model")
    cfg = debug_cfg(data, ttt_chunk_tokens=512, ttt_epochs=2, ttt_lr=1e-3, eval_seq_len=32, eval_stride=8)
    english = np.asarray(read_shard(offline_data / "fineweb_train_000000.bin")[:200_000]).astype(np.int64)
    sd = train_tiny(cfg, english, steps=40, lr=3e-3)
    sliding, _ = run(cfg, tmp_path, sd, "sliding")
    ttt, nll = run(cfg, tmp_path, sd, "ttt")
    assert ttt.ttt_steps > 0 and not ttt.guard_fired
    assert ttt.val_bpb < sliding.val_bpb - 0.05, (ttt.val_bpb, sliding.val_bpb)


# --- the budget guard ---------------------------------------------------------------------------


def test_guard_with_tiny_budget_scores_everything_without_adapting(skip2, mode_results, tmp_path):
    cfg = skip2.cfg.with_overrides(eval_max_seconds=1e-3)
    result, nll = run(cfg, tmp_path, skip2.sd, "ttt")
    assert result.guard_fired and result.ttt_steps == 0 and result.ttt_chunks_adapted == 0
    assert "EVAL_MAX_SECONDS=0.001" in result.guard_reason and "chunk 1/5" in result.guard_reason
    assert result.targets == len(skip2.tokens) - 1
    summary = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    assert summary["guard_fired"] is True and summary["ttt_steps"] == 0
    np.testing.assert_allclose(nll, mode_results["sliding"][1], rtol=1e-5)  # no adaptation = sliding


class WorkClock:
    """A deterministic eval clock: one 'second' per 1,000 token positions through the model (x3 with grad)."""

    def __init__(self, monkeypatch):
        self.tokens = 0
        real = GPT.forward

        def counting(model, idx, *args, **kwargs):
            self.tokens += idx.numel() * (3 if torch.is_grad_enabled() else 1)  # backward ~ 2 forwards
            return real(model, idx, *args, **kwargs)

        monkeypatch.setattr(GPT, "forward", counting)

    def __call__(self) -> float:
        return self.tokens / 1000.0


def test_guard_stops_ttt_mid_run_and_finishes_inside_budget(skip2, tmp_path, monkeypatch):
    clock = WorkClock(monkeypatch)
    free, _ = run(skip2.cfg, tmp_path, skip2.sd, "ttt", name="free", clock=clock)
    assert not free.guard_fired and free.ttt_chunks_adapted == 4
    budget = 0.9 * free.eval_time_s  # short of the unguarded run: some chunks must go unadapted
    clock.tokens = 0
    capped, nll = run(skip2.cfg.with_overrides(eval_max_seconds=budget), tmp_path, skip2.sd, "ttt", name="capped",
                      clock=clock)
    assert capped.guard_fired and 0 < capped.ttt_chunks_adapted < 4
    assert capped.ttt_steps == capped.ttt_chunks_adapted * 4
    assert capped.targets == len(skip2.tokens) - 1 and np.isfinite(nll).all()
    assert capped.eval_time_s <= budget


@pytest.mark.parametrize("mode", ["rows", "ttt"])
def test_compiled_path_pads_batches_and_warms_up_on_random_tokens(skip2, mode_results, tmp_path, monkeypatch, mode):
    """The CUDA path on CPU: a stand-in for the compiled wrappers turns on static shapes and the warm-up;
    every call of a wrapper has the warm-up's signature (shape, grad mode, inference tensors), so each
    compiles exactly one graph, before any validation token is seen."""
    import pgolf.evaluate.core as core
    from pgolf.model.compiled import call_signature

    calls: list[tuple[str, dict[str, str], torch.Tensor]] = []

    class Recorder:
        def __init__(self, purpose, fn):
            self.purpose, self.fn = purpose, fn

        def __call__(self, idx):
            calls.append((self.purpose, call_signature((idx,), {}), idx.detach().clone()))
            return self.fn(idx)

    monkeypatch.setattr(core, "maybe_compiled", lambda purpose, fn, setting, device, **kw: Recorder(purpose, fn))
    monkeypatch.setattr(core, "is_compiled", lambda fn: isinstance(fn, Recorder))
    result, nll = run(skip2.cfg, tmp_path, skip2.sd, mode)
    warm = calls[:4] if mode == "ttt" else calls[:2]  # 2 scoring forwards, then 2 training forwards (TTT)
    assert [p for p, _, _ in warm] == ["score"] * 2 + (["ttt_step"] * 2 if mode == "ttt" else [])
    val_ids = set(SKIP2_IDS.tolist())
    assert all(not set(x.unique().tolist()) <= val_ids for _, _, x in warm)  # random ids, not validation
    for purpose in {p for p, _, _ in calls}:
        signatures = {tuple(sorted(sig.items())) for p, sig, _ in calls if p == purpose}
        assert len(signatures) == 1, (purpose, signatures)  # one graph each: ragged batches padded
    grad_mode = dict(next(sig for p, sig, _ in calls if p == "score"))["grad_mode"]
    assert grad_mode == ("no_grad" if mode == "ttt" else "inference_mode")
    assert result.parts["warmup"] > 0 and result.ttt_steps == mode_results[mode][0].ttt_steps
    np.testing.assert_allclose(nll, mode_results[mode][1], rtol=1e-4, atol=1e-5)  # padding changes nothing


def test_ttt_trainable_set_is_fp32():
    """Last blocks + control vectors + tied embedding train, in fp32 even where the model is bf16 (CUDA)."""
    from pgolf.evaluate.ttt import select_trainable

    model = build_model(cfgmod.resolve("tiny", {}, env={}).model, "cpu")
    model.tok_emb.to(torch.bfloat16)  # what build_model does on CUDA
    model.bigram.table.to(torch.bfloat16)
    names = {n for n, _ in select_trainable(model, unfreeze_blocks=2)}
    params = dict(model.named_parameters())
    assert {n for n in params if n.startswith(("blocks.2.", "blocks.3."))} <= names
    assert {"tok_emb.weight", "skip_weights", "smear.gate", "bigram.scale", "blocks.0.resid_mix",
            "blocks.0.attn.q_gain", "blocks.1.attn.vr_lambda", "blocks.1.attn.gate.bias"} <= names
    assert not names & {"blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight", "blocks.0.attn.gate.weight",
                        "bigram.table.weight", "bigram.proj.weight"}
    assert all(params[n].dtype == torch.float32 and params[n].requires_grad for n in names)
    assert params["bigram.table.weight"].dtype == torch.bfloat16 and not params["bigram.table.weight"].requires_grad


# --- distributed ----------------------------------------------------------------------------------


def test_two_gloo_ranks_match_one(skip2, mode_results, tmp_path):
    run_dir = evaluate_on_two_ranks(tmp_path, skip2.sd, skip2.cfg, {"sliding": ({}, "sliding"), "ttt": ({}, "ttt")})
    # measured: sliding bit-identical; ttt max |dNLL| 2.4e-6 nats, |dbpb| 1e-8 (gradient reduction order)
    for mode, nll_tol, bpb_tol in (("sliding", 1e-6, 1e-7), ("ttt", 1e-4, 1e-6)):
        one, one_nll = mode_results[mode]
        two = json.loads((run_dir / f"{mode}.json").read_text())
        two_nll = np.load(run_dir / f"{mode}.npz")["nll"]
        assert two["world_size"] == 2 and two["targets"] == one.targets and two["bytes"] == one.bytes
        assert two["ttt_steps"] == one.ttt_steps
        assert np.abs(two_nll - one_nll).max() <= nll_tol, mode
        assert abs(two["val_bpb"] - one.val_bpb) < bpb_tol, (mode, two["val_bpb"], one.val_bpb)


# --- loading and the CLI ----------------------------------------------------------------------------


def test_mismatched_weights_fail_in_one_line(skip2, tmp_path):
    sd = dict(skip2.sd)
    sd.pop("tok_emb.weight")
    with pytest.raises(ArtifactError, match="does not match the model config"):
        run(skip2.cfg, tmp_path, sd, "rows")


def test_cli_evaluates_a_run_folder_checkpoint(skip2, mode_results, tmp_path, capsys):
    from pgolf.cli import main

    run_dir = tmp_path / "runX"
    (run_dir / "checkpoint").mkdir(parents=True)
    torch.save({"model": skip2.sd}, run_dir / "checkpoint" / "model.pt")
    (run_dir / "config.json").write_text(skip2.cfg.to_json())
    out = tmp_path / "audit.npz"
    assert main(["evaluate", str(run_dir), "--checkpoint", str(run_dir / "checkpoint" / "model.pt"),
                 "--mode", "rows", "--per-token-out", str(out)]) == 0
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    assert summary["mode"] == "rows" and summary["val_bpb"] == pytest.approx(mode_results["rows"][0].val_bpb, rel=1e-9)
    assert np.load(out)["nll"].shape == (len(skip2.tokens) - 1,)
    # a checkpoint path alone: config.json is found one folder up, outputs go to --out
    other = tmp_path / "elsewhere"
    assert main(["evaluate", str(run_dir / "checkpoint" / "model.pt"), "--mode", "sliding", "--out", str(other),
                 "--eval-stride", "16"]) == 0
    summary = json.loads((other / "eval_summary.json").read_text())
    assert summary["mode"] == "sliding" and summary["stride"] == 16 and summary["seq_len"] == 32
    assert main(["evaluate", str(run_dir), "--mode", "rows"]) == 2  # no artifact.pgz yet
    assert "artifact" in capsys.readouterr().err


def test_artifact_is_read_from_disk_and_scored(skip2, mode_results, tmp_path):
    """The default path: run_dir/artifact.pgz written by the quantizer, dequantized by load_artifact."""
    from pgolf.quantize import quantize

    run_dir = tmp_path / "runQ"
    (run_dir / "checkpoint").mkdir(parents=True)
    torch.save(skip2.sd, run_dir / "checkpoint" / "model.pt")
    quantize(skip2.cfg, run_dir, check_cap=False)
    result = evaluate(skip2.cfg, run_dir, mode="rows")
    assert result.source == str(run_dir / "artifact.pgz") and result.parts["load"] > 0
    assert result.val_bpb == pytest.approx(mode_results["rows"][0].val_bpb, abs=0.02)  # quantization gap only


# --- a self-describing artifact: it evaluates alone, and refuses the wrong tokenizer or data ----------


@pytest.fixture(scope="module")
def quantized_run(skip2, tmp_path_factory):
    """A run folder (config.json + artifact.pgz) of the skip2 model, and its TTT score from that folder."""
    from pgolf.cli import main
    from pgolf.quantize import quantize

    run_dir = tmp_path_factory.mktemp("selfdesc") / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    torch.save(skip2.sd, run_dir / "checkpoint" / "model.pt")
    (run_dir / "config.json").write_text(skip2.cfg.to_json())
    quantize(skip2.cfg, run_dir, check_cap=False)
    assert main(["evaluate", str(run_dir), "--mode", "ttt"]) == 0
    return SimpleNamespace(dir=run_dir, summary=json.loads((run_dir / "eval_summary.json").read_text()))


def test_an_artifact_copied_anywhere_evaluates_alone(skip2, quantized_run, tmp_path):
    """No run folder, no preset: the artifact rebuilds its model and scores exactly as in its run."""
    from pgolf.cli import main
    from pgolf.quantize.artifact import read_artifact

    alone = tmp_path / "copied" / "X.pgz"
    alone.parent.mkdir()
    shutil.copy(quantized_run.dir / "artifact.pgz", alone)
    meta = read_artifact(alone).meta
    assert meta["model"]["num_layers"] == skip2.cfg.model.num_layers and meta["model"]["vocab_size"] == 1024
    assert meta["eval"]["eval_seq_len"] == skip2.cfg.eval_seq_len and "attention_backend" not in meta["model"]
    for extra in ([], ["--preset", "seed"]):  # a wrong preset guess no longer matters
        out = tmp_path / f"out{len(extra)}"
        assert main(["evaluate", str(alone), "--mode", "ttt", "--data", str(skip2.data),
                     "--tokenizer", str(skip2.data / "tokenizer.model"), "--out", str(out), *extra]) == 0
        got = json.loads((out / "eval_summary.json").read_text())
        assert got["val_bpb"] == quantized_run.summary["val_bpb"] and got["ttt_steps"] == quantized_run.summary["ttt_steps"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_wrong_model_knob_tokenizer_or_data_variant_is_one_line(skip2, quantized_run, offline_data, tmp_path,
                                                                   capsys):
    from pgolf.cli import main
    from pgolf.data.build import train_tokenizer
    from pgolf.data.manifest import file_entry, write_manifest
    from pgolf.fileio import sha256_file

    art = str(quantized_run.dir / "artifact.pgz")
    tok = str(skip2.data / "tokenizer.model")
    common = ["--mode", "rows", "--out", str(tmp_path / "o")]
    assert main(["evaluate", art, "--data", str(skip2.data), "--tokenizer", tok, "--preset", "seed",
                 "--num-layers", "3", *common]) == 2
    assert "holds another model than the config: NUM_LAYERS=2 (config: 3)" in _one_error_line(capsys)

    docs = [json.loads(line)["text"] for line in (offline_data / "docs.jsonl").read_text().splitlines()[:300]]
    other = train_tokenizer(docs, tmp_path / "other.model", vocab_size=512, num_threads=1)
    assert main(["evaluate", art, "--data", str(skip2.data), "--tokenizer", str(other), *common]) == 2
    line = _one_error_line(capsys)
    assert f"tokenizer {other} (sha256 {sha256_file(other)[:12]}) is not the one" in line
    assert f"(tokenizer.model, sha256 {sha256_file(tok)[:12]})" in line

    variant = tmp_path / "variant"  # shards whose manifest says they were tokenized with `other`
    make_val_dir(variant, skip2.tokens, Path(tok))
    write_manifest(variant, [file_entry(variant / "fineweb_val_000000.bin", variant)],
                   tokenizer={"file": "other.model", "sha256": sha256_file(other)})
    assert main(["evaluate", art, "--data", str(variant), "--tokenizer", tok, *common]) == 2
    assert "was tokenized with another tokenizer" in _one_error_line(capsys)

    wide = tmp_path / "wide"  # a bigger-vocab variant (sp8192-like ids) without a manifest
    make_val_dir(wide, np.array([5, 4000, 17, 8191], dtype=np.uint16), Path(tok))
    assert main(["evaluate", art, "--data", str(wide), "--tokenizer", tok, *common]) == 2
    assert "8191" in _one_error_line(capsys)
