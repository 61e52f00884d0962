"""Processes and devices: one process per device under torchrun, collectives that are no-ops
in a single process, and the DDP wrapper the training loop uses."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import VTPError

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "all_reduce_sum",
           "broadcast_object", "gather_objects", "barrier", "wrap_ddp"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """One process per device. Under torchrun (WORLD_SIZE > 1) joins the process group
    from the environment; nccl on CUDA, gloo on CPU unless `backend` says otherwise."""
    if device == "cuda" and not torch.cuda.is_available():
        raise VTPError("--device cuda: no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise VTPError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of `obj` on every rank (e.g. a timestamped output directory)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def wrap_ddp(raw_model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel without a per-forward buffer broadcast: the buffers (kept-index
    tables of pruned layers) never change. Every parameter takes part in each forward (gates,
    constant branches included), so no search for unused ones."""
    ddp = nn.parallel.DistributedDataParallel
    kwargs: Dict[str, Any] = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
    # newer torch names the switch forward_sync_buffers and deprecates broadcast_buffers
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return ddp(raw_model, **kwargs)
