"""Sparse-training step of a gated DeiT-B against the ungated timm model, per backend.

One step = forward under bf16 autocast, cross-entropy (+ 1e-4 * l1 of the gates for the
gated models), backward, AdamW step (fused on a GPU), on synthetic random images and
labels. Timed:

    ungated        timm DeiT-B as is: the floor
    gated/torch    vtp.add_gates(DeiT-B), vtp_kernels backend "torch" (the reference ops)
    gated/triton   the same model, backend "triton" (the gate folded into W by Triton kernels)

Each: warm-up steps, then timed steps (CUDA events around every step), median step time
and peak allocated memory of the timed steps. Output: a table, and a JSON record (device,
versions, command, raw step times) in --out, rewritten after every variant.

    python benchmarks/bench_gated_training.py                     # GPU: DeiT-B, batch 256
    python benchmarks/bench_gated_training.py --smoke --out /tmp/b  # CPU check of the script
"""
import copy
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
import common  # noqa: E402  (puts the repository root on sys.path too)

RESULTS = Path(common.RESULTS)
VARIANTS = ("ungated", "gated/torch", "gated/triton")


def parse_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script in seconds: a two-block ViT (width 64, 32x32 "
                        "images), batch 4, fp32, Triton under TRITON_INTERPRET=1, no memory figures. "
                        "Its timings say nothing about speed.")
    p.add_argument("--model", default="deit_base_patch16_224",
                   help="timm model name, built with pretrained=False (default: deit_base_patch16_224)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 256; smoke 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20; smoke 2)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--lam", type=float, default=1e-4, help="weight of the gates' l1 penalty (default: 1e-4)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model (inductor) before timing (default: eager)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the JSON record (default: {RESULTS})")
    p.add_argument("--name", default=None,
                   help="file stem of the record (default: bench_gated_training_<device>_<time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.smoke else 256)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.variants = common.subset(args.variants, VARIANTS, "--variants")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch, device = common.setup(args.smoke, args.seed,  # before the kernels are decorated
                                 "bench_gated_training: needs a CUDA GPU (DeiT-B at batch 256); "
                                 "--smoke checks the script on the CPU with a tiny model")
    import timm
    import torch.nn.functional as F

    import vtp
    import vtp_kernels

    device_name = common.device_name(torch, device) + (", TRITON_INTERPRET=1" if args.smoke else "")
    if args.smoke:
        build = lambda: timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        img_size, num_classes, amp = 32, 10, None
    else:
        build = lambda: timm.create_model(args.model, pretrained=False)
        img_size, num_classes, amp = 224, 1000, torch.bfloat16

    base = build().to(device).train()
    images = torch.randn(args.batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, num_classes, (args.batch,), device=device)

    def run(variant):
        model = copy.deepcopy(base)
        gated = variant != "ungated"
        if gated:
            vtp.add_gates(model)
        backend = variant.split("/")[1] if gated else "torch"
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
        forward = torch.compile(model) if args.compile else model

        def step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(forward(images), labels)
                if gated:
                    loss = loss + args.lam * vtp.l1_penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        cuda, losses = device.type == "cuda", []
        with vtp_kernels.use_backend(backend):
            for _ in range(args.warmup):
                step()
            if cuda:  # the peak memory of the timed steps only
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = common.step_times_ms(torch, lambda: losses.append(step()), 0, args.steps, cuda)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
        losses = [float(x) for x in losses]
        del model, optimizer, forward
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"variant": variant, "backend": backend, "median_ms": statistics.median(times),
                "times_ms": times, "peak_mib": peak, "losses": losses,
                "images_per_s": args.batch / (statistics.median(times) * 1e-3)}

    created = common.now()
    name = args.name or common.timestamped_stem("bench_gated_training", device_name, created)
    results = []
    record = {
        **common.record_head("gated_training", __file__, argv, smoke=args.smoke, device=device_name,
                             packages=("torch", "triton", "timm", "python"), created=created),
        "model": "smoke_vit" if args.smoke else args.model,
        "batch": args.batch,
        "amp": None if amp is None else str(amp).replace("torch.", ""),
        "optimizer": "AdamW, fused" if device.type == "cuda" else "AdamW",
        "compile": args.compile,
        "warmup": args.warmup,
        "steps": args.steps,
        "results": results,
    }
    for variant in args.variants:
        r = run(variant)
        results.append(r)
        print(f"  {variant:>13}: {r['median_ms']:9.2f} ms/step", file=sys.stderr)
        floor = next((x["median_ms"] for x in results if x["variant"] == "ungated"), None)
        for x in results:
            x["vs_ungated"] = x["median_ms"] / floor if floor else None
        # After every variant: a run cut short keeps what it measured.
        path = common.write_json(args.out / f"{name}.json", record)

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
