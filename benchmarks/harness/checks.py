"""Errors against a reference, and the bounds a kernel's error is held to."""
from __future__ import annotations

from typing import Callable, Dict, Sequence

# Relative error norms ||out - ref|| / ||ref|| against the fp64 reference on upcast inputs.
# bf16 keeps 8 bits (2**-9 ~ 2e-3 per rounding) and attention rounds P, V, dO and outputs
# to it; fp16 keeps 11; fp32 runs without TF32 (matmul precision "highest"), so only the
# order of fp32 sums differs from fp64.
BOUNDS = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 1e-4}


def rel_err(torch, got, want) -> float:
    """||got - want|| / ||want|| in fp64; inf when got holds a NaN or an infinity."""
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    denominator = want.norm().item()
    return (got - want).norm().item() / denominator if denominator > 0 else (got - want).norm().item()


def require_within(errors: Dict[str, float], bound: float, what: str, measure: str) -> None:
    """Exit before any timing when an error exceeds ``bound``: a fast wrong kernel is no result.

    ``not e <= bound`` also catches NaN.
    """
    bad = {name: e for name, e in errors.items() if not e <= bound}
    if bad:
        raise SystemExit(f"{what} disagrees with the reference ({measure} > {bound}): {bad}")


def against_fp64(torch, op: Callable, reference_op: Callable, leaves: Sequence, dy, names: Sequence[str],
                 repeatable: Sequence[str] = (), repeat: bool = False) -> Dict[str, object]:
    """``op`` forward and backward (every kernel buffer pre-filled with NaN) against
    ``reference_op`` in fp64 on upcast copies of ``leaves``: the relative error of the output
    and of each gradient (``names``: output first), and with ``repeat`` whether a second run
    gives bitwise the same ``repeatable`` gradients."""
    from vtp_kernels._utils import poison_outputs

    leaves = [t.detach().requires_grad_() for t in leaves]

    def run():
        with poison_outputs():
            y = op(*leaves)
            return [y, *torch.autograd.grad(y, leaves, dy)]

    got = run()
    exact = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = reference_op(*exact)
    want = [y_ref, *torch.autograd.grad(y_ref, exact, dy.double())]
    result: Dict[str, object] = {"errors": {n: rel_err(torch, g, r) for n, g, r in zip(names, got, want)}}
    if repeat:
        again = run()
        result["bitwise_repeatable"] = {n: bool(torch.equal(g, h)) for n, g, h in zip(names, got, again)
                                        if n in repeatable}
    return result


def judge(result: Dict[str, object], dtype_name: str) -> Dict[str, object]:
    """``result`` with its bound (BOUNDS of the dtype) and ok: every error within it, every
    repeatable gradient repeated."""
    bound = BOUNDS[dtype_name]
    result["bound"] = bound
    result["ok"] = all(e <= bound for e in result["errors"].values()) and \
        all(result.get("bitwise_repeatable", {}).values())
    return result
