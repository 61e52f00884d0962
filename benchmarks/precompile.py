"""Compiling every Triton launch of gpu_check.py ahead, in parallel worker processes.

Triton compiles one kernel at a time and holds the GIL while it does, and the steps need a
few hundred distinct compiles (three dtypes, every config, every pruned shape). Worker
processes compile the same launches with a compile-only driver (CPU tensors, the GPU's
architecture, benchmarks/compile_sm90.py) and leave them in Triton's cache
(TRITON_CACHE_DIR, shared with the steps), so the steps find them compiled. A launch the
workers missed is compiled where it runs.

The jobs are the cases of the op benchmarks (each bench_<op>.py's ``inputs``; the
attention cases of q/k narrower than the values with the attn_qk gate as well) and the
pruned models of bench_model.py; gpu_check.py says which cases each step runs.
"""
from __future__ import annotations

import importlib
import json
import time
from typing import Callable, Dict, List, Sequence

import bench_gated_linear
import bench_layer_norm_gather
import bench_model
import bench_packed_attention
from harness import environment

OPS = {m.OP: m for m in (bench_gated_linear, bench_layer_norm_gather, bench_packed_attention)}


def compile_case(torch, c: Dict[str, object]) -> None:
    """Launch the kernels of case ``c`` forward and backward on uninitialised CPU tensors."""
    op, p = c["op"], c["params"]
    dtype = environment.dtype_of(torch, c["dtype"])
    tensors = OPS[op].inputs(torch, torch.device("cpu"), dtype, p, empty=True)
    module = importlib.import_module(f"vtp_kernels._{op}")
    if op == "gated_linear":
        _, w, a, _, _ = tensors
        module._scale_weight(w, a, dtype)
        module._scale_weight_backward(torch.empty(w.shape, dtype=dtype), w, a, True, True)
    elif op == "layer_norm_gather":
        x, index, w, b, dy = tensors
        eps = bench_layer_norm_gather.EPS
        y, mean, rstd = module._forward(x, index, w, b, eps)
        module._backward(torch.empty(y.shape, dtype=y.dtype), x, index, w, mean, rstd, True, True, True)
    else:
        q, k, v, dout = tensors
        widths, scale = tuple(p["widths"]), p["D"] ** -0.5
        # A QK case (q/k ``dqk`` wide) runs the kernels with the attn_qk gate too: fp32 [H, Dqk],
        # its gradient asked for.
        gates = [None] + ([torch.empty(q.shape[1], q.shape[3])] if "dqk" in p else [])
        for gate in gates:
            out, lse = module._forward(q, k, v, widths, scale, gate)
            module._backward(dout, q, k, v, out, lse, widths, scale, True, True, gate, gate is not None)


_PRUNED_ON_CPU: Dict[object, object] = {}


def compile_pruned(torch, model: str, round_to: int, ratio: float, op: str) -> None:
    """``op``'s launches in the pruned model, from its own forward on the CPU at 16 images
    (M = 16 * 197 rows fall in the same divisibility classes as 256 * 197). Only the
    launches matter, so each nn.Linear returns an uninitialised bf16 output of its shape,
    as under autocast, and the other op runs its reference."""
    cpu = torch.device("cpu")
    if round_to not in _PRUNED_ON_CPU:  # a worker may compile several jobs of these models
        if "gated" not in _PRUNED_ON_CPU:
            _PRUNED_ON_CPU["gated"] = bench_model.dense_and_gated(torch, model, cpu, 0)[1]
        _PRUNED_ON_CPU[round_to] = bench_model.prune_at(_PRUNED_ON_CPU["gated"], cpu, ratio=ratio, round_to=round_to)[0]
    small = _PRUNED_ON_CPU[round_to]
    images = torch.empty(16, 3, small.patch_embed.img_size[0], small.patch_embed.img_size[1])
    linear_forward = torch.nn.Linear.forward
    torch.nn.Linear.forward = lambda self, x: x.new_empty(*x.shape[:-1], self.out_features, dtype=torch.bfloat16)
    try:
        with environment.one_op_on_triton(op), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            small(images)
    finally:
        torch.nn.Linear.forward = linear_forward


def jobs(production: Sequence[Dict], configs: Sequence[Dict], correctness: Sequence[Dict],
         pruned_round_tos: Sequence[int], qk: Sequence[Dict] = ()) -> List[Dict[str, object]]:
    """What to compile: the pruned models' forwards and every case of every step, each with
    the configs an autotuned kernel compiles there (autotuning: those its pruning keeps;
    the configs step: all; the correctness step: the first) and a rough cost. ``qk``: the
    attention cases of q/k narrower than the values, ungated and gated, autotuned."""
    def cost(c):  # fp32 dots compile to long FMA code; attention kernels are the big ones
        return (8 if c["dtype"] == "fp32" else 2) if c["op"] == "packed_attention" else 1
    # Attention's autotuned kernels have several configs each: one job per config index.
    attention = importlib.import_module("vtp_kernels._packed_attention")
    attention_configs = range(max(len(k.configs) for k in environment.autotuners(attention).values()))
    out = [{"what": f"pruned round_to={r} layer_norm_gather", "configs": "kept", "round_to": r,
            "pruned_op": "layer_norm_gather", "cost": 4} for r in pruned_round_tos]
    out += [{"what": f"pruned round_to={r} packed_attention config {i}", "configs": i, "round_to": r,
             "pruned_op": "packed_attention", "cost": 3} for r in pruned_round_tos for i in attention_configs]
    for c in production:
        if c["op"] == "packed_attention":
            out += [{"what": f"ops {c['op']} {c['label']} config {i}", "configs": i, "case": c, "cost": 2}
                    for i in attention_configs]
        else:
            out.append({"what": f"ops {c['op']} {c['label']}", "configs": "kept", "case": c, "cost": 2})
    out += [{"what": f"qk_attention {c['label']} config {i}", "configs": i, "case": c, "cost": 3}
            for c in qk for i in attention_configs]
    for c in configs:
        indices = attention_configs if c["op"] == "packed_attention" else ["all"]
        out += [{"what": f"configs {c['op']} {c['label']} config {i}", "configs": i, "case": c, "cost": 2}
                for i in indices]
    out += [{"what": f"correctness {c['op']} {c['label']} {c['dtype']}", "configs": "first", "case": c,
             "cost": cost(c)} for c in correctness]
    return out


def schedule(todo: List[Dict[str, object]], workers: int) -> List[List[Dict[str, object]]]:
    """Longest first, each to the least loaded worker."""
    queues: List[List[Dict[str, object]]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for job in sorted(todo, key=lambda j: -j["cost"]):
        i = loads.index(min(loads))
        queues[i].append(job)
        loads[i] += job["cost"]
    return queues


def worker(index: int, workers: int, arch: int, todo: Callable[[], List[Dict[str, object]]], model: str,
           ratio: float) -> None:
    """Compile worker ``index``'s share of ``todo()``; print one JSON line of what it did."""
    import torch

    import compile_sm90

    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    _, state = compile_sm90.install_sm90_driver(arch)
    done = []
    for job in schedule(todo(), workers)[index]:
        t0 = time.monotonic()
        state["configs"] = job["configs"]
        try:
            if "case" in job:
                compile_case(torch, job["case"])
            else:
                compile_pruned(torch, model, job["round_to"], ratio, job["pruned_op"])
            done.append({"what": job["what"], "seconds": round(time.monotonic() - t0, 2)})
        except Exception as e:  # noqa: BLE001
            done.append({"what": job["what"], "error": f"{type(e).__name__}: {e}"})
    print("COMPILED " + json.dumps(done), flush=True)
