"""Data-parallel helpers shared by every training loop.

One code path serves a single process and ``torchrun --nproc_per_node N``: when the
torchrun environment variables are present, a process group is started (NCCL on GPUs,
gloo on CPUs) and each rank takes its slice of every global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Start the process group when launched by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def rank_slice(n: int, info: DistInfo) -> slice:
    """This rank's contiguous share of ``n`` items (``n`` must divide evenly)."""
    if n % info.world_size:
        raise ValueError(f"global batch {n} is not divisible by the world size {info.world_size}")
    per = n // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


def all_agree(flag: bool) -> bool:
    """True on every rank when any rank says True (e.g. 'stop now'), so no rank hangs."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def load_resume_state(path, key: str) -> dict | None:
    """The resume state saved at ``path`` when it was written for settings ``key``, else None.
    Every rank reads the same file; ranks that disagree on resuming raise."""
    state = None
    if path is not None and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("key") != key:
            state = None
    if all_agree(state is None) and all_agree(state is not None):
        raise RuntimeError("ranks disagree on whether to resume; do all ranks see the same stage folder?")
    return state


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
