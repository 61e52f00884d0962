"""Compile every Triton kernel config of vtp_kernels for sm_90a on a machine without a GPU,
and report what the compiler made of it.

The op launchers run on CPU tensors laid out as in a DeiT-B forward and backward (bf16
autocast: fp32 weights and residual stream, bf16 GEMM outputs), so each kernel is
specialised exactly as a real call would specialise it (dtypes, 16-byte-aligned pointers,
integers divisible by 16 or equal to 1). A stand-in driver tells Triton the device is an
sm_90 GPU; every launch only compiles (``warmup``), and an autotuned kernel compiles every
one of its configs. For each compiled kernel the report gives, from the TTGIR, PTX, ptxas
and SASS:

    wgmma      warp_group_dot ops, the pendings of each warp_group_dot_wait (in a loop or
               not); SASS HGMMA count (HMMA would mean the slower pre-Hopper path)
    copies     cp.async (LDGSTS) and TMA copies with their widths, synchronous loads, and
               the vector width of global loads and stores in the PTX (bytes per access)
    resources  registers, spill bytes, stack frame (ptxas -v), shared memory

Needs Triton with its bundled ptxas/cuobjdump (3.6 is what the H100/H200 machines run):

    TRITON_INTERPRET=0 python benchmarks/compile_sm90.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, records  # noqa: E402

# ---------------------------------------------------------------------------------------
# Compiling without a GPU
# ---------------------------------------------------------------------------------------


def install_sm90_driver(arch: int = 90):
    """Make Triton compile for ``sm_<arch>`` without a driver: a stand-in active driver, and
    every launch turned into a compile-only warm-up whose results are collected.

    An autotuned kernel compiles the configs ``state["configs"]`` names: "all" (the
    default), "kept" (those its early pruning keeps for these arguments: what autotuning
    would compile), "first" (what a kernel limited to its first config compiles), or an
    index i (its i-th config, if it has one: one share of "all" for parallel compiling).
    Compiled kernels land in Triton's cache as a real launch would leave them.
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("compile_sm90: nothing is benchmarked without a GPU")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    triton.runtime.driver.set_active(CompileOnlyDriver())
    compiled: List[Dict[str, object]] = []
    state = {"scenario": None, "config": None, "kept": None, "configs": "all"}
    jit_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append({"scenario": state["scenario"], "kernel": self.fn.__name__, "config": state["config"],
                         "kept_by_prune": state["kept"], "compiled": kernel})
        return kernel

    def every_config(self, *args, **kwargs):
        named = dict(zip(self.arg_names, args))
        kept = self.configs
        if self.early_config_prune and len(self.configs) > 1:
            kept = self.early_config_prune(self.configs, named, **kwargs)
        which = state["configs"]
        chosen = self.configs[which:which + 1] if isinstance(which, int) else \
            {"all": self.configs, "kept": kept, "first": self.configs[:1]}[which]
        for config in chosen:
            state["config"], state["kept"] = str(config), config in kept
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        state["config"], state["kept"] = None, None

    JITFunction.run = compile_only
    Autotuner.run = every_config
    return compiled, state


# ---------------------------------------------------------------------------------------
# The launches: DeiT-B shapes, as a bf16-autocast model calls the ops
# ---------------------------------------------------------------------------------------
def scenarios(torch) -> Dict[str, Callable[[], None]]:
    import importlib

    gl = importlib.import_module("vtp_kernels._gated_linear")
    ln = importlib.import_module("vtp_kernels._layer_norm_gather")
    pa = importlib.import_module("vtp_kernels._packed_attention")
    B, N, C = 16, 197, 768   # 16 x 197 rows keep M divisible by 16, as at batch 256
    bf16 = torch.bfloat16

    def gated_linear():
        for n, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072)):
            w, a = torch.randn(n, k), torch.rand(k)             # fp32 master weight and gate
            gl._scale_weight(w, a, bf16)
            gl._scale_weight_backward(torch.randn(n, k, dtype=bf16), w, a, True, True)

    def layer_norm_gather():
        # The residual stream and LayerNorm parameters stay fp32 under autocast; 461 of 768
        # columns kept (40 % pruned) is neither a power of two nor a multiple of 16.
        x = torch.randn(B, N, C)
        index = torch.randperm(C)[:461].sort().values
        w, b = torch.randn(461), torch.randn(461)
        y, mean, rstd = ln._forward(x, index, w, b, 1e-6)
        ln._backward(torch.randn_like(y), x, index, w, mean, rstd, True, True, True)

    def attention(widths, pad_row_to=1):
        def launch():
            H, D = len(widths), 64
            row = 2 * H * D + sum(widths)
            qkv = torch.randn(B, N, -(-row // pad_row_to) * pad_row_to, dtype=bf16)[..., :row]
            q = qkv[..., :H * D].view(B, N, H, D).transpose(1, 2)
            k = qkv[..., H * D:2 * H * D].view(B, N, H, D).transpose(1, 2)
            v = qkv[..., 2 * H * D:]
            out, lse = pa._forward(q, k, v, tuple(widths), D ** -0.5)
            pa._backward(torch.randn_like(out), q, k, v, out, lse, tuple(widths), D ** -0.5, True, True)
        return launch

    # 12 heads of DeiT-B after a 40 % attn_out prune: round_to=8 widths, and round_to=1 ones.
    widths8 = [64, 48, 56, 40, 64, 24, 32, 48, 56, 16, 40, 8]
    widths1 = [61, 47, 55, 37, 64, 21, 30, 44, 53, 13, 38, 3]
    return {
        "gated_linear": gated_linear,
        "layer_norm_gather": layer_norm_gather,
        "packed_attention round_to=8": attention(widths8),
        "packed_attention round_to=1": attention(widths1),
        "packed_attention round_to=1, qkv row padded to 8": attention(widths1, pad_row_to=8),
    }


# ---------------------------------------------------------------------------------------
# Reading the compiler's output
# ---------------------------------------------------------------------------------------
def ttgir_facts(ttgir: str) -> Dict[str, object]:
    """wgmma ops and waits (with loop nesting), async/TMA copies with their contiguity, and
    synchronous loads, from the TTGIR."""
    regions: List[str] = []
    waits: List[Dict[str, object]] = []
    facts = {"warp_group_dot": 0, "warp_group_dot_async": 0, "async_copy": 0, "async_copy_contiguity": [],
             "tma_copy": 0, "sync_load": 0, "sync_load_in_loop": 0, "loops": 0}
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}"):
            if regions:
                regions.pop()
        in_loop = "for" in regions
        if "ttng.warp_group_dot_wait" in s:
            pend = re.search(r"pendings = (\d+)", s)
            waits.append({"pendings": int(pend.group(1)) if pend else None, "in_loop": in_loop})
        elif "ttng.warp_group_dot " in s:
            facts["warp_group_dot"] += 1
            facts["warp_group_dot_async"] += "isAsync = true" in s
        if "ttg.async_copy_global_to_local" in s:
            facts["async_copy"] += 1
            c = re.search(r"contiguity = (\d+)", s)
            facts["async_copy_contiguity"].append(int(c.group(1)) if c else 1)
        if "async_tma_copy_global_to_local" in s or "ttng.async_tma" in s:
            facts["tma_copy"] += 1
        if re.search(r"= tt\.load ", s):
            facts["sync_load"] += 1
            facts["sync_load_in_loop"] += in_loop
        if s.endswith("{"):
            is_for = "scf.for" in s
            facts["loops"] += is_for
            regions.append("for" if is_for else "other")
    facts["async_copy_contiguity"] = sorted(set(facts["async_copy_contiguity"]))
    facts["waits"] = waits
    return facts


def ptx_facts(ptx: str) -> Dict[str, object]:
    """Bytes per global load/store/cp.async instruction, and wgmma instructions, in the PTX."""
    def widths(pattern):
        out: Dict[int, int] = {}
        for m in re.finditer(pattern, ptx):
            vec = int(m.group("v") or 1)
            bits = int(m.group("b"))
            out[vec * bits // 8] = out.get(vec * bits // 8, 0) + 1
        return dict(sorted(out.items()))

    return {
        "ld_global_bytes": widths(r"ld\.global(?:\.[a-z0-9_]+)*?(?:\.v(?P<v>\d))?\.[bfsu](?P<b>\d+)\b"),
        "st_global_bytes": widths(r"st\.global(?:\.[a-z0-9_]+)*?(?:\.v(?P<v>\d))?\.[bfsu](?P<b>\d+)\b"),
        "cp_async_bytes": {int(k, 0): v for k, v in
                           _count(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?\], (0x[0-9a-f]+|\d+)", ptx)).items()},
        "wgmma_mma_async": len(re.findall(r"wgmma\.mma_async", ptx)),
        "wgmma_wait_group": sorted(set(int(x) for x in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
    }


def _count(items) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def tool(name: str) -> Optional[str]:
    """A binary Triton ships (ptxas, cuobjdump, nvdisasm), else one on the PATH."""
    import shutil

    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def ptxas_facts(ptx: str, arch: str, folder: str) -> Dict[str, object]:
    """Registers, spills, stack frame and shared memory from ``ptxas -v`` on the PTX."""
    ptxas = tool("ptxas")
    if ptxas is None:
        return {"error": "no ptxas"}
    path = os.path.join(folder, "kernel.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    done = subprocess.run([ptxas, f"--gpu-name={arch}", "-v", path, "-o", os.path.join(folder, "kernel.o")],
                          capture_output=True, text=True)
    log = done.stdout + done.stderr
    get = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else None  # noqa: E731
    return {"registers": get(r"Used (\d+) registers"), "spill_store_bytes": get(r"(\d+) bytes spill stores"),
            "spill_load_bytes": get(r"(\d+) bytes spill loads"), "stack_frame_bytes": get(r"(\d+) bytes stack frame"),
            "returncode": done.returncode}


def sass_facts(cubin: bytes, folder: str) -> Dict[str, object]:
    """Instruction counts that say which path the code took, from cuobjdump's SASS."""
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        return {"error": "no cuobjdump"}
    path = os.path.join(folder, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    done = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-300:]}
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", done.stdout)]
    def n(prefix):
        return sum(op == prefix or op.startswith(prefix + ".") for op in ops)
    return {"instructions": len(ops), "HGMMA": n("HGMMA"), "HMMA": n("HMMA"), "LDGSTS": n("LDGSTS"),
            "UTMALDG": n("UTMALDG"), "LDG.E.128": sum(op.startswith("LDG") and ".128" in op for op in ops),
            "LDG": n("LDG"), "STG.E.128": sum(op.startswith("STG") and ".128" in op for op in ops), "STG": n("STG"),
            "LDL": n("LDL"), "STL": n("STL"), "WARPGROUP.DEPBAR": n("WARPGROUP.DEPBAR")}


def analyse(kernel, folder: str) -> Dict[str, object]:
    asm = kernel.asm
    meta = kernel.metadata
    return {"num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared_bytes": meta.shared,
            "ttgir": ttgir_facts(asm["ttgir"]), "ptx": ptx_facts(asm["ptx"]),
            "ptxas": ptxas_facts(asm["ptx"], f"sm_{meta.target.arch}a" if meta.target.arch == 90 else
                                 f"sm_{meta.target.arch}", folder),
            "sass": sass_facts(asm["cubin"], folder)}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def summary_line(r: Dict[str, object]) -> str:
    t, p, x, s = r["ttgir"], r["ptx"], r["ptxas"], r["sass"]
    waits = ",".join(f"{w['pendings']}{'L' if w['in_loop'] else ''}" for w in t["waits"]) or "-"
    return (f"wgmma {t['warp_group_dot']} (async {t['warp_group_dot_async']}) waits[{waits}] HGMMA {s.get('HGMMA')} "
            f"HMMA {s.get('HMMA')} | cp.async {t['async_copy']} contig {t['async_copy_contiguity']} "
            f"LDGSTS {s.get('LDGSTS')} TMA {t['tma_copy']} sync loads {t['sync_load']} "
            f"(in loop {t['sync_load_in_loop']}) | ld B/access {p['ld_global_bytes']} st {p['st_global_bytes']} "
            f"cp.async B {p['cp_async_bytes']} | regs {x.get('registers')} spill {x.get('spill_store_bytes')}/"
            f"{x.get('spill_load_bytes')} stack {x.get('stack_frame_bytes')} LDL/STL {s.get('LDL')}/{s.get('STL')} "
            f"smem {r['shared_bytes']}")


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=RESULTS, help="folder for compile_sm90_triton<version>.json / .md")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, Hopper)")
    p.add_argument("--only", default=None, help="comma-separated scenario name prefixes (default: all)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_sm90: unset TRITON_INTERPRET; the interpreter compiles nothing")

    import torch
    import triton

    compiled, state = install_sm90_driver(args.arch)
    for name, launch in scenarios(torch).items():
        if args.only and not any(name.startswith(o.strip()) for o in args.only.split(",")):
            continue
        state["scenario"] = name
        print(f"[compile_sm90] {name}", flush=True)
        launch()

    record: Dict[str, object] = {
        **records.record_head("compile_sm90", __file__, argv, smoke=False, device=f"sm_{args.arch}a (compiled only)",
                             packages=("python", "torch", "triton", "numpy")),
        "kernels": [],
    }
    seen = set()
    with tempfile.TemporaryDirectory() as folder:
        for c in compiled:
            kernel = c["compiled"]
            key = (c["scenario"], c["kernel"], kernel.hash)
            if key in seen:  # the same specialisation launched again (e.g. four weight shapes)
                continue
            seen.add(key)
            facts = analyse(kernel, folder)
            entry = {k: c[k] for k in ("scenario", "kernel", "config", "kept_by_prune")}
            entry.update(facts)
            record["kernels"].append(entry)
            print(f"  {c['kernel']:<32} {c['config'] or '':<60} {summary_line(facts)}", flush=True)

    stem = os.path.join(args.out, f"compile_sm{args.arch}_triton{triton.__version__}")
    records.write_json(stem + ".json", record)
    records.write_text(stem + ".md", markdown(record))
    print(f"wrote {stem}.json and {stem}.md")
    return record


def markdown(record: Dict[str, object]) -> str:
    lines = [f"# vtp_kernels compiled for {record['device']}", "",
             f"`{record['command']}`; versions {record['versions']}.", "",
             "waits: pendings of each `warp_group_dot_wait` (L: inside an scf.for loop). "
             "ld/st B: bytes per global access in the PTX, with counts. regs/spill/stack from `ptxas -v`.", "",
             "| scenario | kernel | config | pruned out | wgmma (async) | waits | HGMMA | cp.async (contig) | "
             "LDGSTS | sync loads (in loop) | ld B | st B | regs | spill st/ld | stack | LDL/STL | smem |",
             "|" + "---|" * 17]
    for k in record["kernels"]:
        t, p, x, s = k["ttgir"], k["ptx"], k["ptxas"], k["sass"]
        waits = ", ".join(f"{w['pendings']}{'L' if w['in_loop'] else ''}" for w in t["waits"]) or "-"
        lines.append(
            f"| {k['scenario']} | `{k['kernel']}` | {k['config'] or '-'} | "
            f"{'' if k['kept_by_prune'] in (None, True) else 'yes'} | {t['warp_group_dot']} ({t['warp_group_dot_async']}) | "
            f"{waits} | {s.get('HGMMA')} | {t['async_copy']} ({', '.join(map(str, t['async_copy_contiguity'])) or '-'}) | "
            f"{s.get('LDGSTS')} | {t['sync_load']} ({t['sync_load_in_loop']}) | {p['ld_global_bytes']} | "
            f"{p['st_global_bytes']} | {x.get('registers')} | {x.get('spill_store_bytes')}/{x.get('spill_load_bytes')} | "
            f"{x.get('stack_frame_bytes')} | {s.get('LDL')}/{s.get('STL')} | {k['shared_bytes']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
