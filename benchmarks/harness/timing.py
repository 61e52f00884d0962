"""Timers, and the one loop every op and model measurement runs through.

A timer is ``fn -> [ms, ...]``: ``do_bench`` on a GPU (CUDA events, warm-up, L2 flushed),
the wall clock under --smoke. Variants are timed in interleaved rounds (every variant once
per round), so that a machine that changes speed half-way shows as a spread between the
rounds instead of as a difference between variants; every raw time is kept.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TIMER_DO_BENCH = "triton.testing.do_bench, L2 flushed"
TIMER_WALL_CLOCK = "perf_counter wall clock"
MODES = ("fwd", "fwd+bwd")

Timer = Callable[[Callable[[], object]], List[float]]


def do_bench_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
                grad_to_none: Optional[Sequence] = None) -> List[float]:
    """Every raw time (ms) of ``triton.testing.do_bench``: CUDA events, warm-up, L2 flushed
    between runs. The raw times are kept so that a record holds the spread, not only a median."""
    from triton.testing import do_bench
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all"))


def wall_clock_ms(fn: Callable[[], object], warmup: int, rep: int,
                  grad_to_none: Optional[Sequence] = None) -> List[float]:
    """``rep`` perf_counter times (ms) after ``warmup`` untimed calls: the --smoke timer.

    Compilation, autotuning and first-call costs stay in the warm-up. Like do_bench, the
    ``.grad`` of the tensors in ``grad_to_none`` is reset before every timed call.
    """
    for _ in range(warmup):
        fn()
    raw = []
    for _ in range(rep):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        raw.append((time.perf_counter() - start) * 1e3)
    return raw


def kernel_timer(cuda: bool, warmup: float, rep: float) -> Timer:
    """do_bench with ``warmup``/``rep`` in ms on a GPU; on a CPU the wall clock, with
    ``warmup`` untimed and ``rep`` timed calls."""
    if cuda:
        return lambda fn: do_bench_ms(fn, warmup, rep)
    return lambda fn: wall_clock_ms(fn, int(warmup), int(rep))


def step_times_ms(torch, step: Callable[[], object], warmup: int, iters: int, cuda: bool) -> List[float]:
    """One time (ms) per call of a whole training or inference step, after ``warmup`` calls.

    A step is long (many kernels, an optimizer update), so it is timed as a unit and not
    repeated under do_bench: CUDA events around every step on a GPU (no host sync between
    steps), perf_counter on a CPU.
    """
    for _ in range(warmup):
        step()
    if not cuda:
        raw = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            raw.append((time.perf_counter() - t0) * 1e3)
        return raw
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def quantiles_ms(times: Sequence[float]) -> Dict[str, float]:
    """p10, median, p90, min, max and count of raw times: the spread next to the median."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p10": pick(0.1), "p50": statistics.median(ordered), "p90": pick(0.9),
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def summarize(rounds_ms: List[List[float]]) -> Dict[str, object]:
    """Median of all raw times, each round's median and their relative difference (the
    spread benchmarks/decide.py holds a speed-up against), quantiles, every raw time."""
    pooled = [t for r in rounds_ms for t in r]
    median = statistics.median(pooled)
    round_medians = [statistics.median(r) for r in rounds_ms]
    return {"median_ms": median, "round_medians_ms": round_medians,
            "spread": (max(round_medians) - min(round_medians)) / median if median > 0 else 0.0,
            "quantiles_ms": quantiles_ms(pooled), "rounds_ms": rounds_ms}


def raw_ms(summary: Dict[str, object]) -> List[float]:
    """Every raw time of a summary, round after round."""
    return [t for r in summary["rounds_ms"] for t in r]


def interleaved(fns: Dict[str, Callable[[], object]], timer: Timer, rounds: int = 2,
                sync: Callable[[], None] = lambda: None) -> Dict[str, Dict[str, object]]:
    """Each fn called once (compile, autotune, allocate: outside the timings), then timed by
    ``timer`` in ``rounds`` interleaved rounds; a summary per fn."""
    raw: Dict[str, List[List[float]]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            raw[name].append(timer(fn))
    return {name: summarize(rounds_ms) for name, rounds_ms in raw.items()}


def step_rounds(torch, fn: Callable[[], object], warmup: int, iters: int, cuda: bool,
                rounds: int = 2) -> Dict[str, object]:
    """Whole-step times (CUDA events around every step): ``warmup`` untimed steps, then
    ``rounds`` rounds of ``iters``."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return summarize([step_times_ms(torch, fn, 0, iters, cuda) for _ in range(rounds)])


def forward(torch, fn: Callable, inputs: Sequence) -> Callable[[], object]:
    """``fn(*inputs)`` without autograd: what inference pays."""
    def run():
        with torch.no_grad():
            return fn(*inputs)
    return run


def forward_backward(torch, fn: Callable, inputs: Sequence, grad) -> Callable[[], object]:
    """``fn(*inputs)`` and the gradients of ``inputs`` (fresh tensors, never accumulated into
    ``.grad``); allow_unused: a floor ignores some inputs (nn.Linear has no gate)."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad, allow_unused=True)


def time_variants(torch, variants: Dict[str, Callable], inputs: Dict[str, Sequence], grads: Dict[str, object],
                  timer: Timer, *, modes: Sequence[str] = MODES, rounds: int = 2,
                  sync: Callable[[], None] = lambda: None
                  ) -> Tuple[Dict[str, Dict[str, Dict[str, object]]], List[Dict[str, str]]]:
    """Forward (no grad) and forward+backward of every variant, interleaved per mode.

    Returns ``({mode: {variant: summary}}, failures)``: a variant whose first call raises is
    recorded in ``failures`` ({mode, variant, error}) and left out; the others are timed.
    """
    timings, failures = {}, []
    for mode in modes:
        fns = {}
        for name, fn in variants.items():
            call = forward(torch, fn, inputs[name]) if mode == "fwd" else \
                forward_backward(torch, fn, inputs[name], grads[name])
            try:
                call()
                fns[name] = call
            except Exception as e:  # noqa: BLE001  (the record says what failed; the rest is timed)
                failures.append({"mode": mode, "variant": name, "error": f"{type(e).__name__}: {e}"[:500]})
        timings[mode] = interleaved(fns, timer, rounds, sync)
    return timings, failures


def time_case(torch, case: Dict[str, object], prepared: Dict[str, object], timer: Timer, *,
              modes: Sequence[str] = MODES, rounds: int = 2, sync: Callable[[], None] = lambda: None
              ) -> Tuple[List[Dict[str, object]], List[Dict[str, str]]]:
    """Time an op case's prepared variants (an op module's ``prepare``: variants, roles,
    inputs, grads, extra) in every mode. Returns one row per (mode, variant) that ran --
    op, case, mode, dtype, variant, role, the case's extra fields and the summary -- and the
    failures, each naming its op and case."""
    timings, failures = time_variants(torch, prepared["variants"], prepared["inputs"], prepared["grads"], timer,
                                      modes=modes, rounds=rounds, sync=sync)
    rows = [{"op": case["op"], "case": case["label"], "mode": mode, "dtype": case["dtype"], "variant": name,
             "role": prepared["roles"][name], **prepared["extra"], **summary}
            for mode, by_variant in timings.items() for name, summary in by_variant.items()]
    return rows, [{"op": case["op"], "case": case["label"], **f} for f in failures]
