"""Measuring a model: accuracy over a loader (all processes together), and inference
images/s of several models timed in turns, so that they are compared under one load."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum

__all__ = ["autocast", "evaluate", "measure_throughput", "throughput_spread"]


def autocast(device: torch.device, enabled: bool, dtype: str):
    """torch.autocast to `dtype` ("bfloat16" or "float16") on `device`, or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, amp: bool = False,
             amp_dtype: str = "bfloat16") -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole loader, summed over
    processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top1, top5, n
    for images, targets in loader:
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        with autocast(info.device, amp, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top.eq(targets[:, None])
        totals += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
            torch.tensor(float(len(targets)), dtype=torch.float64, device=info.device)])
    all_reduce_sum(totals, info)
    n = max(1.0, totals[3].item())
    return {"val_loss": totals[0].item() / n, "val_acc1": 100.0 * totals[1].item() / n,
            "val_acc5": 100.0 * totals[2].item() / n, "val_images": int(totals[3].item())}


@torch.inference_mode()
def measure_throughput(models: Dict[str, nn.Module], img_size: Tuple[int, int], batch_size: int,
                       repeats: int, device: torch.device, in_chans: int = 3, amp: bool = False,
                       amp_dtype: str = "bfloat16", warmup: int = 3) -> Dict[str, Dict[str, Any]]:
    """Inference images/s of each model in eval mode, on one random batch.

    The models take turns, batch after batch, so that a slow moment of the machine hits
    them alike; each figure is the median over ``repeats`` timed batches after ``warmup``
    untimed ones. Returns, per model, images/s, the batch size and every timing (s).
    """
    if repeats <= 0:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    # A private generator: measuring must not shift the caller's random stream.
    x = torch.randn(batch_size, in_chans, *img_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in models}
    with autocast(device, amp, amp_dtype):
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: {"images_per_s": batch_size / statistics.median(t), "batch_size": batch_size,
                   "seconds": t} for name, t in times.items()}


def throughput_spread(seconds: Sequence[float], batch_size: int) -> Dict[str, Any]:
    """Images/s of timed batches: the median, the quartiles (q1 from the slower quarter of
    the batches, q3 from the faster) and the extremes, and how many batches were timed."""
    ips = sorted(batch_size / t for t in seconds)
    if len(ips) == 1:
        q1 = q3 = ips[0]
    else:
        q1, _, q3 = statistics.quantiles(ips, n=4, method="inclusive")
    return {"images_per_s": statistics.median(ips), "q1": q1, "q3": q3, "min": ips[0],
            "max": ips[-1], "repeats": len(ips)}
