"""Benchmark attention with per-head value widths (vtp_kernels.packed_attention).

Shapes: the attention of DeiT-S (6 heads) and DeiT-B (12 heads), head dim 64, at batch 256
and 197 tokens, bf16, after a VTP prune of the ``attn_out`` gate: per-head value widths
drawn from one global threshold over random gate scores (default 40 % removed, at least
one head dropped). Dropped heads are removed from q and k as well, as ``vtp.prune`` does;
q, k and v are strided views of one pruned qkv output ``[B, N, 2*H*D + sum(widths)]``.
Variants, forward and forward+backward (gradients of q, k and v):

    triton       the packed-V flash kernel (what the "triton" backend runs)
    reference    pad V to a uniform width, F.scaled_dot_product_attention, gather back
    compiled     torch.compile(reference)
    sdpa_padded  what a pruned model could run instead: values zero-padded to the head dim
                 at prune time, plain SDPA over the kept heads (on a GPU also under each
                 SDPA backend, sdpa_padded:<backend>)
    dense        F.scaled_dot_product_attention on the unpruned shape (all heads at
                 width 64): what the unpruned model pays

With ``--qk-widths`` the run adds pruned query/key widths (``attn_qk``, issue 17): q and k
Dqk wide under the same pruned values, with the variants (QK_VARIANTS) triton, reference
(q/k padded with zero columns to the value width, then SDPA), sdpa_unequal (SDPA on the
unequal widths as they are: whichever kernel torch picks), and triton_gated /
reference_gated (the attn_qk gate inside the kernel, against ``q * gate`` before SDPA,
the gate's gradient included); gradients are taken of the qkv output they are views of.
It records which SDPA kernels take unequal widths (``qk.sdpa_backends``: each forced with
``sdpa_kernel``, "runs" or its error).

The kernel output and gradients are checked against the fp64 reference before anything is
timed. Timings are triton.testing.do_bench (L2 flushed between runs); every raw timing is
kept. Writes a table to stdout and packed_attention_<device>.json / .png into --out.

gpu_check.py runs the same cases, checks and timed run (``config_cases``,
``correctness_cases``, ``production_cases``, ``correctness``, ``run``; for Dqk != V widths
``qk_cases``, ``qk_correctness``, ``qk_run``, ``sdpa_backends_for_unequal_widths``).

    python benchmarks/bench_packed_attention.py                        # on a GPU
    python benchmarks/bench_packed_attention.py --smoke --out /tmp/pa  # CPU, interpreter
    python benchmarks/bench_packed_attention.py --qk-widths 16 32 48   # also Dqk != V widths
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import arguments, checks, environment, records, timing  # noqa: E402

OP = "packed_attention"
MODELS = {"deit_s": 6, "deit_b": 12}            # heads; both have head dim 64
VARIANTS = {"triton": "candidate", "reference": "alternative", "compiled": "alternative",
            "sdpa_padded": "alternative", "dense": "unpruned"}
SCRIPT_VARIANTS = ("triton", "reference", "compiled", "dense")
REFERENCE = "reference"
# 40 % pruned DeiT-B, kept value widths per kept head (one of 12 heads dropped), per round_to.
DEIT_B_WIDTHS = {1: (61, 47, 55, 37, 64, 21, 30, 44, 53, 13, 38), 8: (64, 48, 56, 40, 64, 24, 32, 48, 56, 16, 40)}


# ---------------------------------------------------------------------------------------
# Cases: data
# ---------------------------------------------------------------------------------------
def case(label: str, dtype: str, **params) -> Dict[str, object]:
    """One case: batch B, tokens N, head dim D, the kept heads' value ``widths``; optional
    ``heads`` (before pruning, for the dense variant; default: the kept heads), ``round_to``,
    ``q_layout="heads_innermost"`` (q stored [B, N, D, H], head stride 1) and ``repeat``."""
    return {"op": OP, "label": label, "dtype": dtype, "params": params}


def _label(b, n, d, widths) -> str:
    return f"B={b} N={n} D={d} widths={list(widths)}"


def config_cases(smoke: bool) -> List[Dict[str, object]]:
    """A small ragged case with the production constexprs (D = 64, a 64-wide head, odd
    widths, an empty head), run under each autotune config in turn."""
    if smoke:
        return [case(_label(1, 13, 16, (5, 0, 8)), "fp32", B=1, N=13, D=16, widths=(5, 0, 8))]
    return [case(_label(2, 77, 64, (40, 0, 24, 64, 7)), "bf16", B=2, N=77, D=64, widths=(40, 0, 24, 64, 7))]


def correctness_cases(smoke: bool, dtype: str, images: int) -> List[Dict[str, object]]:
    """Both DeiT-B plans at ``images`` images (fp32: one; its dots lower to FMA code that
    compiles slowly), ragged small shapes (--smoke: one, and none in fp16), and in the first
    dtype q stored with head stride 1."""
    shapes = [(1, 13, 16, (5, 16, 8))] if smoke else [(images, 197, 64, DEIT_B_WIDTHS[r]) for r in (1, 8)]
    out = [case(_label(b, n, d, w), dtype, B=b, N=n, D=d, widths=w, repeat=True)
           for b, n, d, w in (shapes[:1] if dtype == "fp32" else shapes)]
    if not (smoke and dtype == "fp16"):
        ragged = ((3, 29, 16, (1, 16, 7, 8)),) if smoke else ((2, 77, 64, (40, 0, 24, 64, 7)), (3, 29, 16, (1, 16, 7, 8)))
        out += [case(_label(b, n, d, w), dtype, B=b, N=n, D=d, widths=w) for b, n, d, w in ragged]
    if dtype == ("fp32" if smoke else "bf16"):
        out.append(case("q stored [B, N, D, H] (head stride 1), widths (8,)*8", dtype, B=1, N=13, D=16,
                        widths=(8,) * 8, q_layout="heads_innermost"))
    return out


def production_cases(smoke: bool) -> List[Dict[str, object]]:
    """The pruned DeiT-B's attention at batch 256, bf16 q/k/v views of the pruned qkv
    output, both plans (--smoke: a small one, round_to=8, fp32)."""
    if smoke:
        return [case("B=2 N=13 H=3 D=16 (round_to=8)", "fp32", B=2, N=13, D=16, widths=(8, 16, 8), round_to=8)]
    return [case(f"B=256 N=197 H={len(w)} D=64 (round_to={r})", "bf16", B=256, N=197, D=64, widths=w, heads=12,
                 round_to=r) for r, w in DEIT_B_WIDTHS.items()]


# ---------------------------------------------------------------------------------------
# Inputs, check and timed run
# ---------------------------------------------------------------------------------------
def split_qkv(qkv, heads: int, dqk: int):
    """q, k ``[B, H, N, Dqk]`` and the packed v ``[B, N, rest]`` as views of qkv ``[B, N, 2*H*Dqk + rest]``."""
    B, N, _ = qkv.shape
    q = qkv[..., :heads * dqk].view(B, N, heads, dqk).transpose(1, 2)
    k = qkv[..., heads * dqk:2 * heads * dqk].view(B, N, heads, dqk).transpose(1, 2)
    return q, k, qkv[..., 2 * heads * dqk:]


def inputs(torch, device, dtype, p, empty=False):
    """q, k, v as views of one qkv projection output [B, N, 2*H*Dqk + sum(widths)] (the
    pruned attention's layout; Dqk is ``dqk``, by default D), and dout;
    ``q_layout="heads_innermost"`` stores q as [B, N, Dqk, H] instead, so its head stride
    is 1. ``empty``: uninitialised tensors."""
    new = torch.empty if empty else torch.randn
    B, N, widths = p["B"], p["N"], p["widths"]
    H, dqk = len(widths), p.get("dqk", p["D"])
    q, k, v = split_qkv(new(B, N, 2 * H * dqk + sum(widths), device=device).to(dtype), H, dqk)
    if p.get("q_layout") == "heads_innermost":
        q = new(B, N, dqk, H, device=device).to(dtype).permute(0, 3, 1, 2)
    return q, k, v, new(B, N, sum(widths), device=device).to(dtype)


def correctness(torch, device, c: Dict[str, object]) -> Dict[str, object]:
    """The Triton op against the fp64 reference (harness.checks.against_fp64); judged."""
    from vtp_kernels import reference
    from vtp_kernels._packed_attention import packed_attention_triton

    widths = tuple(c["params"]["widths"])
    q, k, v, dout = inputs(torch, device, environment.dtype_of(torch, c["dtype"]), c["params"])
    result = checks.against_fp64(torch, lambda q, k, v: packed_attention_triton(q, k, v, widths),
                                 lambda q, k, v: reference.packed_attention(q, k, v, widths), (q, k, v), dout,
                                 ("out", "dq", "dk", "dv"), repeatable=("dq", "dk", "dv"),
                                 repeat=bool(c["params"].get("repeat")))
    return checks.judge(result, c["dtype"])


def sdpa_backends():
    """The SDPA backends a GPU run forces one at a time (torch.nn.attention.SDPBackend)."""
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def prepare(torch, device, c: Dict[str, object], compile_backend: str,
            names: Sequence[str] = tuple(VARIANTS)) -> Dict[str, object]:
    """The variants ``names`` of case ``c`` on fresh inputs: {variants, roles, inputs, grads,
    extra, leaves}; on a GPU "sdpa_padded" brings one more variant per SDPA backend."""
    import torch.nn.functional as F

    from vtp_kernels import reference
    from vtp_kernels._packed_attention import packed_attention_triton

    p, dtype = c["params"], environment.dtype_of(torch, c["dtype"])
    widths, B, N, D = tuple(p["widths"]), p["B"], p["N"], p["D"]
    H, heads = len(widths), p.get("heads", len(widths))
    q, k, v, dout = inputs(torch, device, dtype, p)
    leaves = tuple(t.requires_grad_() for t in (q, k, v))
    # Values zero-padded to the head dim at prune time: plain SDPA over the kept heads.
    padded = tuple(t.requires_grad_() for t in torch.randn(B, N, 3, H, D, device=device).to(dtype)
                   .permute(2, 0, 3, 1, 4).unbind(0))
    dense = tuple(t.requires_grad_() for t in torch.randn(B, N, 3, heads, D, device=device).to(dtype)
                  .permute(2, 0, 3, 1, 4).unbind(0))
    compiled = torch.compile(lambda q, k, v: reference.packed_attention(q, k, v, widths),
                             backend=compile_backend, dynamic=False)
    every: Dict[str, Callable] = {
        "triton": lambda q, k, v: packed_attention_triton(q, k, v, widths),
        "reference": lambda q, k, v: reference.packed_attention(q, k, v, widths),
        "compiled": compiled, "sdpa_padded": F.scaled_dot_product_attention,
        "dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, heads * D)}
    variants = {n: every[n] for n in names}
    if "sdpa_padded" in names and device.type == "cuda":
        from torch.nn.attention import sdpa_kernel
        for name, backend in sdpa_backends().items():
            def forced(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            variants[f"sdpa_padded:{name}"] = forced
    roles = {n: VARIANTS[n.split(":")[0]] for n in variants}
    operands = {n: padded if n.startswith("sdpa") else dense if n == "dense" else leaves for n in variants}
    grads = {n: torch.randn(B, H, N, D, device=device).to(dtype) if n.startswith("sdpa")
             else torch.randn(B, N, heads * D, device=device).to(dtype) if n == "dense" else dout for n in variants}
    extra = {"B": B, "N": N, "H": H, "D": D, "widths": list(widths), "round_to": p.get("round_to"),
             "qkv_row_stride": q.stride(2)}
    return {"variants": variants, "roles": roles, "inputs": operands, "grads": grads, "extra": extra,
            "leaves": leaves}


def run(torch, device, c: Dict[str, object], timer: timing.Timer, *, compile_backend: str,
        names: Sequence[str] = tuple(VARIANTS), modes: Sequence[str] = timing.MODES, rounds: int = 2,
        sync=lambda: None):
    """Case ``c`` timed: rows (op, case, mode, dtype, variant, role, B, N, H, D, widths,
    round_to, qkv_row_stride, summary) and the variants that failed."""
    return timing.time_case(torch, c, prepare(torch, device, c, compile_backend, names), timer, modes=modes,
                            rounds=rounds, sync=sync)


def kernel_names(torch, fn: Callable[[], object], cuda: bool) -> List[str]:
    """The CUDA kernels one call of ``fn`` runs (which tells the SDPA backend apart)."""
    if not cuda:
        return []
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sorted({e.key for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0})
    except Exception as e:  # noqa: BLE001
        return [f"profiler failed: {type(e).__name__}: {e}"]


def sdpa_backend_of(names: Sequence[str]) -> str:
    """Which SDPA backend the kernel names belong to."""
    if not names:
        return "not measured (no GPU)"
    text = " ".join(names).lower()
    for backend, marks in (("cudnn", ("cudnn",)), ("flash", ("flash",)), ("efficient", ("fmha", "efficient", "mem_eff"))):
        if any(m in text for m in marks):
            return backend
    return "math"


def sdpa_backend_ran(torch, prepared: Dict[str, object], cuda: bool,
                     names: Sequence[str] = ("reference", "sdpa_padded")) -> Dict[str, str]:
    """The SDPA backend the default dispatch picks in each of the prepared variants ``names``
    (forward, on the variant's own inputs)."""
    return {name: sdpa_backend_of(kernel_names(torch, timing.forward(torch, prepared["variants"][name],
                                                                     prepared["inputs"][name]), cuda))
            for name in names}


def pruned_widths(torch, heads: int, head_dim: int, prune: float, dropped: int, round_to: int,
                  generator) -> List[int]:
    """Per-head kept value widths after one global threshold over random gate scores.

    Gate scores after sparse training differ more between heads than within one, so each
    head gets a log-normal scale times |N(0, 1)| per dim; ``dropped`` heads get scale 0
    (their dims fall first). The threshold removes ``round(prune * heads * head_dim)`` dims.
    """
    scale = torch.randn(heads, 1, generator=generator).exp()
    scale[torch.randperm(heads, generator=generator)[:dropped]] = 0.0
    scores = scale * torch.randn(heads, head_dim, generator=generator).abs()
    removed = min(round(prune * heads * head_dim), heads * head_dim)
    keep = torch.ones(heads * head_dim, dtype=torch.bool)
    keep[scores.flatten().argsort()[:removed]] = False
    widths = keep.view(heads, head_dim).sum(1).tolist()
    return [min(head_dim, -(-w // round_to) * round_to) for w in widths]


# ---------------------------------------------------------------------------------------
# Pruned query/key widths (attn_qk): Dqk != value widths
# ---------------------------------------------------------------------------------------
QK_VARIANTS = {"triton": "candidate", "reference": "alternative", "sdpa_unequal": "alternative",
               "triton_gated": "candidate", "reference_gated": "alternative"}
QK_GATED = ("triton_gated", "reference_gated")
QK_CHECKED = (("triton", "reference"), ("triton_gated", "reference_gated"))  # (kernel, its reference)
GPU_QK_WIDTHS = (16, 32)  # gpu_check's Dqk of DeiT's 64: a quarter and a half of the q/k dims kept


def qk_case(model: str, dtype: str, dqk: int, **params) -> Dict[str, object]:
    """A case of q/k ``dqk`` wide under pruned values: B, N, D (the unpruned head width:
    the softmax scale stays D ** -0.5, as pruning leaves it) and the kept heads' ``widths``."""
    return case(f"{model}/dqk{dqk}", dtype, dqk=dqk, **params)


def qk_cases(smoke: bool) -> List[Dict[str, object]]:
    """gpu_check's: the 40 % pruned DeiT-B (round_to=8) at batch 256, bf16, q/k kept at each
    GPU_QK_WIDTHS (--smoke: one small fp32 case, values wider and narrower than Dqk)."""
    if smoke:
        return [qk_case("smoke", "fp32", 8, B=2, N=13, D=16, widths=(8, 16, 5), round_to=1)]
    return [qk_case("deit_b", "bf16", dqk, B=256, N=197, D=64, widths=DEIT_B_WIDTHS[8], heads=12, round_to=8)
            for dqk in GPU_QK_WIDTHS]


def qk_variants(torch, p: Dict[str, object]) -> Dict[str, Callable]:
    """Every QK_VARIANTS entry as a function of qkv ``[B, N, 2*H*Dqk + sum(widths)]`` (and
    the gate ``[H, Dqk]`` for the gated ones), returning the packed ``[B, N, sum(widths)]``."""
    import torch.nn.functional as F

    from vtp_kernels import reference
    from vtp_kernels._packed_attention import packed_attention_triton

    widths, dqk, scale = tuple(p["widths"]), p["dqk"], p["D"] ** -0.5
    H, width = len(widths), max(widths)

    def sdpa_unequal(qkv):  # V padded to its widest head, q/k left Dqk wide: torch picks the kernel
        q, k, v = split_qkv(qkv, H, dqk)
        B, N, _ = v.shape
        cols = reference.padded_value_columns(widths, width, v.device)
        v = v.new_zeros(B, N, H * width).index_copy(-1, cols, v).view(B, N, H, width).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, H * width)
        return out.index_select(-1, cols)

    return {
        "triton": lambda qkv: packed_attention_triton(*split_qkv(qkv, H, dqk), widths, scale),
        "reference": lambda qkv: reference.packed_attention(*split_qkv(qkv, H, dqk), widths, scale),
        "sdpa_unequal": sdpa_unequal,
        "triton_gated": lambda qkv, gate: packed_attention_triton(*split_qkv(qkv, H, dqk), widths, scale, gate),
        "reference_gated": lambda qkv, gate: reference.packed_attention(*split_qkv(qkv, H, dqk), widths, scale,
                                                                        qk_gate=gate)}


def qk_inputs(torch, device, dtype, p):
    """qkv ``[B, N, 2*H*Dqk + sum(widths)]``, an fp32 gate ``[H, Dqk]`` in [0.5, 1.5) (a
    trained gate, away from 0) and dout ``[B, N, sum(widths)]``."""
    B, N, widths, dqk = p["B"], p["N"], p["widths"], p["dqk"]
    qkv = torch.randn(B, N, 2 * len(widths) * dqk + sum(widths), device=device).to(dtype)
    gate = torch.rand(len(widths), dqk, device=device) + 0.5
    return qkv, gate, torch.randn(B, N, sum(widths), device=device).to(dtype)


def qk_correctness(torch, device, c: Dict[str, object]) -> Dict[str, object]:
    """The kernel with and without the gate against its fp64 reference (harness.checks):
    errors ``<kernel>/out``, ``<kernel>/dqkv`` and ``triton_gated/dgate``; judged."""
    fns = qk_variants(torch, c["params"])
    qkv, gate, dout = qk_inputs(torch, device, environment.dtype_of(torch, c["dtype"]), c["params"])
    errors = {}
    for kernel, ref in QK_CHECKED:
        leaves = (qkv, gate) if kernel in QK_GATED else (qkv,)
        result = checks.against_fp64(torch, fns[kernel], fns[ref], leaves, dout, ("out", "dqkv", "dgate")[:1 + len(leaves)])
        errors.update({f"{kernel}/{name}": e for name, e in result["errors"].items()})
    return checks.judge({"errors": errors}, c["dtype"])


def qk_prepare(torch, device, c: Dict[str, object]) -> Dict[str, object]:
    """The QK_VARIANTS of case ``c`` on fresh inputs, for timing.time_case (gradients of qkv,
    and of the gate in the gated variants)."""
    p = c["params"]
    qkv, gate, dout = qk_inputs(torch, device, environment.dtype_of(torch, c["dtype"]), p)
    qkv, gate = qkv.requires_grad_(), gate.requires_grad_()
    extra = {"B": p["B"], "N": p["N"], "H": len(p["widths"]), "D": p["D"], "dqk": p["dqk"],
             "widths": list(p["widths"]), "round_to": p.get("round_to")}
    return {"variants": qk_variants(torch, p), "roles": dict(QK_VARIANTS), "extra": extra,
            "inputs": {n: (qkv, gate) if n in QK_GATED else (qkv,) for n in QK_VARIANTS},
            "grads": {n: dout for n in QK_VARIANTS}}


def qk_run(torch, device, c: Dict[str, object], timer: timing.Timer, *, modes: Sequence[str] = timing.MODES,
           rounds: int = 2, sync=lambda: None):
    """Case ``c``'s QK_VARIANTS timed: rows (as ``run``'s, with dqk) and the variants that failed;
    and which SDPA backend the reference and sdpa_unequal ran."""
    prepared = qk_prepare(torch, device, c)
    ran = sdpa_backend_ran(torch, prepared, device.type == "cuda", ("reference", "sdpa_unequal"))
    rows, failures = timing.time_case(torch, c, prepared, timer, modes=modes, rounds=rounds, sync=sync)
    return rows, failures, ran


def sdpa_backends_for_unequal_widths(torch, device, dtype, dqk: int, dv: int) -> Dict[str, str]:
    """Each SDPA kernel forced in turn on q/k ``dqk`` wide and v ``dv`` wide: "runs", or the
    first line of its error."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(2, 2, 16, dqk, device=device, dtype=dtype)
    v = torch.randn(2, 2, 16, dv, device=device, dtype=dtype)
    verdicts = {}
    for backend in sdpa_backends().values():
        try:  # torch warns of each refusal as well: the verdict says it
            with sdpa_kernel([backend]), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, q, v)
            verdicts[backend.name] = "runs"
        except RuntimeError as e:
            verdicts[backend.name] = str(e).strip().splitlines()[0]
    return verdicts


def run_qk_widths(torch, args, device, model_widths: Dict[str, Tuple[int, ...]], timer: timing.Timer
                  ) -> Dict[str, object]:
    """For each model (its pruned value widths ``model_widths``) and each Dqk in --qk-widths:
    the kernel checked (qk_correctness), then every QK variant timed, one round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    dtype = environment.dtype_of(torch, args.dtype)
    record = {"qk_widths": list(args.qk_widths), "bound": checks.BOUNDS[args.dtype], "cases": {}, "results": [],
              "sdpa_backend_ran": {},
              "sdpa_backends": {f"dqk{w}_dv{args.head_dim}": sdpa_backends_for_unequal_widths(
                  torch, device, dtype, w, args.head_dim) for w in args.qk_widths if w != args.head_dim}}
    for name, widths in model_widths.items():
        for dqk in args.qk_widths:
            c = qk_case(name, args.dtype, dqk, B=args.batch, N=args.tokens, D=args.head_dim, widths=widths,
                        round_to=args.round_to)
            check = qk_correctness(torch, device, c)
            checks.require_within(check["errors"], check["bound"], f"{c['label']}: triton packed_attention",
                                  "error norm / fp64 reference norm")
            rows, failures, record["sdpa_backend_ran"][c["label"]] = qk_run(torch, device, c, timer, rounds=1,
                                                                            sync=sync)
            if failures:
                raise SystemExit(f"bench_packed_attention --qk-widths: variants failed: {failures}")
            record["results"] += [{"model": name, "dqk": dqk, "variant": r["variant"], "mode": r["mode"],
                                   "median_ms": r["median_ms"], "raw_ms": timing.raw_ms(r)} for r in rows]
            record["cases"][c["label"]] = {"heads": MODELS[name], "kept_heads": len(widths), "dqk": dqk,
                                           "v_widths": list(widths), "rel_err": check["errors"]}
    record["medians_ms"] = {f"{r['model']}/dqk{r['dqk']}/{r['mode']}/{r['variant']}": r["median_ms"]
                            for r in record["results"]}
    return record


def print_qk(qk: Dict[str, object]) -> None:
    for shapes, verdicts in qk["sdpa_backends"].items():
        print(f"  SDPA on {shapes}: " + "; ".join(f"{b} {v}" for b, v in verdicts.items()))
    print(f"{'model/Dqk':<16}{'mode':<9}" + "".join(f"{v:>16}" for v in QK_VARIANTS) + "   (median ms)")
    for key in qk["cases"]:
        for mode in timing.MODES:
            print(f"{key:<16}{mode:<9}" + "".join(f"{qk['medians_ms'][f'{key}/{mode}/{v}']:>16.4f}"
                                                  for v in QK_VARIANTS))


# ---------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = arguments.parser(__doc__, argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["deit_s", "deit_b"],
                   help="attention shapes to run: deit_s (6 heads) and/or deit_b (12 heads), head dim 64")
    p.add_argument("--batch", type=int, default=256, help="images per batch B")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image N (196 patches + class token)")
    p.add_argument("--head-dim", type=int, default=64, help="q/k head dim D, and the unpruned value width per head")
    p.add_argument("--prune", type=float, default=0.4,
                   help="share of all value dims (heads x head dim) removed by the global threshold")
    p.add_argument("--dropped-heads", type=int, default=1,
                   help="heads whose gate scores are forced below the threshold (whole heads removed)")
    p.add_argument("--round-to", type=int, default=1,
                   help="round every kept width up to a multiple of this (8 keeps tensor cores fed); 1 = off")
    p.add_argument("--dtype", choices=sorted(environment.DTYPES), default="bf16", help="dtype of q, k, v")
    p.add_argument("--variants", default=",".join(SCRIPT_VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    arguments.add_do_bench_flags(p)
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the 'compiled' variant (default: inductor; aot_eager with --smoke)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the width pattern and the inputs")
    p.add_argument("--qk-widths", type=int, nargs="*", default=[],
                   help="also time q/k pruned to each of these widths (Dqk, of DeiT's head dim 64) under the pruned "
                        "values (--smoke: scaled from 64 to 16)")
    arguments.add_output_flags(p, smoke_help="CPU check of the script itself: tiny shapes (B=1, N=13, D=16), fp32, "
                                             "few iterations, Triton under TRITON_INTERPRET=1, wall-clock timing; its "
                                             "numbers are not kernel speeds")
    args = p.parse_args(argv)
    args.variants = arguments.subset(args.variants, VARIANTS, "--variants")
    if args.smoke:
        args.batch, args.tokens, args.head_dim, args.dtype = 1, 13, 16, "fp32"
        args.warmup, args.rep = min(args.warmup, 1), min(args.rep, 3)
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    if any(w < 0 or w > 64 for w in args.qk_widths):
        p.error(f"--qk-widths: expected widths in [0, 64] (of DeiT's head dim 64), got {args.qk_widths}")
    if args.smoke:
        args.qk_widths = sorted({w * args.head_dim // 64 for w in args.qk_widths})
    return args


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    torch, device = environment.setup(args.smoke, args.seed)  # before vtp_kernels is imported
    cuda = device.type == "cuda"
    generator = torch.Generator().manual_seed(args.seed)
    timer = timing.kernel_timer(cuda, args.warmup, args.rep)

    models, results, kept_widths = {}, [], {}
    for name in args.models:
        heads, D = MODELS[name], args.head_dim
        widths_all = pruned_widths(torch, heads, D, args.prune, args.dropped_heads, args.round_to, generator)
        widths = tuple(w for w in widths_all if w > 0)         # dropped heads leave q and k too
        kept_widths[name] = widths
        c = case(name, args.dtype, B=args.batch, N=args.tokens, D=D, widths=widths, heads=heads,
                 round_to=args.round_to)
        check = correctness(torch, device, c)
        checks.require_within(check["errors"], check["bound"], f"{name}: triton packed_attention",
                              "error norm / fp64 reference norm")
        rows, failures = run(torch, device, c, timer, compile_backend=args.compile_backend, names=args.variants,
                             rounds=1, sync=torch.cuda.synchronize if cuda else lambda: None)
        if failures:
            raise SystemExit(f"bench_packed_attention: variants failed: {failures}")
        results += [{"model": name, "variant": r["variant"], "mode": r["mode"], "median_ms": r["median_ms"],
                     "raw_ms": timing.raw_ms(r)} for r in rows]
        shape = {"heads": heads, "kept_heads": len(widths), "head_dim": D, "batch": args.batch, "tokens": args.tokens,
                 "v_widths": widths_all, "v_total": sum(widths), "kept_share": sum(widths) / (heads * D)}
        models[name] = {"shape": shape, "rel_err": check["errors"], "bound": check["bound"]}

    qk = run_qk_widths(torch, args, device, kept_widths, timer) if args.qk_widths else None
    record = {
        **records.record_head("packed_attention", __file__, argv, smoke=args.smoke,
                              device=environment.device_name(torch, device),
                              packages=("python", "torch", "triton", "cuda")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "config": {"models": args.models, "batch": args.batch, "tokens": args.tokens, "head_dim": args.head_dim,
                   "prune": args.prune, "dropped_heads": args.dropped_heads, "round_to": args.round_to,
                   "dtype": args.dtype, "variants": args.variants, "qk_widths": args.qk_widths,
                   "warmup": args.warmup, "rep": args.rep,
                   "compile_backend": args.compile_backend, "seed": args.seed,
                   "timer": timing.TIMER_WALL_CLOCK if args.smoke else timing.TIMER_DO_BENCH},
        "models": models,
        "correctness": {name: {"rel_err": m["rel_err"], "bound": m["bound"]} for name, m in models.items()},
        "results": results,
        "medians_ms": {f"{r['model']}/{r['mode']}/{r['variant']}": r["median_ms"] for r in results},
        **({"qk": qk} if qk is not None else {}),
    }

    print(f"packed_attention  B={args.batch} N={args.tokens} D={args.head_dim} {args.dtype}  on {record['device']}"
          + records.smoke_suffix(args.smoke, "  [smoke: interpreter, not kernel speeds]"))
    for name, m in models.items():
        s = m["shape"]
        print(f"  {name}: widths {s['v_widths']} (kept {s['v_total']}/{s['heads'] * s['head_dim']}, "
              f"{s['kept_heads']}/{s['heads']} heads); rel err " + ", ".join(f"{k} {e:.2e}" for k, e in m["rel_err"].items()))
    print(f"{'model':<8}{'mode':<9}{'variant':<20}{'median ms':>11}{'vs reference':>14}{'vs dense':>10}")
    for r in results:
        key = f"{r['model']}/{r['mode']}/"
        ref, dense = record["medians_ms"].get(key + "reference"), record["medians_ms"].get(key + "dense")
        print(f"{r['model']:<8}{r['mode']:<9}{r['variant']:<20}{r['median_ms']:>11.4f}"
              + (f"{ref / r['median_ms']:>13.2f}x" if ref else f"{'-':>14}")
              + (f"{dense / r['median_ms']:>9.2f}x" if dense else f"{'-':>10}"))
    if qk is not None:
        print_qk(qk)

    stem = records.output_stem(args.out, "packed_attention", args.smoke, record["device"])
    records.save_record(record, stem, None if args.no_plot else plot)
    return record


def plot(record: Dict[str, object], path: str) -> None:
    plt = records.pyplot()
    models: Sequence[str] = record["config"]["models"]
    variants = list(dict.fromkeys(r["variant"] for r in record["results"]))
    modes = ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 3.4 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        for ax, mode in zip(axes[row], modes):
            records.bar_panel(ax, variants, [record["medians_ms"][f"{name}/{mode}/{v}"] for v in variants])
            ax.set_title(f"{name} {mode}", fontsize=9)
    c = record["config"]
    fig.suptitle(f"packed_attention B={c['batch']} N={c['tokens']} D={c['head_dim']} prune={c['prune']} "
                 f"{c['dtype']} on {record['device']}" + records.smoke_suffix(record["smoke"]), fontsize=9)
    records.save_figure(fig, path)


if __name__ == "__main__":
    main()
