"""``vtp.latency_table``: measure a model's latency table on the device it will run on, or
read it from the cache; ``vtp.model_widths``: what a (dense, gated or pruned) model executes.

The table (``vtp/latency_model.py``) is measured once per distinct block shape, not per
block: every sub-layer at the widths a plan can give it, on the device, at the batch size,
dtype (fp32, or the autocast dtype), thread count and image size given. Every probe runs
in every round, the rounds in a fresh random order each (interleaved: a slow spell of the
machine spreads over all probes instead of biasing some), after a warm-up round; the table
holds medians. A probe faster than ``_MIN_SAMPLE_MS`` runs several times per sample. The
CPU is timed with ``perf_counter``, CUDA with CUDA events.

Cache: ``$VTP_CACHE`` (default ``~/.cache/vtp``), ``latency-<hash>.json``, the hash of the
key (device name, torch version, dtype, batch, threads, image size, shapes, grid), the key
also stored inside. A file whose key, format version or content does not hold up is
measured again (with a warning), never trusted; files are written through ``vtp.atomic``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import random
import statistics
import time
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block

import vtp_kernels

from ._gates import add_gates, gates
from ._profile import check_img_size, default_img_size, num_tokens, size_pair
from ._prune import prune, structure_copy
from .pruning_plan import PruningPlan
from .atomic import write_json
from .latency_model import FORMAT, BlockShape, BlockWidths, Curve, Grid2, LatencyTable, ShapeTable
from .modules import ConstantBranch, GatedLinear, KeptLayerNorm, PrunedAttention

__all__ = ["latency_table", "model_widths", "check_device", "block_shapes", "width_grid", "cache_path", "DTYPES"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
GRID_STEP = 8       # the finest width step measured: GEMMs run in multiples of 8 or more
_MIN_SAMPLE_MS = 1.0  # a probe faster than this runs several times per sample
_SEED = 0
# Besides the dense model, the table is calibrated on models keeping these shares of every
# gate's dims: the sum of the parts and the whole-model time are fitted along a line.
CALIBRATION_SHARES = (0.5, 0.25)


# ---------------------------------------------------------------------------------------------
# Arguments


def _check_args(model: nn.Module, batch_size, device, dtype, threads, repeats) -> Tuple[torch.device, torch.dtype, int]:
    """Every argument checked before anything is measured: a ``ValueError`` naming it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected an integer >= 1 (or None: torch's current count), got {threads!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an integer >= 1, got {repeats!r}")
    if dtype is None:
        dt = torch.float32
    elif isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        dt = dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")
    if device is None:
        ref = next(iter(model.parameters()), None)
        dev = ref.device if ref is not None and ref.device.type != "meta" else torch.device("cpu")
        if dev.type == "cuda":
            dev = check_device(dev)
    else:
        dev = check_device(device)
    if dev.type == "cpu" and dt == torch.float16:
        raise ValueError("dtype: float16 autocast is a CUDA dtype; on the CPU use float32 or bfloat16")
    return dev, dt, threads if threads is not None else torch.get_num_threads()


def check_device(device) -> torch.device:
    """``device`` as the torch device a table is measured on ('cpu' or an existing CUDA
    device, with its index); a ``ValueError`` naming ``device`` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:<index>', got {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but this machine has no CUDA device")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise ValueError(f"device: latency tables are measured on 'cpu' or 'cuda', got {str(dev)!r}")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ---------------------------------------------------------------------------------------------
# Structure


def _dense_source(model: nn.Module) -> nn.Module:
    """The dense structure a model comes from: itself, or what ``vtp.prune`` pruned it from."""
    pruned_from = getattr(model, "vtp_pruned_from", None)
    return pruned_from.dense if pruned_from is not None else model


def _blocks(model: nn.Module) -> List[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks) or \
            getattr(model, "patch_embed", None) is None:
        raise TypeError(f"model: expected a timm VisionTransformer with a 'blocks' sequence, got {type(model).__name__}")
    return list(blocks)


def block_shapes(model: nn.Module, img_size=None) -> List[BlockShape]:
    """The dense shape of each block of ``model`` (dense, gated or pruned): what its latency
    table is measured for. Covers timm's pre-norm ``Block`` with ``Attention`` and a plain
    ``Mlp`` behind LayerNorms; anything else is a ``TypeError`` naming the module."""
    source = _dense_source(model)
    size = size_pair(img_size) if img_size is not None else default_img_size(source)
    tokens = num_tokens(source, size)
    shapes = []
    for i, block in enumerate(_blocks(source)):
        where = f"model.blocks[{i}]"
        if type(block) is not Block:
            raise TypeError(f"{where}: latency tables cover timm's pre-norm Block, got {type(block).__name__}")
        if type(block.attn) is not Attention or getattr(block.attn, "norm", nn.Identity()).__class__ is not nn.Identity \
                or not isinstance(block.attn.q_norm, nn.Identity):
            raise TypeError(f"{where}.attn: latency tables cover timm's Attention without q/k or output norms, "
                            f"got {type(block.attn).__name__}")
        if type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity):
            raise TypeError(f"{where}.mlp: latency tables cover timm's plain Mlp (no GLU, no hidden norm), "
                            f"got {type(block.mlp).__name__}")
        for norm in ("norm1", "norm2"):
            if not isinstance(getattr(block, norm), nn.LayerNorm):
                raise TypeError(f"{where}.{norm}: latency tables cover LayerNorm, "
                                f"got {type(getattr(block, norm)).__name__}")
        ls = [isinstance(block.ls1, LayerScale), isinstance(block.ls2, LayerScale)]
        if any(not isinstance(getattr(block, n), (nn.Identity, LayerScale)) for n in ("ls1", "ls2")):
            raise TypeError(f"{where}: unknown layer scale {type(block.ls1).__name__}")
        shapes.append(BlockShape(embed=block.norm1.normalized_shape[0], heads=block.attn.num_heads,
                                 head_dim=block.attn.head_dim, hidden=block.mlp.fc1.out_features, tokens=tokens,
                                 act=repr(block.mlp.act), layer_scale=all(ls)))
    return shapes


def model_widths(model: nn.Module) -> Tuple[BlockWidths, ...]:
    """What each block of ``model`` (dense, gated or pruned by ``vtp.prune``) executes: the
    structure ``LatencyTable.predict`` takes. A gated model executes its dense widths."""
    out = []
    for i, block in enumerate(_blocks(model)):
        where = f"model.blocks[{i}]"
        attn, mlp = block.attn, block.mlp
        if isinstance(attn, ConstantBranch):
            a = BlockWidths(0, (), (), (), 0, 0)
        elif isinstance(attn, PrunedAttention):
            if (attn.in_index is not None or attn.gate is not None or not isinstance(attn.norm, nn.Identity)
                    or attn.qk_full_rows):
                raise TypeError(f"{where}.attn: latency tables cover PrunedAttention without in_index, "
                                "output gate, output norm or q/k norm")
            qk = attn.qk_dim // attn.num_heads  # queries and keys: one width for all heads of a block
            # the values' width in attention: a padded V's rows per head, or a packed V's widest
            v_run = attn.v_head_width if attn.v_layout == "padded" else max(attn.v_widths)
            a = BlockWidths(attn.qkv.in_features, (qk,) * attn.num_heads, (v_run,) * attn.num_heads,
                            tuple(attn.v_widths), 0, 0, v_layout=attn.v_layout)
        elif isinstance(attn, Attention):
            d = (attn.head_dim,) * attn.num_heads
            a = BlockWidths(attn.qkv.in_features, d, d, d, 0, 0)
        else:
            raise TypeError(f"{where}.attn: expected timm's Attention, PrunedAttention or ConstantBranch, "
                            f"got {type(attn).__name__}")
        if isinstance(mlp, ConstantBranch):
            mlp_in, hidden = 0, 0
        elif isinstance(mlp, Mlp) and isinstance(mlp.fc1, nn.Linear):
            mlp_in, hidden = mlp.fc1.in_features, mlp.fc1.out_features
        else:
            raise TypeError(f"{where}.mlp: expected timm's Mlp or ConstantBranch, got {type(mlp).__name__}")
        for norm in ("norm1", "norm2"):
            if not isinstance(getattr(block, norm), (nn.LayerNorm, KeptLayerNorm, nn.Identity)):
                raise TypeError(f"{where}.{norm}: expected a LayerNorm or KeptLayerNorm, "
                                f"got {type(getattr(block, norm)).__name__}")
        out.append(BlockWidths(a.attn_in, a.qk_widths, a.v_widths, a.v_kept, mlp_in, hidden, a.v_layout))
    return tuple(out)


def _timing_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The dense model, plain (no gates), with random weights on ``device``: what the table
    is calibrated against. Made from the structure alone, so a pruned model's dense
    origin (kept on the meta device) can be timed too."""
    m = structure_copy(_dense_source(model))
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GatedLinear):
                setattr(parent, name, nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                                device="meta"))
    return _materialize(m, device)


def _without_blocks(model: nn.Module) -> nn.Module:
    """``model`` sharing every part but its blocks, which it has none of: its fixed parts."""
    fixed = nn.Module.__new__(type(model))
    fixed.__dict__ = dict(model.__dict__)
    fixed._modules = dict(model._modules)
    fixed.blocks = nn.Sequential()
    return fixed


def _uniformly_pruned(dense: nn.Module, share: float, step: int) -> nn.Module:
    """``dense`` pruned by ``vtp.prune`` to keep ``share`` of every gate's dims (of every
    head's values), rounded to ``step``: a calibration model."""
    gated = add_gates(copy.deepcopy(dense))
    head_dim = dense.blocks[0].attn.head_dim
    kept, sizes = {}, {}
    for name, gate in gates(gated).items():
        size = sizes[name] = gate.numel()
        if name.endswith((".attn_out", ".attn_qk")):  # per-head sites: every head keeps the share
            width = min(head_dim, max(step, round(head_dim * share / step) * step))
            kept[name] = [h * head_dim + i for h in range(size // head_dim) for i in range(width)]
        else:
            kept[name] = list(range(min(size, max(step, round(size * share / step) * step))))
    return prune(gated, PruningPlan(kept=kept, sizes=sizes, head_dim=head_dim), fold=False).eval()


def _materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """A meta-device model (the dense structure) on ``device`` with random weights: timing
    needs no trained ones."""
    model = model.to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(_SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for b in model.buffers():  # the blocks a table covers hold none; zeros time as well as any
            b.zero_()
    return model.float().eval()


# ---------------------------------------------------------------------------------------------
# Grids


def width_grid(full: int, step: int = GRID_STEP) -> List[int]:
    """The widths a sub-layer of ``full`` width is measured at: every ``step`` up to 32 steps,
    every 2 steps up to 128, every 4 beyond (the relative step stays under ~3 %, and the
    64-wide steps of the hardware stay visible everywhere), the full width, and a few odd
    widths just below multiples of 64 that show what a ragged width costs."""
    widths = {1, full}
    w, stride = step, step
    while w < full:
        widths.add(w)
        stride = step if w < 32 * step else 2 * step if w < 128 * step else 4 * step
        w += stride
    for m in (64, (full // 2) // 64 * 64, full // 64 * 64):
        for odd in (m - 1, m - 4):
            if 1 < odd < full:
                widths.add(odd)
    return sorted(widths)


def _coarse(full: int, count: int, step: int = GRID_STEP) -> List[int]:
    return sorted({max(step, round(full * i / count / step) * step) for i in range(1, count)} | {full})


# ---------------------------------------------------------------------------------------------
# Timing


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object], inner: int) -> float:
        """ms per call of ``fn``, over ``inner`` calls."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner


def _run_interleaved(probes: Dict[str, Callable[[], object]], timer: _Timer, repeats: int) -> Dict[str, List[float]]:
    """ms samples of every probe: a warm-up round (one timed call each, which also sets how
    many calls make one sample), then ``repeats`` rounds, each over every probe in a fresh
    random order."""
    inner = {}
    for name, fn in probes.items():
        if timer.cuda:  # a first call on CUDA also picks kernels for the shape: not a sample
            fn()
        inner[name] = max(1, min(64, math.ceil(_MIN_SAMPLE_MS / max(timer(fn, 1), 1e-6))))
    samples: Dict[str, List[float]] = {name: [] for name in probes}
    order, rng = list(probes), random.Random(_SEED)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            samples[name].append(timer(probes[name], inner[name]))
    return samples


class _Buffers:
    """Random inputs and weights as contiguous views of shared flat buffers: a probe of any
    width costs no memory of its own."""

    def __init__(self, size: int, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(_SEED)
        self.x = torch.randn(size, generator=g).to(device)
        self.w = (torch.randn(size, generator=g) * 0.02).to(device)

    def act(self, *shape: int) -> torch.Tensor:
        return self.x[:math.prod(shape)].view(*shape)

    def weight(self, *shape: int) -> torch.Tensor:
        return self.w[:math.prod(shape)].view(*shape)


def _shape_probes(s: BlockShape, batch: int, buf: _Buffers, act: nn.Module, step: int) -> Dict[str, Callable]:
    """Every probe of one block shape, named ``<part>/<widths>``."""
    B, N, E, H, D, M = batch, s.tokens, s.embed, s.heads, s.head_dim, s.hidden
    device = buf.x.device
    probes: Dict[str, Callable] = {}

    def linear(k: int, n: int) -> Callable:
        x, w, b = buf.act(B, N, k), buf.weight(n, k), buf.w[:n]
        return lambda: F.linear(x, w, b)

    for kind, k_full, n_full in (("qkv", E, 3 * E), ("proj", E, E), ("fc1", E, M), ("fc2", M, E)):
        for k in width_grid(k_full, step):
            probes[f"{kind}_in/{k}"] = linear(k, n_full)
        if kind in ("qkv", "fc1"):
            for n in width_grid(n_full, step):
                probes[f"{kind}_out/{n}"] = linear(k_full, n)
            for k in _coarse(k_full, 4, step)[:-1]:
                for n in _coarse(n_full, 4, step)[:-1]:
                    probes[f"{kind}_2d/{k},{n}"] = linear(k, n)

    def attention(h: int, qk: int, v: int) -> Callable:
        qkv, scale = buf.act(B, N, h * (2 * qk + v)), D ** -0.5

        def run():  # what PrunedAttention does between qkv and the gather of the kept values
            q = qkv[..., : h * qk].view(B, N, h, qk).transpose(1, 2)
            k = qkv[..., h * qk: 2 * h * qk].view(B, N, h, qk).transpose(1, 2)
            vv = qkv[..., 2 * h * qk:].view(B, N, h, v).transpose(1, 2)
            # the narrower side padded with zeros, as vtp_kernels' reference runs it: the
            # fused kernels take one width
            if qk < v:
                q, k = F.pad(q, (0, v - qk)), F.pad(k, (0, v - qk))
            elif v < qk:
                vv = F.pad(vv, (0, qk - v))
            out = F.scaled_dot_product_attention(q, k, vv, scale=scale).transpose(1, 2)
            return out[..., :v].reshape(B, N, h * v)
        return run

    head_widths = sorted(set(range(step, D + 1, step)) | {D})
    for qk in head_widths:
        for v in head_widths:
            probes[f"attn/{qk},{v}"] = attention(H, qk, v)
    for h in range(1, H + 1):
        probes[f"attn_heads/{h}"] = attention(h, D, D)

    gen = torch.Generator(device="cpu").manual_seed(_SEED)

    def kept_index(k: int, full: int) -> torch.Tensor:
        return torch.randperm(full, generator=gen)[:k].sort().values.to(device)

    padded = buf.act(B, N, H * D)
    for total in _coarse(H * D, 16, step):
        cols = kept_index(total, H * D).expand(B, N, total)
        probes[f"v_gather/{total}"] = (lambda c: lambda: torch.gather(padded, -1, c))(cols)
    x_e, y_e = buf.act(B, N, E), buf.weight(B, N, E)
    ln_w, ln_b = buf.w[:E], buf.w[E: 2 * E]
    probes["norm"] = lambda: F.layer_norm(x_e, (E,), ln_w, ln_b, 1e-6)
    for k in _coarse(E, 16, step):
        idx = kept_index(k, E)
        probes[f"norm_gather/{k}"] = (lambda i: lambda: vtp_kernels.layer_norm_gather(x_e, i, ln_w[:i.numel()],
                                                                                  ln_b[:i.numel()], 1e-6))(idx)
    for h in _coarse(M, 16, step):
        probes[f"act/{h}"] = (lambda x: lambda: act(x))(buf.act(B, N, h))
    probes["add"] = lambda: x_e + y_e
    probes["scale"] = lambda: x_e * ln_w
    return probes


def _shape_table(s: BlockShape, ms: Dict[str, float]) -> ShapeTable:
    """A ShapeTable from the medians of one shape's probes (names without the shape prefix)."""
    by_part: Dict[str, Dict[str, float]] = {}
    for name, t in ms.items():
        part, _, widths = name.partition("/")
        by_part.setdefault(part, {})[widths] = t
    curves = {}
    for part, points in by_part.items():
        if part in ("qkv_2d", "fc1_2d", "attn") or not next(iter(points)):
            continue
        ws = sorted(points, key=int)
        curves[part] = Curve([int(w) for w in ws], [points[w] for w in ws], align=1 if part == "attn_heads" else GRID_STEP)
    grids = {}
    pairs = {k: tuple(int(v) for v in k.split(",")) for k in by_part["attn"]}
    ws = sorted({p[0] for p in pairs.values()})
    grids["attn"] = Grid2(ws, ws, [[by_part["attn"][f"{a},{b}"] for b in ws] for a in ws])
    curves["attn_diag"] = Curve(ws, [by_part["attn"][f"{w},{w}"] for w in ws])
    for kind in ("qkv", "fc1"):
        points = {tuple(int(v) for v in p.split(",")): t for p, t in by_part[f"{kind}_2d"].items()}
        ks, ns = sorted({k for k, _ in points}), sorted({n for _, n in points})
        grids[f"{kind}_2d"] = Grid2(ks, ns, [[points[k, n] for n in ns] for k in ks])
    scalars = {"norm": by_part["norm"][""], "add": by_part["add"][""], "scale": by_part["scale"][""]}
    return ShapeTable(s, curves, grids, scalars)


# ---------------------------------------------------------------------------------------------
# The public function


def _fixed_description(model: nn.Module) -> dict:
    pe = model.patch_embed
    return {"class": type(model).__name__,
            "architecture": str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")),
            "in_chans": int(getattr(pe.proj, "in_channels", 0)), "patch": list(size_pair(pe.patch_size)),
            "embed": int(model.embed_dim), "prefix_tokens": int(model.num_prefix_tokens),
            "classes": int(model.num_classes), "pool": str(model.global_pool)}


def cache_dir() -> Path:
    return Path(os.environ.get("VTP_CACHE") or Path.home() / ".cache" / "vtp")


def cache_path(key: dict, directory: Optional[Union[str, os.PathLike]] = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory if directory is not None else cache_dir()) / f"latency-{digest}.json"


def _read_cache(path: Path, key: dict) -> Optional[LatencyTable]:
    """The table cached at ``path`` if it holds up; None (with a warning saying why) if the
    file is stale or damaged, so that the caller measures again."""
    if not path.exists():
        return None
    try:
        table = LatencyTable.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if table.key != key:
            raise ValueError("it was measured for another key")
        return table
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        warnings.warn(f"latency table cache {path} is stale or damaged ({e}): measuring again", stacklevel=3)
        return None


def latency_table(model: nn.Module, batch_size: int = 8, *, device=None, dtype=None, threads: Optional[int] = None,
                  img_size=None, repeats: int = 3, cache: bool = True,
                  cache_dir: Optional[Union[str, os.PathLike]] = None) -> LatencyTable:
    """The latency table of ``model``'s structure on ``device`` (default: the model's), at
    ``batch_size`` images of ``img_size`` (default: the model's), in ``dtype`` ("float32",
    or the autocast dtype: "bfloat16", "float16" on CUDA) with ``threads`` CPU threads
    (default: torch's current count). ``model`` may be dense, gated or pruned: the table is
    that of its dense structure, so one table serves every plan of it.

    Read from the cache (``cache_dir``, default ``$VTP_CACHE`` or ``~/.cache/vtp``) when a
    file there holds the same key; else measured (``repeats`` interleaved rounds, medians)
    and written there. ``cache=False`` neither reads nor writes.
    """
    dev, dt, threads = _check_args(model, batch_size, device, dtype, threads, repeats)
    size = size_pair(img_size) if img_size is not None else default_img_size(_dense_source(model))
    check_img_size(_dense_source(model), size)
    shapes = block_shapes(model, size)
    key = {"format": FORMAT, "device_type": dev.type, "device": device_name(dev), "torch": torch.__version__,
           "dtype": str(dt).replace("torch.", ""), "batch_size": batch_size, "threads": threads,
           "img_size": list(size), "model": _fixed_description(_dense_source(model)),
           "blocks": [s.name for s in shapes], "grid_step": GRID_STEP}
    path = cache_path(key, cache_dir)
    if cache:
        table = _read_cache(path, key)
        if table is not None:
            return table
    table = _measure(model, key, shapes, dev, dt, threads, batch_size, size, repeats)
    if cache:
        write_json(path, table.to_dict())
    return table


def _measure(model, key, shapes: Sequence[BlockShape], dev, dt, threads, batch, size, repeats) -> LatencyTable:
    start = time.perf_counter()
    dense = _timing_model(model, dev)
    fixed = _without_blocks(dense)
    unique = {s.name: (s, i) for i, s in reversed(list(enumerate(shapes)))}
    largest = max(batch * s.tokens * max(3 * s.embed, s.hidden) + s.embed * max(3 * s.embed, s.hidden)
                  for s in shapes)
    buf = _Buffers(largest, dev)
    probes: Dict[str, Callable] = {}
    for name, (s, i) in unique.items():
        act = dense.blocks[i].mlp.act
        probes.update({f"{name}|{p}": fn for p, fn in _shape_probes(s, batch, buf, act, GRID_STEP).items()})
    images = torch.randn(batch, key["model"]["in_chans"], *size, generator=torch.Generator().manual_seed(_SEED)).to(dev)
    probes["model|fixed"] = lambda: fixed(images)
    calibration = {"dense": dense}
    calibration.update({f"keep{share}": _uniformly_pruned(dense, share, GRID_STEP) for share in CALIBRATION_SHARES})
    for name, m in calibration.items():
        probes[f"model|{name}"] = (lambda m: lambda: m(images))(m)
    saved_threads = torch.get_num_threads()
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(dev.type, dtype=dt) if dt != torch.float32 else nullcontext())
        torch.set_num_threads(threads)
        try:
            samples = _run_interleaved(probes, _Timer(dev), repeats)
        finally:
            torch.set_num_threads(saved_threads)
    ms = {name: statistics.median(v) for name, v in samples.items()}
    tables = {}
    for name in unique:
        prefix = f"{name}|"
        tables[name] = _shape_table(unique[name][0], {p[len(prefix):]: t for p, t in ms.items() if p.startswith(prefix)})
    measured = {"repeats": repeats, "probes": len(probes), "wall_s": round(time.perf_counter() - start, 2),
                "fixed_samples_ms": samples["model|fixed"], "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    points = [{"widths": [w.to_dict() for w in model_widths(m)], "ms": ms[f"model|{name}"],
               "samples": samples[f"model|{name}"]} for name, m in calibration.items()]
    return LatencyTable(key, tables, [s.name for s in shapes], ms["model|fixed"], points, measured)
