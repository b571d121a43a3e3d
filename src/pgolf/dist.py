"""Process-group plumbing shared by train, quantize and evaluate.

`distributed_context()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (through `pgolf.config`,
the one env reader), picks the device (cuda:LOCAL_RANK when CUDA is there, else CPU) and, when
WORLD_SIZE > 1, initializes the default process group once (NCCL on CUDA, gloo on CPU). The group
is left initialized for the stages that follow; `shutdown()` tears it down at the very end.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from pgolf.config import env_flag
from pgolf.errors import ConfigError


class DistContext(NamedTuple):
    """Unpacks as `rank, world_size, local_rank, device = distributed_context()`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = env_flag(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; launch with torchrun or unset it") from None


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """DEVICE=auto -> cuda:LOCAL_RANK if CUDA is available, else cpu; 'cuda' without CUDA fails."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(preference)
    if device.type == "cpu":
        # Zero-initialised projections produce subnormal floats, which x86 CPUs process ~10x slower
        # (measured: tiny preset 14.4 -> 1.6 s/step). GPUs run them at full speed; no result here depends on values below 1e-38.
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE={preference} but CUDA is not available; set DEVICE=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def distributed_context(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """(rank, world_size, local_rank, device); initializes the process group when WORLD_SIZE > 1."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher")
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": _dt.timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum|max|min) when distributed; a no-op otherwise."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_run_id(cfg: Any) -> str:
    """RUN_ID when set, else a fresh `<preset>-s<seed>-<stamp>-<hex>` chosen by rank 0 for every rank.

    Initializes the process group first (under torchrun), so every rank gets the same folder.
    """
    from pgolf.runid import make_run_id

    distributed_context(cfg.train.device)
    return agree(make_run_id(cfg))
