"""Triton layer_norm_gather against its reference, forward and backward, under the interpreter.

The reference always runs in fp32 on the (upcast) inputs the kernel saw, so for fp16 the
comparison measures the kernel's error, not the reference's.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

import vtp_kernels
from layouts import layouts_for, with_layout
from vtp_kernels import reference
from vtp_kernels._utils import poison_outputs
from scripts import load_script

# Held before any kernel module is imported: see test_public_op_survives_kernel_import.
layer_norm_gather = vtp_kernels.layer_norm_gather


@pytest.fixture(autouse=True)
def _restore_public_op():
    # Until vtp_kernels stops shadowing its public op with the kernel module, put the
    # function back so test files that run after this one still see it.
    yield
    vtp_kernels.layer_norm_gather = layer_norm_gather

# Tolerances (|got - ref| <= atol + rtol * |ref|):
# fp32: the kernel and the reference sum the same terms in a different order; 40-term row
#   statistics differ by a few ulp, and the 111-row dweight/dbias sums (terms up to ~10) by
#   ~sqrt(M) * eps32 * sum|terms| ~ 1e-5, hence the looser atol on parameter gradients.
# fp16: everything is computed in fp32 and rounded once on store, so the error is at most
#   half an fp16 ulp (2**-11 ~ 4.9e-4 relative) plus the fp32 noise above.
TOL = {
    torch.float32: dict(out=(1e-5, 1e-5), param=(1e-5, 1e-4)),
    torch.float16: dict(out=(1e-3, 1e-5), param=(1e-3, 1e-4)),
}
D = 40
SHAPE = (3, 37, D)  # M = 111 rows: not a multiple of any block; D not a power of two


def _inputs(dtype, k, affine, shape=SHAPE, d=D):
    """Random x with a non-zero mean and non-unit scale, sorted distinct kept columns, affine params."""
    x = (3.0 + 2.5 * torch.randn(shape)).to(dtype)
    index = torch.randperm(d)[:k].sort().values
    weight = (1.0 + 0.5 * torch.randn(k)).to(dtype) if affine in ("weight", "both") else None
    bias = torch.randn(k).to(dtype) if affine in ("bias", "both") else None
    return x, index, weight, bias


def _fwd_bwd(fn, x, index, weight, bias, dy, upcast=False):
    """Output and (dx, dweight, dbias) of fn; with upcast, on fp32 copies of the inputs."""
    leaves = [t if t is None else (t.float() if upcast else t).detach().requires_grad_() for t in (x, weight, bias)]
    y = fn(leaves[0], index, leaves[1], leaves[2])
    y.backward(dy.float() if upcast else dy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _check(got, want, dtype, kind):
    rtol, atol = TOL[dtype][kind]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)


def _compare(x, index, weight, bias, dtype, dy=None):
    if dy is None:
        dy = torch.randn(*x.shape[:-1], len(index)).to(dtype)
    # Every buffer the kernels allocate starts as NaN: an element left unwritten fails.
    with vtp_kernels.use_backend("triton"), poison_outputs():
        y, grads = _fwd_bwd(layer_norm_gather, x, index, weight, bias, dy)
    y_ref, grads_ref = _fwd_bwd(reference.layer_norm_gather, x, index, weight, bias, dy, upcast=True)
    _check(y, y_ref, dtype, "out")
    _check(grads[0], grads_ref[0], dtype, "out")
    for got, want in zip(grads[1:], grads_ref[1:]):
        assert (got is None) == (want is None)
        if got is not None:
            _check(got, want, dtype, "param")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("k", [13, D, 1, 0], ids=["k13", "kD", "k1", "k0"])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_matches_reference(dtype, k, affine):
    _compare(*_inputs(dtype, k, affine), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d, k", [(1, 1), (7, 3), (8, 8), (64, 24), (200, 199)],
                         ids=["d1", "odd", "d8", "multiple_of_8", "wide_odd"])
def test_widths(d, k, dtype):
    _compare(*_inputs(dtype, k, "both", shape=(5, 9, d), d=d), dtype)


LAYOUT_CASES = [(name, layout) for name, rank in (("x", 3), ("weight", 1), ("bias", 1), ("index", 1), ("dy", 3))
                for layout in layouts_for(rank)
                if layout != "contiguous" and not (name == "index" and layout == "expanded")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, layout", LAYOUT_CASES, ids=[f"{n}-{lay}" for n, lay in LAYOUT_CASES])
def test_every_layout_of_every_input(name, layout, dtype):
    # One input at a time in a non-default layout (an expanded index would repeat columns,
    # which the op does not accept), the others contiguous.
    x, index, weight, bias = _inputs(dtype, 13, "both")
    given = dict(x=x, index=index, weight=weight, bias=bias, dy=torch.randn(*SHAPE[:-1], 13).to(dtype))
    given[name] = with_layout(given[name], layout)
    _compare(given["x"], given["index"], given["weight"], given["bias"], dtype, dy=given["dy"])


def test_other_ranks_and_unsorted_index():
    for shape in [(D,), (2, 3, 5, D)]:
        x, _, weight, bias = _inputs(torch.float32, 7, "both", shape=shape)
        index = torch.randperm(D)[:7]  # any distinct columns, in any order
        _compare(x, index, weight, bias, torch.float32)


def test_only_requested_gradients():
    x, index, weight, bias = _inputs(torch.float32, 13, "both")
    with vtp_kernels.use_backend("triton"):
        # Frozen LayerNorm parameters: only dx.
        xg = x.clone().requires_grad_()
        layer_norm_gather(xg, index, weight, bias).sum().backward()
        # Frozen input: only dweight and dbias.
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        layer_norm_gather(x, index, w, b).square().sum().backward()
    xr, wr, br = x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    reference.layer_norm_gather(xr, index, weight, bias).sum().backward()
    reference.layer_norm_gather(x, index, wr, br).square().sum().backward()
    _check(xg.grad, xr.grad, torch.float32, "out")
    _check(w.grad, wr.grad, torch.float32, "param")
    _check(b.grad, br.grad, torch.float32, "param")


def test_mixed_dtypes_promote_like_reference():
    x, index, _, _ = _inputs(torch.float16, 13, "none")
    weight, bias = 1.0 + torch.randn(13), torch.randn(13)  # fp32 parameters, fp16 activations
    with vtp_kernels.use_backend("triton"):
        y = layer_norm_gather(x, index, weight, bias)
    y_ref = reference.layer_norm_gather(x.float(), index, weight, bias)
    assert y.dtype == reference.layer_norm_gather(x, index, weight, bias).dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # same inputs, fp32 math


def test_dweight_is_deterministic():
    # 600 rows span both backward programs and several row tiles each.
    x, index, weight, bias = _inputs(torch.float32, 13, "both", shape=(600, D))
    dy = torch.randn(600, 13)
    with vtp_kernels.use_backend("triton"):
        runs = [_fwd_bwd(layer_norm_gather, x, index, weight, bias, dy)[1] for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])


def test_torch_compile_fullgraph():
    x, index, weight, bias = _inputs(torch.float32, 13, "both")

    def loss(x, weight, bias):
        return layer_norm_gather(x, index, weight, bias).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with vtp_kernels.use_backend("triton"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        compiled(*leaves).backward()
        eager = [t.clone().requires_grad_() for t in (x, weight, bias)]
        loss(*eager).backward()
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)  # same kernels, same order


def test_autotuning_is_keyed_on_padded_widths():
    # A pruned model keeps a different k in nearly every block; keyed on the padded widths,
    # a DeiT-B plan tunes a few buckets instead of one key per block.
    kernels = importlib.import_module("vtp_kernels._layer_norm_gather")
    assert kernels._layer_norm_gather_fwd_kernel.keys == ["BLOCK_D", "BLOCK_K"]
    assert kernels._layer_norm_gather_bwd_kernel.keys == ["BLOCK_D"]


def test_backward_configs_that_would_spill_are_pruned():
    # Compiled for sm_90 at D = 768, the backward spills beyond 16 tile elements per thread.
    kernels = importlib.import_module("vtp_kernels._layer_norm_gather")
    configs = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (1, 2, 4, 8, 16) for w in (4, 8)]
    kept = kernels._prune_bwd_configs(configs, {"D": 768})
    assert {(c.kwargs["BLOCK_M"], c.num_warps) for c in kept} == {(1, 4), (1, 8), (2, 4), (2, 8), (4, 8)}
    # Rows too wide for any config: one config is still left, the smallest tile.
    (only,) = kernels._prune_bwd_configs(configs, {"D": 1 << 16})
    assert (only.kwargs["BLOCK_M"], only.num_warps) == (1, 8)


def test_public_op_survives_kernel_import():
    # The kernel module is vtp_kernels/_layer_norm_gather.py: importing it on the first triton
    # call must leave the public function bound to the package's name.
    # Checked in a fresh interpreter: in this process the module is imported already.
    code = (
        "import torch, vtp_kernels\n"
        "with vtp_kernels.use_backend('triton'):\n"
        "    vtp_kernels.layer_norm_gather(torch.randn(4, 8), torch.arange(3))\n"
        "assert callable(vtp_kernels.layer_norm_gather), vtp_kernels.layer_norm_gather\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# --- the benchmark script's CPU smoke mode ---------------------------------------------
def _load_bench():
    return load_script("benchmarks/bench_layer_norm_gather.py")


def test_bench_smoke_writes_record(tmp_path):
    _load_bench().main(["--smoke", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "layer_norm_gather_smoke.json").read_text())
    assert (tmp_path / "layer_norm_gather_smoke.png").stat().st_size > 0
    for field in ("device", "versions", "command", "config", "correctness", "results", "medians_ms"):
        assert field in record, field
    assert {"torch", "triton", "python"} <= set(record["versions"])
    assert record["smoke"] and "--smoke" in record["command"]
    variants = {(r["variant"], r["mode"]) for r in record["results"]}
    assert variants == {(v, m) for v in ("triton", "reference", "compiled", "floor") for m in ("fwd", "fwd+bwd")}
    for r in record["results"]:
        assert len(r["raw_ms"]) == record["config"]["rep"] and all(t > 0 for t in r["raw_ms"])
        assert r["median_ms"] == pytest.approx(sorted(r["raw_ms"])[len(r["raw_ms"]) // 2])
    assert all(e <= record["correctness"]["bound"] for e in record["correctness"]["rel_err"].values())
