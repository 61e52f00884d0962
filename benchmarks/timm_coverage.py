"""Which timm ViTs VTP gates, prunes exactly and saves: a record over the model zoo.

For every timm architecture named ``vit_*``, ``deit*``, ``flexivit*``, ``eva*``, ``beit*``,
``samvit*`` or ``naflexvit*`` of tiny to base size (built with ``pretrained=False``, depth 2,
an image of 4 x 4 patches, float64): gates on every site (the paper's four, or with
``--sites ... attn_qk`` also the query/key site), random gate values with some exactly zero
(a dead head, a dead MLP and, with attn_qk, a head with every query/key dim at zero), a
plan removing half the gated dims, physical pruning, and then

* ``exact``: the pruned model equals the gated model with its pruned gates at zero
  (float64, eval mode), with folding on and off;
* ``macs``: the planner's analytic MAC count (vtp/_macs.py) of that plan, and of a
  ``flops_target=0.5`` plan (or one halfway to the ratio plan's MACs where a hybrid's
  convolutional stem puts 0.5 out of reach), equals ``vtp.profile`` of the pruned model;
* ``saved``: ``vtp.save`` + ``vtp.load`` give back the same outputs, bit for bit.

Each architecture ends ``ok``, ``refused`` (a TypeError that names what VTP does not handle),
``mismatch`` (the pruned model is not the masked one: a bug) or ``error`` (anything else: a
bug). Writes benchmarks/results/timm_coverage.json (every architecture, its status and the
message) and prints a table by family::

    python benchmarks/timm_coverage.py                 # all of them, a few minutes on 2 cores
    python benchmarks/timm_coverage.py --only 'eva02*'
    python benchmarks/timm_coverage.py --sites attn_in attn_out mlp_in mlp_hidden attn_qk \
        --out benchmarks/results/timm_coverage_qk.json
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's vtp, not an installed copy

import timm  # noqa: E402
import torch  # noqa: E402

import vtp  # noqa: E402
from vtp._macs import MacCounter  # noqa: E402
from vtp.architectures import QK_SITE, branches, head_dim as model_head_dim, qk_layout  # noqa: E402
from vtp.app.tables import format_table  # noqa: E402
from vtp.atomic import write_json  # noqa: E402

PATTERNS = ("vit_*", "deit*", "flexivit*", "eva*", "beit*", "samvit*", "naflexvit*")
SIZES = re.compile(r"(tiny|small|base|medium|betwixt|little|wee|pico|nano|mini)")
TOO_BIG = re.compile(r"(large|huge|giant|gigantic|so400m|so150m|7b|_l_|_h_|_g_)")


def architectures(only=None):
    names = sorted({n for p in PATTERNS for n in timm.list_models(p)})
    names = [n for n in names if SIZES.search(n) and not TOO_BIG.search(n)]
    if only:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in only)]
    return names


def family(name: str) -> str:
    for prefix in ("deit3", "deit", "eva02", "eva", "beit", "flexivit", "samvit", "naflexvit"):
        if name.startswith(prefix):
            return prefix
    for tag in ("relpos", "rope", "dinov3", "dinov2", "siglip", "clip", "pe_", "_r26", "_r50",
                "resnet", "reg"):
        if tag in name:
            return "vit " + tag.strip("_")
    return "vit"


def _patch(model) -> int:
    """Pixels per token: the patch size, or a hybrid stem's whole stride."""
    embed = getattr(model, "patch_embed", None) or model.embeds
    if getattr(embed, "grid_size", None) is not None and getattr(embed, "img_size", None) is not None:
        return int(embed.img_size[0] // embed.grid_size[0])
    size = embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def build(name: str):
    """Depth 2, an image of 4 x 4 patches, float64, eval mode."""
    try:
        depth = {"depth": 2}
        probe = timm.create_model(name, pretrained=False, **depth)
    except AssertionError:  # per-block settings (lists of one entry per block) fix the depth
        depth = {}
        probe = timm.create_model(name, pretrained=False)
    size = 4 * _patch(probe)
    try:
        model = timm.create_model(name, pretrained=False, img_size=size, **depth)
    except (TypeError, AssertionError):
        model, size = probe, vtp.profile(probe).img_size[0]
    return perturb(model.double().eval()), size


def perturb(model, seed: int = 2):
    """Random noise on every parameter: a zero-initialised head or a layer scale of 1e-5 would
    hide a pruning error behind outputs that barely depend on the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


def randomize(model, seed: int = 0) -> None:
    """Gate values in (0.05, 1.05) with about a tenth exactly zero; the first head of block 0
    (every value dim of it: the head goes) and the MLP hidden features of block 1 all zero;
    with attn_qk gated, every query/key dim of the second head of each block's first
    attention (the head stays, its scores constant)."""
    g = torch.Generator().manual_seed(seed)
    head_dim = model_head_dim(model)
    qk_units = {b.gate_name(QK_SITE): qk_layout(b).units_per_head for b in branches(model) if QK_SITE in b.sites}
    with torch.no_grad():
        for name, gate in vtp.gates(model).items():
            values = torch.rand(gate.shape, generator=g, dtype=torch.float64) + 0.05
            values[torch.rand(gate.shape, generator=g) < 0.1] = 0
            if name.startswith("blocks.0.") and name.endswith("attn_out"):
                values[:head_dim] = 0
            if name.startswith("blocks.1.") and name.endswith("mlp_hidden"):
                values.zero_()
            if name.endswith(QK_SITE) and (name.count(".") == 2 or name.endswith(f".0.{QK_SITE}")):
                units = qk_units[name]
                values[units:2 * units] = 0
            gate.copy_(values)


def masked(model, plan, fold: bool):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, gate in vtp.gates(out).items():
            mask = torch.zeros_like(gate)
            mask[plan.kept[name]] = 1
            gate.copy_(gate * mask if fold else mask)
    return out


def check(name: str, tmp: str, sites=vtp.SITES) -> dict:
    model, size = build(name)
    chans = 3
    x = torch.randn(2, chans, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    try:
        vtp.add_gates(model, sites)
    except TypeError as e:
        return {"status": "refused", "stage": "gate", "message": str(e)}
    randomize(model)
    plan = vtp.plan(model, ratio=0.5)
    worst = 0.0
    pruned = None
    for fold in (True, False):
        try:
            pruned_fold = vtp.prune(model, plan, fold=fold)
        except TypeError as e:
            return {"status": "refused", "stage": "prune", "message": str(e)}
        with torch.no_grad():
            got, want = pruned_fold(x), masked(model, plan, fold)(x)
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
        if fold:
            pruned = pruned_fold
    result = {"pruned_ratio": plan.pruned_ratio, "max_rel_error": worst,
              "macs_dense": vtp.profile(model).macs, "macs_pruned": vtp.profile(pruned).macs}
    # float64, and the two models differ only in summation order
    if not worst <= 1e-9:
        return {**result, "status": "mismatch", "stage": "prune",
                "message": f"pruned != masked gated model (max relative error {worst:.3g})"}
    # The planner's analytic MAC count must be the profile of what it plans.
    # 0.5, or halfway to the ratio plan's MACs where a hybrid's convolutional stem (never
    # pruned) keeps more than half the model's MACs and 0.5 is out of reach
    target = max(0.5, (1 + result["macs_pruned"] / result["macs_dense"]) / 2)
    flops_plan = vtp.plan(model, flops_target=target)
    for what, candidate in (("ratio plan", plan), ("flops_target plan", flops_plan)):
        counted = MacCounter(model)(candidate.kept)
        profiled = vtp.profile(vtp.prune(model, candidate)).macs
        if counted != profiled:
            return {**result, "status": "mismatch", "stage": "macs",
                    "message": f"{what}: analytic MACs {counted} != profile of the pruned model {profiled}"}
    try:
        vtp.save(pruned, os.path.join(tmp, name))
    except TypeError as e:
        return {**result, "status": "refused", "stage": "save", "message": str(e)}
    loaded = vtp.load(os.path.join(tmp, name))
    with torch.no_grad():
        same = torch.equal(loaded(x), pruned(x))
    if not same:
        return {**result, "status": "mismatch", "stage": "load", "message": "loaded != saved model"}
    return {**result, "status": "ok", "stage": "done", "message": ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="fnmatch patterns of names to check")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "timm_coverage.json"),
                        help="the JSON record to write")
    parser.add_argument("--sites", nargs="+", default=list(vtp.SITES), choices=list(vtp.ALL_SITES),
                        help="which sites get gates (default: the paper's four)")
    parser.add_argument("--verbose", action="store_true", help="print every traceback of an error")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    names = architectures(args.only)
    rows = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            try:
                rows[name] = check(name, tmp, tuple(args.sites))
            except Exception as e:  # noqa: BLE001 - the record says what broke, and where
                rows[name] = {"status": "error", "stage": "?", "message": f"{type(e).__name__}: {e}"}
                if args.verbose:
                    traceback.print_exc()
            rows[name].update(family=family(name), seconds=time.perf_counter() - t0)
            print(f"[{i + 1}/{len(names)}] {name}: {rows[name]['status']} {rows[name]['message'][:150]}",
                  flush=True)
    by_family = defaultdict(Counter)
    for name, row in rows.items():
        by_family[row["family"]][row["status"]] += 1
    statuses = ("ok", "refused", "mismatch", "error")
    table = [[fam] + [c[s] for s in statuses] for fam, c in sorted(by_family.items())]
    total = Counter(r["status"] for r in rows.values())
    table.append(["all"] + [total[s] for s in statuses])
    print(format_table(["family"] + list(statuses), table))
    record = {"command": " ".join([sys.executable] + sys.argv), "timm": timm.__version__,
              "torch": torch.__version__, "python": platform.python_version(),
              "sites": list(args.sites), "seconds": time.perf_counter() - start, "counts": dict(total),
              "architectures": rows}
    write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
