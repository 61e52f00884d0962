"""How close the latency table's prediction comes to the measured latency of pruned models.

    python benchmarks/latency_check.py                       # DeiT-S, batch 8, 2 threads, 6 random plans
    python benchmarks/latency_check.py --model deit_base_patch16_224 --plans 6
    python benchmarks/latency_check.py --smoke               # a tiny ViT, seconds (the test suite runs it)

Measures the model's latency table (``vtp.latency_table``; cached under ``$VTP_CACHE``, or
``--cache-dir``), then for random plans (random gates, the pruned share and ``round_to``
drawn per plan) prunes the model, predicts its latency from the table and times it whole,
interleaved with the dense model (a warm-up, then ``--repeats`` rounds of dense and pruned in
turns, medians). Two errors per plan: of the predicted latency against the measured one
(``error``), and of the predicted speed ratio pruned/dense against the measured ratio
(``ratio_error``, which cancels a machine that got faster or slower since the table was
measured). The measured ratio is also taken paired (``paired_ratio``, by the planner's own
``paired_share``: the median over rounds of pruned / dense of the same round, with its
quartiles), which cancels the machine's drift
within the run too; the summary's ratio errors are those of the paired ratio
(``paired_ratio_error``), the errors of the ratio of medians kept beside them. Writes ``latency_check_<device>.json`` (every raw time) and two pictures:
the table's staircase and the first plan's predicted per-block latency.
"""
from __future__ import annotations

import copy
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS, arguments, environment, records  # noqa: E402
import bench_model  # noqa: E402

# The latency target of the smoke runs (here, in gpu_check, latency_target_cpu and
# latency_accuracy): a tiny ViT's patch embedding and head are about half its time, so its
# floor sits near 0.5 and a lower target can be out of reach.
SMOKE_TARGET = 0.9


def _parse(argv):
    p = arguments.parser(__doc__)
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plans", type=int, default=6, help="number of random plans")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5, 0.65],
                   help="pruned shares of all gated dims a plan draws from")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds of dense and pruned per plan")
    p.add_argument("--table-repeats", type=int, default=5, help="interleaved rounds of the table's probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="latency table cache (default: $VTP_CACHE or ~/.cache/vtp)")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON record and the pictures")
    p.add_argument("--smoke", action="store_true", help="a tiny ViT at batch 2, one thread, 2 plans: checks the "
                                                        "script, measures nothing worth keeping")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.threads, args.plans = 2, 1, min(args.plans, 2)
        args.repeats, args.table_repeats = min(args.repeats, 2), min(args.table_repeats, 2)
    for flag in ("batch_size", "threads", "plans", "repeats", "table_repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: expected an integer >= 1, got {getattr(args, flag)}")
    if any(not 0 <= r < 1 for r in args.ratios):
        p.error(f"--ratios: expected shares in [0, 1), got {args.ratios}")
    return args


def _model(args):
    import timm
    from timm.models.vision_transformer import VisionTransformer
    if args.smoke:
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    return timm.create_model(args.model, pretrained=False)


def _time_pair(torch, dense, pruned, images, repeats):
    """ms samples of the dense and the pruned model, timed in turns after one warm-up each."""
    samples = {"dense": [], "pruned": []}
    models = {"dense": dense, "pruned": pruned}
    with torch.inference_mode():
        for m in models.values():
            m(images)
        for r in range(repeats):
            for name in (("dense", "pruned") if r % 2 == 0 else ("pruned", "dense")):
                t0 = time.perf_counter()
                models[name](images)
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def main(argv=None):
    args = _parse(argv)
    import torch
    import vtp
    from vtp._latency_measure import paired_share

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dense = _model(args).eval()
    device = environment.device_name(torch, torch.device("cpu"), cores=True)
    t0 = time.perf_counter()
    table = vtp.latency_table(dense, args.batch_size, threads=args.threads, repeats=args.table_repeats,
                              cache_dir=args.cache_dir)
    table_s = time.perf_counter() - t0
    images = torch.randn(args.batch_size, 3, *table.key["img_size"])
    rng = random.Random(args.seed)
    plans = []
    for i in range(args.plans):
        ratio, round_to = rng.choice(args.ratios), rng.choice([8, 8, 16, 1])
        gated = vtp.add_gates(copy.deepcopy(dense))
        g = torch.Generator().manual_seed(args.seed * 1000 + i)
        with torch.no_grad():
            for gate in vtp.gates(gated).values():
                gate.copy_(torch.rand(gate.shape, generator=g) + 0.05)
        plan = vtp.plan(gated, ratio=ratio, round_to=round_to)
        pruned = vtp.prune(gated, plan).eval()
        widths = vtp.model_widths(pruned)
        predicted = table.predict(widths)
        samples = _time_pair(torch, dense, pruned, images, args.repeats)
        measured = {k: statistics.median(v) for k, v in samples.items()}
        predicted_ratio = predicted / table.dense_ms
        measured_ratio = measured["pruned"] / measured["dense"]
        paired = paired_share(samples["pruned"], samples["dense"])
        plans.append({"ratio": ratio, "round_to": round_to, "widths": [w.to_dict() for w in widths],
                      "predicted_ms": predicted, "measured_ms": measured["pruned"],
                      "dense_measured_ms": measured["dense"], "samples_ms": samples,
                      "error": predicted / measured["pruned"] - 1,
                      "predicted_ratio": predicted_ratio, "measured_ratio": measured_ratio,
                      "ratio_error": predicted_ratio / measured_ratio - 1, "paired_ratio": paired,
                      "paired_ratio_error": predicted_ratio / paired["median"] - 1})
        print(f"plan {i}: prune {ratio:.2f}, round_to {round_to}: predicted {predicted:.1f} ms, measured "
              f"{measured['pruned']:.1f} ms ({plans[-1]['error']:+.1%}); ratio {predicted_ratio:.3f} predicted, "
              f"{measured_ratio:.3f} measured ({plans[-1]['ratio_error']:+.1%}), paired {paired['median']:.3f} "
              f"({plans[-1]['paired_ratio_error']:+.1%})")
        if i == 0:
            first_widths = widths
    stem = records.output_stem(args.out, "latency_check", args.smoke, device)
    record = records.record_head("latency_check", __file__, argv, smoke=args.smoke, device=device,
                                packages=("python", "torch", "timm"))
    record.update({
        "model": "tiny ViT (smoke)" if args.smoke else args.model, "batch_size": args.batch_size,
        "threads": args.threads, "table": {"key": table.key, "measured": table.measured,
                                           "seconds_this_run": round(table_s, 2), "offset_ms": table.offset,
                                           "slope": table.slope, "dense_ms": table.dense_ms,
                                           "calibration": table.calibration},
        "plans": plans,
        "summary": {"max_abs_error": max(abs(p["error"]) for p in plans),
                    "mean_abs_error": statistics.mean(abs(p["error"]) for p in plans),
                    "ratio": "paired: median over rounds of pruned / dense of the same round",
                    "max_abs_ratio_error": max(abs(p["paired_ratio_error"]) for p in plans),
                    "mean_abs_ratio_error": statistics.mean(abs(p["paired_ratio_error"]) for p in plans),
                    "max_abs_ratio_error_of_medians": max(abs(p["ratio_error"]) for p in plans),
                    "mean_abs_ratio_error_of_medians": statistics.mean(abs(p["ratio_error"]) for p in plans)},
    })
    records.write_json(stem + ".json", record)
    vtp.plot_latency_table(table, stem + "_table.png")
    vtp.plot_block_latency(table, first_widths, stem + "_blocks.png", label="plan 0")
    s = record["summary"]
    print(f"table in {table_s:.1f} s; |error| max {s['max_abs_error']:.1%} mean {s['mean_abs_error']:.1%}; "
          f"|paired ratio error| max {s['max_abs_ratio_error']:.1%} mean {s['mean_abs_ratio_error']:.1%}")
    print(f"wrote {stem}.json, {stem}_table.png, {stem}_blocks.png")
    return record


def target_check(torch, device, *, model: str, smoke: bool, batch: int, amp, target: float, compile_backend: str,
                 record: dict, save) -> None:
    """gpu_check's latency_target step: ``model``'s latency table measured on ``device``
    (CUDA events on a GPU; two interleaved rounds, one in --smoke) at ``batch`` in ``amp``, a
    plan to ``target`` of the dense model's predicted latency, and the pruned model timed
    against the dense one (bench_model.measure): measured share against predicted, in
    ``record`` (``save()`` after each part). The plan is vtp.plan's default: the table's plan,
    timed whole on ``device`` (CUDA events) and planned again if it misses (``refine``); the
    share it measured is recorded beside the one timed here afterwards."""
    import tempfile

    import vtp

    dense, gated = bench_model.dense_and_gated(torch, model, device, 0)
    amp_dtype = None if amp == torch.float32 else amp
    record.update(model="tiny_vit" if smoke else model, batch=batch, amp=str(amp), target=target)
    with tempfile.TemporaryDirectory() as cache:
        start = time.monotonic()
        table = vtp.latency_table(gated, batch, device=device, dtype=amp_dtype, repeats=1 if smoke else 2,
                                  cache_dir=cache)
        record.update(table_s=time.monotonic() - start, table_key=table.key, table_measured=table.measured)
        save()
        start = time.monotonic()
        plan = vtp.plan(gated, latency_target=target, batch_size=batch, table=table)
        record.update(plan_s=time.monotonic() - start, plan=plan.rule)
    small = vtp.prune(gated, plan).to(device).eval()
    timed = dict(batch=batch, amp_dtype=amp_dtype, compiled=False, compile_backend=compile_backend,
                 warmup=0 if smoke else 3, iters=1 if smoke else 10, rounds=2)
    results = {name: bench_model.measure(torch, m, "infer", device, **timed) for name, m in (("dense", dense),
                                                                                             ("pruned", small))}
    lat = plan.rule["latency"]
    record.update(results=[{"model": name, **r} for name, r in results.items()],
                  measured_share=results["pruned"]["median_ms"] / results["dense"]["median_ms"],
                  predicted_share=lat["predicted_share"], plan_measured_share=lat.get("measured_share"),
                  table_predicted_share=lat["rounds"][0]["predicted_share"] if lat.get("rounds") else
                  lat["predicted_share"],
                  pruned_measured_over_predicted=results["pruned"]["median_ms"] / lat["predicted_ms"])
    save()


if __name__ == "__main__":
    main()
