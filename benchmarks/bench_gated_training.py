"""Sparse-training step of a gated DeiT-B against the ungated timm model, per backend.

One step = forward under bf16 autocast, cross-entropy (+ 1e-4 * l1 of the gates for the
gated models), backward, AdamW step (fused on a GPU), on synthetic random images and
labels. Timed:

    ungated        timm DeiT-B as is: the floor
    gated/torch    vtp.add_gates(DeiT-B), vtp_kernels backend "torch" (the reference ops)
    gated/triton   the same model, backend "triton" (the gate folded into W by Triton kernels)

Each: one first step (timed apart: compilation, allocation), warm-up steps, then timed
steps (CUDA events around every step), median step time and peak allocated memory of the
timed steps. Output: a table, and a JSON record (device, versions, command, raw step times)
in --out, rewritten after every variant.

gpu_check.py's training step runs the same timed run (``measure``) over its own cases
(with torch.compile, and gated_linear alone on Triton under backend "auto").

    python benchmarks/bench_gated_training.py                     # GPU: DeiT-B, batch 256
    python benchmarks/bench_gated_training.py --smoke --out /tmp/b  # CPU check of the script
"""
import copy
import os
import sys
import time
from pathlib import Path
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, arguments, environment, records, timing  # noqa: E402
import bench_model  # noqa: E402

# A case: the model gated or not, the vtp_kernels backend (harness.environment.backend_context),
# torch.compile or eager.
CASES = {"ungated": {"gated": False, "backend": "torch", "compile": False},
         "gated/torch": {"gated": True, "backend": "torch", "compile": False},
         "gated/triton": {"gated": True, "backend": "triton", "compile": False}}


def measure(torch, device, base, c: Dict[str, object], images, labels, *, amp, warmup: int, iters: int,
            rounds: int, compile_backend: str = "inductor", lam: float = 1e-4, lr: float = 1e-5) -> Dict[str, object]:
    """Training steps of a copy of ``base`` in case ``c``: the first step's seconds, then
    ``warmup`` untimed steps and ``rounds`` rounds of ``iters`` timed ones (summary), the
    peak memory of the timed steps (GPU) and every loss."""
    import torch.nn.functional as F

    import vtp

    cuda = device.type == "cuda"
    model = copy.deepcopy(base)
    if c["gated"]:
        vtp.add_gates(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=cuda)
    forward = torch.compile(model, backend=compile_backend) if c["compile"] else model
    losses = []

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None and amp != torch.float32):
            loss = F.cross_entropy(forward(images), labels)
            if c["gated"]:
                loss = loss + lam * vtp.l1_penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    out: Dict[str, object] = {}
    try:
        with environment.backend_context(c["backend"]):
            t0 = time.monotonic()
            step()
            if cuda:
                torch.cuda.synchronize()
            out["first_step_s"] = round(time.monotonic() - t0, 2)
            for _ in range(warmup):
                step()
            if cuda:  # the peak memory of the timed steps only
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            out.update(timing.step_rounds(torch, step, 0, iters, cuda, rounds))
            out["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    finally:
        del model, optimizer, forward
        if cuda:
            torch.cuda.empty_cache()
    out["losses"] = [float(x) for x in losses]
    return out


def parse_args(argv=None):
    p = arguments.parser(__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script in seconds: a two-block ViT (width 64, 32x32 "
                        "images), batch 4, fp32, Triton under TRITON_INTERPRET=1, no memory figures. "
                        "Its timings say nothing about speed.")
    p.add_argument("--model", default="deit_base_patch16_224",
                   help="timm model name, built with pretrained=False (default: deit_base_patch16_224)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 256; smoke 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20; smoke 2)")
    p.add_argument("--variants", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--lam", type=float, default=1e-4, help="weight of the gates' l1 penalty (default: 1e-4)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model (inductor) before timing (default: eager)")
    p.add_argument("--out", type=Path, default=Path(RESULTS), help=f"folder for the JSON record (default: {RESULTS})")
    p.add_argument("--name", default=None,
                   help="file stem of the record (default: bench_gated_training_<device>_<time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.smoke else 256)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.variants = arguments.subset(args.variants, CASES, "--variants")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch, device = environment.setup(args.smoke, args.seed,  # before the kernels are decorated
                                      "bench_gated_training: needs a CUDA GPU (DeiT-B at batch 256); "
                                      "--smoke checks the script on the CPU with a tiny model")
    device_name = environment.device_name(torch, device) + (", TRITON_INTERPRET=1" if args.smoke else "")
    amp = None if args.smoke else torch.bfloat16
    base = bench_model.build_dense(bench_model.SMOKE_MODEL if args.smoke else args.model, device).train()
    size = base.patch_embed.img_size[0]
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, base.num_classes, (args.batch,), device=device)

    created = records.now()
    name = args.name or records.timestamped_stem("bench_gated_training", device_name, created)
    results = []
    record = {
        **records.record_head("gated_training", __file__, argv, smoke=args.smoke, device=device_name,
                              packages=("torch", "triton", "timm", "python"), created=created),
        "model": bench_model.SMOKE_MODEL if args.smoke else args.model,
        "batch": args.batch,
        "amp": None if amp is None else str(amp).replace("torch.", ""),
        "optimizer": "AdamW, fused" if device.type == "cuda" else "AdamW",
        "compile": args.compile,
        "warmup": args.warmup,
        "steps": args.steps,
        "results": results,
    }
    for variant in args.variants:
        c = {**CASES[variant], "compile": args.compile}
        m = measure(torch, device, base, c, images, labels, amp=amp, warmup=args.warmup, iters=args.steps, rounds=1,
                    lam=args.lam, lr=args.lr)
        r = {"variant": variant, "backend": c["backend"], "median_ms": m["median_ms"], "times_ms": timing.raw_ms(m),
             "first_step_s": m["first_step_s"], "peak_mib": m["peak_mib"], "losses": m["losses"],
             "images_per_s": args.batch / (m["median_ms"] * 1e-3)}
        results.append(r)
        print(f"  {variant:>13}: {r['median_ms']:9.2f} ms/step", file=sys.stderr)
        floor = next((x["median_ms"] for x in results if x["variant"] == "ungated"), None)
        for x in results:
            x["vs_ungated"] = x["median_ms"] / floor if floor else None
        # After every variant: a run cut short keeps what it measured.
        path = records.write_json(args.out / f"{name}.json", record)

    print(f"{record['model']}, batch {args.batch}, {record['amp'] or 'fp32'}, {device_name}")
    print(f"{'variant':>13} {'median ms':>10} {'img/s':>9} {'peak MiB':>9} {'vs ungated':>10}")
    for r in results:
        peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        ratio = f"{r['vs_ungated']:10.3f}" if r["vs_ungated"] else f"{'-':>10}"
        print(f"{r['variant']:>13} {r['median_ms']:10.2f} {r['images_per_s']:9.1f} {peak} {ratio}")
    print(f"record: {path}")
    return record


if __name__ == "__main__":
    main()
