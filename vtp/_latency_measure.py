"""A plan's latency measured whole, against the dense model, where its latency table was
measured: what ``vtp.plan(latency_target=..., refine=N)`` checks the table's prediction by.

Both models are built from the structure alone with random weights (``vtp._latency``'s
``_timing_model`` / ``_materialize``: timing needs no trained ones), the pruned one by
``vtp.prune`` of the gated structure; they run on the table's device, in its dtype (autocast
as the table does), with its thread count, batch size and image size, timed by the table's
own ``_Timer`` (CUDA events on a GPU) in the table's interleaved rounds after warm-up.

The share is paired: each round times both models, and the share is the median over rounds
of (pruned time / dense time of the same round). A machine whose speed drifts within a run
(this 2-core CPU's dense time moves 456-561 ms in one run) moves both times of a round
together, so the drift cancels, where a ratio of two medians would keep it.
"""
from __future__ import annotations

import statistics
from contextlib import ExitStack, nullcontext
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from ._latency import DTYPES, _materialize, _run_interleaved, _Timer, _timing_model, check_device, device_name
from ._prune import DEFAULT_V_LAYOUT, prune, structure_copy
from .latency_model import LatencyTable
from .pruning_plan import PruningPlan

__all__ = ["table_device", "paired_share", "PlanTimer"]


def table_device(table: LatencyTable, model: nn.Module, prefer=None) -> torch.device:
    """The device ``table`` was measured on, as a device of this machine: its CPU, or the
    CUDA device of the same name (``prefer`` first, then the model's, then by index). A ``ValueError``
    naming ``table`` where this machine has no such device: a plan is measured where its
    table was, or not at all (``refine=0``)."""
    kind, name = table.key.get("device_type"), table.key.get("device")
    where = f"table: measured on {kind} ({name}); refine > 0 times the plan on that device"
    try:
        dev = check_device(kind if kind in ("cpu", "cuda") else str(kind))
    except ValueError as e:
        raise ValueError(f"{where}, but {str(e).partition(': ')[2]}; pass refine=0 to plan from the table "
                         "alone") from None
    if dev.type == "cuda":
        ref = next(iter(model.parameters()), None)
        first = [torch.device(d).index for d in (prefer, ref.device if ref is not None else None)
                 if d is not None and torch.device(d).type == "cuda" and torch.device(d).index is not None]
        for index in first + list(range(torch.cuda.device_count())):
            if torch.cuda.get_device_name(index) == name:
                return torch.device("cuda", index)
    elif device_name(dev) == name:
        return dev
    raise ValueError(f"{where}, and this machine's {dev.type} is {device_name(dev)!r}; measure the table here "
                     "or pass refine=0 to plan from the table alone")


def paired_share(pruned_ms: Sequence[float], dense_ms: Sequence[float]) -> Dict[str, float]:
    """Median and quartiles over rounds of pruned time / dense time of the same round."""
    if not pruned_ms or len(pruned_ms) != len(dense_ms):
        raise ValueError(f"paired_share: expected as many pruned as dense samples (>= 1), got "
                         f"{len(pruned_ms)} and {len(dense_ms)}")
    shares = [p / d for p, d in zip(pruned_ms, dense_ms)]
    q = statistics.quantiles(shares, n=4, method="inclusive") if len(shares) > 1 else [shares[0]] * 3
    return {"median": statistics.median(shares), "q1": q[0], "q3": q[2]}


class PlanTimer:
    """Times plans of ``model`` (gated) against its dense structure, as ``table`` was measured
    (device, dtype, threads, batch, image size). The random-weight models are built once."""

    def __init__(self, model: nn.Module, table: LatencyTable, img_size: Sequence[int], prefer=None):
        self.device = table_device(table, model, prefer)
        key = table.key
        self.dtype = DTYPES[key.get("dtype", "float32")]
        self.threads = int(key.get("threads") or torch.get_num_threads())
        batch = int(key["batch_size"])
        self.dense = _timing_model(model, self.device)
        self.gated = _materialize(structure_copy(model), self.device)  # the gated structure, random weights
        in_chans = self.dense.patch_embed.proj.in_channels
        self.images = torch.randn(batch, in_chans, *img_size, generator=torch.Generator().manual_seed(0)).to(self.device)

    def __call__(self, kept: Dict[str, List[int]], sizes: Dict[str, int], head_dim: int,
                 repeats: int) -> Dict[str, object]:
        """The plan ``kept`` measured: its paired share (median, q1, q3) and the raw ms samples
        of both models, ``repeats`` interleaved rounds after the warm-up round."""
        plan = PruningPlan(kept={k: list(v) for k, v in kept.items()}, sizes=dict(sizes), head_dim=head_dim)
        pruned = prune(self.gated, plan, fold=False, layout=DEFAULT_V_LAYOUT).eval()
        images = self.images
        probes = {"dense": lambda: self.dense(images), "pruned": lambda: pruned(images)}
        saved_threads = torch.get_num_threads()
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                                else nullcontext())
            torch.set_num_threads(self.threads)
            try:
                samples = _run_interleaved(probes, _Timer(self.device), repeats)
            finally:
                torch.set_num_threads(saved_threads)
        share = paired_share(samples["pruned"], samples["dense"])
        return {"share": share, "samples_ms": samples}

