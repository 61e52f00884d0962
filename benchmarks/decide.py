"""The rule that puts an op into ``vtp_kernels.backend.FASTER_ON_CUDA``, applied to a
gpu_check record.

An op joins FASTER_ON_CUDA only when all of these hold:

0. Correct. Every check of the op in the record passed: each correctness case (bf16, fp16,
   fp32 against the fp64 reference), each forced autotune config, the check of the tuned
   kernel before its timing, and for the pruned-model ops the logits of the pruned models
   (for packed_attention also its checks with q/k narrower than V and with the attn_qk gate).
1. Op level. At the production shape, in the dtype the model runs it in, the Triton
   kernel beats the strongest alternative that computes the same result (the reference
   eager, ``torch.compile`` of the reference, for attention also SDPA with V padded to the
   head dim under each SDPA backend) by more than 5 % beyond the run's spread::

       best alternative median / Triton median  >  1.05 + spread

   ``spread`` is the larger of the two variants' relative differences between their two
   timed rounds (``|round 1 - round 2| / median``). Floors (nn.Linear without a gate, a
   full-width LayerNorm) are recorded for context and never count as alternatives.
2. Model level. The model that uses the op is no slower end to end with it: with only
   this op on Triton (backend "auto", FASTER_ON_CUDA = {op}), every measured step of that
   model (eager and compiled, every plan) takes at most the torch-backend time in the same
   setting times ``1 + spread`` of the two. gated_linear is judged on the gated training
   step, layer_norm_gather and packed_attention on pruned inference.

It also says, per backend, whether round_to=8 plans ran faster than round_to=1 by more
than the spread (a lead for the ``round_to`` default, which the plan owns).

    python benchmarks/decide.py OUT/gpu_check_<device>_<time>.tar.gz   # or a folder of records
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
from typing import Dict, List, Optional

MARGIN = 0.05

# What "production" means per op: the mode the model runs it in, and whether the cases
# add up (a gated block runs its four linears one after another) or must each win.
PRODUCTION = {
    "gated_linear": {"mode": "fwd+bwd", "sum_cases": True, "model_task": "train"},
    "layer_norm_gather": {"mode": "fwd", "sum_cases": False, "model_task": "infer"},
    "packed_attention": {"mode": "fwd", "sum_cases": False, "model_task": "infer"},
}


def _by(rows: List[Dict], key: str) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _combine(rows: List[Dict]) -> Dict[str, Dict]:
    """Per variant: medians summed over the cases, the largest spread, the role."""
    out: Dict[str, Dict] = {}
    for r in rows:
        v = out.setdefault(r["variant"], {"variant": r["variant"], "role": r["role"], "median_ms": 0.0, "spread": 0.0})
        v["median_ms"] += r["median_ms"]
        v["spread"] = max(v["spread"], r["spread"])
    return out


def compare(variants: Dict[str, Dict]) -> Dict[str, object]:
    """The op-level test on one case: Triton against the fastest alternative."""
    triton = variants.get("triton")
    alternatives = [v for v in variants.values() if v["role"] == "alternative"]
    if triton is None or not alternatives:
        return {"ok": False, "reason": "no Triton timing or no alternative timed"}
    best = min(alternatives, key=lambda v: v["median_ms"])
    spread = max(triton["spread"], best["spread"])
    speedup = best["median_ms"] / triton["median_ms"]
    need = 1 + MARGIN + spread
    return {"ok": speedup > need, "speedup": speedup, "needed": need, "strongest_alternative": best["variant"],
            "triton_ms": triton["median_ms"], "alternative_ms": best["median_ms"], "spread": spread}


def op_level(op: str, ops_record: Optional[Dict]) -> Dict[str, object]:
    rule = PRODUCTION[op]
    rows = [r for r in (ops_record or {}).get("results", [])
            if r["op"] == op and r["mode"] == rule["mode"] and r.get("production") and "median_ms" in r]
    if not rows:
        return {"ok": False, "reason": f"no {rule['mode']} timing at the production shape"}
    if rule["sum_cases"]:
        cases = {"+".join(sorted({r["case"] for r in rows})): _combine(rows)}
    else:
        cases = {case: _combine(case_rows) for case, case_rows in _by(rows, "case").items()}
    verdicts = {case: compare(variants) for case, variants in cases.items()}
    return {"ok": all(v["ok"] for v in verdicts.values()), "cases": verdicts}


def model_level(op: str, model_rows: List[Dict]) -> Dict[str, object]:
    """Every setting that ran the model with only ``op`` on Triton, against the torch backend
    in the same setting. A setting without its torch-backend step (skipped for time) is
    reported and not compared; at least one setting must be compared."""
    task = PRODUCTION[op]["model_task"]
    with_op = [r for r in model_rows if r.get("task") == task and r.get("backend") == f"auto:{op}" and "median_ms" in r]
    settings: Dict[str, Dict[str, object]] = {}
    for r in with_op:
        base = next((b for b in model_rows if b["setting"] == r["setting"] and b.get("backend") == "torch"
                     and "median_ms" in b), None)
        if base is None:
            settings[r["setting"]] = {"ok": None, "reason": "no torch-backend step to compare with"}
            continue
        spread = max(r["spread"], base["spread"])
        ratio = r["median_ms"] / base["median_ms"]
        settings[r["setting"]] = {"ok": ratio <= 1 + spread, "ratio": ratio, "allowed": 1 + spread,
                                  "with_op_ms": r["median_ms"], "torch_ms": base["median_ms"]}
    compared = [s for s in settings.values() if s["ok"] is not None]
    if not compared:
        return {"ok": False, "reason": f"no {task} step of a model with only {op} on Triton, beside its torch "
                                       "backend", "settings": settings}
    return {"ok": all(s["ok"] for s in compared), "settings": settings}


def checks_passed(op: str, records: Dict[str, Dict]) -> Dict[str, object]:
    """Whether every check of ``op`` in the record passed (there must be correctness cases)."""
    cases = [r for r in records.get("correctness", {}).get("results", []) if r.get("op") == op]
    if not cases:
        return {"ok": False, "reason": "no correctness cases recorded"}
    failed = [f"correctness {r.get('case')} {r.get('dtype')}" for r in cases if not r.get("ok")]
    failed += [f"config {r.get('kernel')} #{r.get('config_index')}" for r in records.get("configs", {}).get("results", [])
               if r.get("op") == op and r.get("ok") is False]
    failed += [f"ops {name}" for name, c in records.get("ops", {}).get("checks", {}).items()
               if name.startswith(op + " ") and not c.get("ok")]
    if PRODUCTION[op]["model_task"] == "infer":
        failed += [f"pruned {name}" for name, c in records.get("pruned", {}).get("checks", {}).items() if not c.get("ok")]
    if op == "packed_attention":
        # q/k narrower than V and the attn_qk gate run the same kernels: wrong there, out.
        failed += [f"qk_attention {name}" for name, c in records.get("qk_attention", {}).get("checks", {}).items()
                   if not c.get("ok")]
    return {"ok": not failed, "failed": failed, "cases": len(cases)}


def round_to_lead(model_rows: List[Dict]) -> Dict[str, object]:
    """Per backend and compile setting: round_to=8 against round_to=1 on the same model."""
    out = {}
    rows = [r for r in model_rows if r.get("round_to") in (1, 8) and "median_ms" in r]
    for r8 in (r for r in rows if r["round_to"] == 8):
        r1 = next((r for r in rows if r["round_to"] == 1 and r["backend"] == r8["backend"]
                   and r.get("compile") == r8.get("compile") and r.get("task") == r8.get("task")), None)
        if r1 is None:
            continue
        spread = max(r1["spread"], r8["spread"])
        ratio = r8["median_ms"] / r1["median_ms"]
        key = f"{r8.get('task')} {r8['backend']} {'compiled' if r8.get('compile') else 'eager'}"
        out[key] = {"round_to_8_over_1": ratio, "spread": spread,
                    "faster": "round_to=8" if ratio < 1 - spread else "round_to=1" if ratio > 1 + spread else "neither"}
    return out


def decide(records: Dict[str, Dict]) -> Dict[str, object]:
    """``records``: the gpu_check step records by name (see STEP_RECORDS)."""
    model_rows = [*records.get("training", {}).get("results", []), *records.get("pruned", {}).get("results", [])]
    ops = {}
    for op in PRODUCTION:
        correct = checks_passed(op, records)
        op_v, model_v = op_level(op, records.get("ops")), model_level(op, model_rows)
        ops[op] = {"join": bool(correct["ok"] and op_v["ok"] and model_v["ok"]), "checks": correct,
                   "op_level": op_v, "model_level": model_v}
    return {"rule": f"every check passed, best alternative / Triton > {1 + MARGIN:.2f} + spread at the production "
                    "shape and dtype, and the model with the op no slower than with the torch backend beyond the spread",
            "ops": ops, "faster_on_cuda": sorted(op for op, v in ops.items() if v["join"]),
            "round_to": round_to_lead(model_rows)}


# ---------------------------------------------------------------------------------------
# Reading a record, printing the decision
# ---------------------------------------------------------------------------------------
STEP_RECORDS = ("configs", "correctness", "ops", "qk_attention", "training", "pruned")


def load(path: str) -> Dict[str, Dict]:
    """The step records of a gpu_check run: from its archive, or from a folder of records."""
    records: Dict[str, Dict] = {}
    if os.path.isdir(path):
        for name in STEP_RECORDS:
            file = os.path.join(path, f"{name}.json")
            if os.path.exists(file):
                with open(file) as f:
                    records[name] = json.load(f)
        return records
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)[:-5] if member.name.endswith(".json") else None
            if name in STEP_RECORDS:
                records[name] = json.load(tar.extractfile(member))
    return records


def report(decision: Dict[str, object]) -> str:
    lines = [f"rule: {decision['rule']}"]
    for op, v in decision["ops"].items():
        lines.append(f"{op:<18} {'JOINS' if v['join'] else 'stays out'}")
        c = v["checks"]
        lines.append(f"  checks: {'all passed' if c['ok'] else c.get('reason') or 'failed: ' + ', '.join(c['failed'][:5])}")
        op_v = v["op_level"]
        for case, c in op_v.get("cases", {}).items():
            if "speedup" in c:
                lines.append(f"  op {case}: {c['speedup']:.3f}x vs {c['strongest_alternative']} "
                             f"(needs > {c['needed']:.3f}) {'ok' if c['ok'] else 'no'}")
            else:
                lines.append(f"  op {case}: {c['reason']}")
        if "reason" in op_v:
            lines.append(f"  op: {op_v['reason']}")
        model_v = v["model_level"]
        for setting, s in model_v.get("settings", {}).items():
            if "ratio" in s:
                lines.append(f"  model {setting}: {s['ratio']:.3f}x the torch backend (allowed <= {s['allowed']:.3f}) "
                             f"{'ok' if s['ok'] else 'no'}")
            else:
                lines.append(f"  model {setting}: {s['reason']}")
        if "reason" in model_v:
            lines.append(f"  model: {model_v['reason']}")
    lines.append(f"FASTER_ON_CUDA = frozenset({set(decision['faster_on_cuda']) or ''})")
    for key, r in decision["round_to"].items():
        lines.append(f"round_to {key}: round_to=8 takes {r['round_to_8_over_1']:.3f}x round_to=1 "
                     f"(spread {r['spread']:.3f}): {r['faster']} faster")
    return "\n".join(lines)


def main(argv=None) -> Dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(f"usage: python benchmarks/decide.py GPU_CHECK_ARCHIVE_OR_FOLDER\n\n{__doc__}")
    decision = decide(load(argv[0]))
    print(report(decision))
    return decision


if __name__ == "__main__":
    main()
