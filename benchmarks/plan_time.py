"""How long ``vtp.plan(flops_target=...)`` takes: the planner's own time, a record, not a test.

For each model (timm config, random weights, gate values uniform in [0.05, 1.05)), the plan to
``--flops-target`` is made ``--runs`` times in one process; the first call also pays the
one-time warm-up of PyTorch's meta kernels, so it is reported apart from the later ones.

    python benchmarks/plan_time.py                          # DeiT-B and ViT-L, the record
    python benchmarks/plan_time.py --smoke --out /tmp/pt    # a tiny ViT: checks the script
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness, also when loaded by path
from harness import RESULTS, arguments, environment, records  # noqa: E402

MODELS = ("deit_base_patch16_224", "vit_large_patch16_224")


def time_plans(torch, timm, vtp, name: str, flops_target: float, runs: int, seed: int, smoke: bool) -> dict:
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3) if smoke else {}
    model = vtp.add_gates(timm.create_model(name, pretrained=False, **kwargs))
    with torch.no_grad():
        for gate in vtp.gates(model).values():
            gate.copy_(torch.rand(gate.shape) + 0.05)
    seconds, plan = [], None
    for _ in range(runs):
        start = time.perf_counter()
        plan = vtp.plan(model, flops_target=flops_target)
        seconds.append(time.perf_counter() - start)
    later = seconds[1:] or seconds
    return {"model": name, "flops_target": flops_target, "seconds": seconds, "first_s": seconds[0],
            "median_later_s": statistics.median(later), "kept_dims_share": 1 - plan.pruned_ratio}


def main(argv=None) -> dict:
    p = arguments.parser(__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    p.add_argument("--flops-target", type=float, default=0.55, help="share of the dense MACs to keep")
    p.add_argument("--runs", type=int, default=5, help="plans per model (the first one warms up)")
    p.add_argument("--seed", type=int, default=0, help="seed of the gate values")
    p.add_argument("--out", default=RESULTS, help="folder of the JSON record")
    p.add_argument("--smoke", action="store_true", help="a tiny ViT, 2 runs: checks the script")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs: expected an integer >= 1, got {args.runs}")
    if args.smoke:
        args.models, args.runs = ["vit_tiny_patch16_224"], 2
    import timm
    import torch

    import vtp
    torch.set_num_threads(2)
    device = environment.device_name(torch, torch.device("cpu"), cores=True)
    record = records.record_head("plan_time", __file__, argv, smoke=args.smoke, device=device,
                                 packages=("torch", "timm"))
    record["load_average_before"] = os.getloadavg()
    record["results"] = [time_plans(torch, timm, vtp, name, args.flops_target, args.runs, args.seed, args.smoke)
                         for name in args.models]
    record["load_average_after"] = os.getloadavg()
    for r in record["results"]:
        print(f"{r['model']}: first plan {r['first_s']:.3f} s, later plans median {r['median_later_s']:.3f} s "
              f"({', '.join(f'{s:.3f}' for s in r['seconds'])})")
    stem = records.output_stem(args.out, "plan_time", args.smoke, device, None if args.smoke else "cpu")
    records.write_json(stem + ".json", record)
    print(f"wrote {stem}.json")
    return record


if __name__ == "__main__":
    main()
