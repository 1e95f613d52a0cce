"""torch.distributed set-up from ``torchrun``'s environment: one code path from 1 CPU process to many GPUs.

No home-made process management: launch with ``torchrun --nproc-per-node N clipmoe ...``; a plain
``clipmoe ...`` is world size 1 and needs no process group.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # device_id binds NCCL to this rank's GPU up front (barriers then never guess the device).
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=dev if dev.type == "cuda" else None
        )
    return DistEnv(rank, world, local_rank, dev)


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the process group at the end of a run. The barrier comes first: tearing gloo down while another
    rank is still finishing its last collective aborts that rank ("terminate called without an active
    exception")."""
    if env.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def on_main(fn: Callable[[], None], env: DistEnv) -> None:
    """Run ``fn`` on the main rank only (a write, a check before a write); if it raises, every rank raises the
    same error. A collective: call it on every rank; the others wait until the main rank is done, as at a
    barrier. Without it a failure on rank 0 (a model refused for its NaN, a full disk) would leave the other
    ranks waiting at their next collective until the timeout."""
    error = None
    if env.is_main:
        try:
            fn()
        except Exception as e:
            error = e
    if env.enabled:
        box = [_picklable(error) if env.is_main else None]
        dist.broadcast_object_list(box, src=0)
        error = error if env.is_main else box[0]
    if error is not None:
        raise error


def all_gather_objects(obj: object, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process. A collective."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _picklable(error: Exception | None) -> Exception | None:
    # An error that cannot cross the process boundary as itself goes as a ValueError with its message: the
    # other ranks must receive something, or they would wait in the broadcast forever.
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return ValueError(f"{type(error).__name__}: {error}")


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def full_state_dict(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """For saving a model that ``parallel="fsdp"`` training left sharded: its whole state dict on the main
    rank (CPU), ``None`` elsewhere, and ``None`` everywhere for a model that is not sharded (save it as is).

    A collective when sharded: every rank must call it. FSDP2 cannot be undone, so after training save with
    ``model.save_pretrained(path, state_dict=full_state_dict(model, env))`` on the main rank and load the
    folder again for further use.
    """
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    if not any(isinstance(t, DTensor) for t in state.values()):
        return None
    full = {}
    for name, t in state.items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if env.is_main:  # other ranks drop each gathered tensor at once
            full[name] = t.detach().cpu()
    return full if env.is_main else None
