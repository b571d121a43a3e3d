"""GPTQ calibration: H = (1/n) sum x^T x for the input x of every large linear layer.

Run by the pipeline right after training, on the train clock (technique-spec §7.1 item 3; the trainer
keeps `GPTQ_RESERVE_SECONDS` for it). Sources (QuantConfig.calib_source):

  train  `calib_batches` batches of TRAIN_BATCH_TOKENS // world_size tokens per rank, read with a
         fresh DistributedTokenLoader, i.e. from the START of the train stream (shard 0), each rank its
         own slice, the same tokens the model saw first. Deterministic, no sampling.
  self   text the model writes itself: `calib_batches` batches of MICRO_BATCH_SEQS sequences of
         TRAIN_SEQ_LEN tokens, sampled autoregressively at temperature 0.8 from BOS with a fixed seed
         (SEED + rank), no training data touched after the cap (technique-spec §7.1 item 3, #1019).

The weights are never cast: on CUDA the forward runs under bf16 autocast, and the fp32 weights are
snapshotted to CPU first (item 4) and written to checkpoint/model.pt if the trainer has not. H is
accumulated in fp32 and, when a process group is initialized, summed over ranks (H and row counts)
before the division, so every rank ends with the same Hessians; rank 0 writes checkpoint/hessians.pt.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pgolf.errors import ArtifactError
from pgolf.fileio import atomic_torch_save

log = logging.getLogger(__name__)

SELF_TEMPERATURE = 0.8


@dataclass
class CalibResult:
    seconds: float
    tokens: int  # tokens forwarded on this rank
    n_hessians: int
    source: str
    path: Path | None  # checkpoint/hessians.pt (None on ranks other than 0)


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ("module", "_orig_mod"):  # DDP, torch.compile
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def target_linears(model: nn.Module, max_passthrough: int) -> dict[str, nn.Linear]:
    """state-dict key of the weight -> module, for every nn.Linear too large for fp16 passthrough."""
    return {
        f"{name}.weight": m
        for name, m in _unwrap(model).named_modules()
        if isinstance(m, nn.Linear) and m.weight.numel() > max_passthrough
    }


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def head_input_module(model: nn.Module) -> nn.Module | None:
    """The module whose OUTPUT is the tied head's input: a `final_norm` module (#1855's name), if any.

    The tied embedding's GPTQ Hessian (EMBED_GPTQ) is E[x^T x] of that output; a model that applies
    its final norm as a bare function has no hook point, and its embedding falls back to RTN."""
    m = getattr(_unwrap(model), "final_norm", None)
    return m if isinstance(m, nn.Module) else None


class HessianHooks:
    """Forward hooks that add x^T x into fp32 accumulators: x = each target's input, or for `outputs`
    (key -> module) each module's output."""

    def __init__(self, targets: dict[str, nn.Linear], outputs: dict[str, tuple[nn.Module, int]] | None = None,
                 device: torch.device | str = "cpu"):
        self.h: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.handles = []
        for key, m in targets.items():
            self._accumulator(key, m.in_features, m.weight.device)
            self.handles.append(m.register_forward_pre_hook(self._hook(key)))
        for key, (m, width) in (outputs or {}).items():
            self._accumulator(key, width, device)
            self.handles.append(m.register_forward_hook(self._out_hook(key)))

    def _accumulator(self, key: str, width: int, device) -> None:
        self.h[key] = torch.zeros(width, width, dtype=torch.float32, device=device)
        self.rows[key] = 0

    def _add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.h[key].addmm_(x.T, x)
        self.rows[key] += x.shape[0]

    def _hook(self, key: str):
        def hook(module, args):
            self._add(key, args[0])

        return hook

    def _out_hook(self, key: str):
        def hook(module, args, out):
            self._add(key, out)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def finish(self) -> dict[str, torch.Tensor]:
        dist = _dist()
        keys = sorted(self.h)
        if not keys:
            return {}
        if dist is not None:
            counts = torch.tensor([self.rows[k] for k in keys], dtype=torch.float64, device=self.h[keys[0]].device)
            dist.all_reduce(counts)
            for k in keys:
                dist.all_reduce(self.h[k])
            rows = {k: float(c) for k, c in zip(keys, counts.tolist())}
        else:
            rows = {k: float(self.rows[k]) for k in keys}
        return {k: (self.h[k] / max(rows[k], 1.0)).cpu() for k in keys}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_batches(cfg, rank: int, world: int):
    """`calib_batches` (x) int64 arrays from the start of the train stream, this rank's slice."""
    from pgolf.data.loader import DistributedTokenLoader

    loader = DistributedTokenLoader(cfg.data.data_path, rank, world, cfg.model.vocab_size)
    for _ in range(cfg.quant.calib_batches):
        x, _ = loader.next_batch(cfg.train.train_batch_tokens, cfg.train.train_seq_len, 1)
        yield torch.from_numpy(x)


def bos_id(cfg) -> int:
    from pgolf.data.bpb import load_sentencepiece

    bos = int(load_sentencepiece(cfg.data.tokenizer_path).bos_id())
    if bos < 0:
        raise ArtifactError(f"tokenizer {cfg.data.tokenizer_path} has no BOS piece; use CALIB_SOURCE=train")
    return bos


@torch.no_grad()
def generate(model: nn.Module, n_seqs: int, seq_len: int, bos: int, seed: int, device: torch.device,
             temperature: float = SELF_TEMPERATURE) -> torch.Tensor:
    """(n_seqs, seq_len) tokens sampled from the model, starting at BOS (no KV cache: O(T^2) forwards)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.full((n_seqs, 1), bos, dtype=torch.long, device=device)
    while idx.shape[1] < seq_len:
        with _autocast(device):
            logits = model(idx)[:, -1, :].float()
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=gen).to(device)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def load_model(cfg, checkpoint: Path, device: torch.device) -> nn.Module:
    from pgolf.model import build_model

    if not checkpoint.is_file():
        raise ArtifactError(f"checkpoint {checkpoint} not found; train first (`pgolf train`) or pass a run folder")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build_model(cfg.model, device)
    model = _unwrap(model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{checkpoint} does not fit the configured model ({first}); pass the run's config.json") from None
    return model.eval()


def calibrate(cfg, run_dir: Path, model: nn.Module | None = None) -> CalibResult:
    """Collect the Hessians of every large block linear; write checkpoint/hessians.pt (rank 0)."""
    ckpt_dir = Path(run_dir) / "checkpoint"
    return calibrate_checkpoint(cfg, ckpt_dir / "model.pt", ckpt_dir / "hessians.pt", model)


def calibrate_checkpoint(cfg, checkpoint: Path, hessians_path: Path, model: nn.Module | None = None) -> CalibResult:
    """`calibrate` for explicit paths: the model from `checkpoint` (or the live `model`) -> `hessians_path`."""
    t0 = time.perf_counter()
    checkpoint, path = Path(checkpoint), Path(hessians_path)
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    if model is None:
        model = load_model(cfg, checkpoint, resolve_device(cfg.train.device))
    else:
        model = _unwrap(model)
        # fp32 snapshot on CPU before anything could cast the live model (§7.1 item 4); it becomes
        # the checkpoint when the trainer has not written one
        snapshot = {k: v.detach().to("cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                    for k, v in model.state_dict().items()}
        if rank == 0 and not checkpoint.exists():
            atomic_torch_save(checkpoint, snapshot)
        del snapshot
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    q = cfg.quant
    targets = target_linears(model, q.passthrough_max_numel)
    if not targets:  # every linear is passed through as fp16 (tiny shapes): nothing to calibrate
        log.info("calibration: no nn.Linear has more than PASSTHROUGH_MAX_NUMEL=%d weights; no Hessians",
                 q.passthrough_max_numel)

    if not targets:
        batches = []
    elif q.calib_source == "self":
        bos = bos_id(cfg)
        seqs = cfg.train.micro_batch_seqs
        # generated in full BEFORE the hooks are attached, so sampling forwards add nothing to H
        batches = [
            generate(model, seqs, cfg.train.train_seq_len, bos, cfg.train.seed * 1000 + rank * 100 + b, device)
            for b in range(q.calib_batches)
        ]
    else:
        batches = train_batches(cfg, rank, world)

    outputs = {}
    head = head_input_module(model) if q.embed_gptq and cfg.model.tie_embeddings else None
    if head is not None and targets:
        outputs["tok_emb.weight"] = (head, cfg.model.model_dim)
    hooks = HessianHooks(targets, outputs, device)
    tokens = 0
    micro = max(1, cfg.train.micro_batch_seqs)
    try:
        with torch.no_grad():
            for x in batches:
                for i in range(0, x.shape[0], micro):
                    chunk = x[i : i + micro].to(device, non_blocking=True)
                    with _autocast(device):
                        model(chunk)
                    tokens += chunk.numel()
    finally:
        hooks.remove()
    hessians = hooks.finish()
    model.train(was_training)

    meta = {"source": q.calib_source, "tokens_per_rank": tokens, "world_size": world,
            "batches": q.calib_batches, "seq_len": cfg.train.train_seq_len}
    if rank == 0:
        atomic_torch_save(path, {"hessians": hessians, "meta": meta})
    else:
        path = None
    seconds = time.perf_counter() - t0
    log.info("calibration: %d Hessians over %d tokens/rank (%s) in %.2fs", len(hessians), tokens, q.calib_source, seconds)
    return CalibResult(seconds=seconds, tokens=tokens, n_hessians=len(hessians), source=q.calib_source, path=path)
