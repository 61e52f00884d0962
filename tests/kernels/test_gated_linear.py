"""The Triton gated linear op against its PyTorch reference, under TRITON_INTERPRET=1.

The op folds the gate into the weight with a Triton kernel, runs the GEMMs of ``F.linear``
and reduces dW and dgate with a second Triton kernel. The reference runs in fp64 on upcast
copies of the same values, and every buffer the kernels allocate starts as NaN
(``poison_outputs``), so an element no kernel wrote fails the comparison.

Tolerances are ``max |out - ref| <= tol * max |ref|`` per tensor:
- fp32, 1e-5: W * a is one correctly rounded fp32 product, the GEMMs and the dgate sums
  accumulate in fp32: ~sqrt(K) * 2**-24 ~ 1e-6 of the largest value at these sizes.
- fp16, 1e-3: W * a is rounded once to fp16 (2**-12 relative), the GEMMs accumulate in
  fp32, and the output is rounded to fp16 (2**-12 of the largest value): ~5e-4 at most.
"""
import importlib
import json
import sys

import pytest
import torch

import vtp_kernels
import vtp_kernels.backend as backend
from layouts import describe, layouts_for, with_layout
from vtp_kernels import reference
from vtp_kernels._utils import poison_outputs
from scripts import load_script

# The public op, held before its kernel module is imported: see
# test_public_op_survives_kernel_import.
gated_linear = vtp_kernels.gated_linear
kernels = importlib.import_module("vtp_kernels._gated_linear")

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def gated_linear_triton(*args):
    with vtp_kernels.use_backend("triton"):
        return gated_linear(*args)


def assert_matches(out, ref, tol, what=""):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    if ref.numel() == 0:
        return
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol} * max |ref| {scale:.3e}"


def make_inputs(x_shape, n, dtype=torch.float32, bias=True):
    k = x_shape[-1]
    x = torch.randn(*x_shape, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) * max(k, 1) ** -0.5
    a = torch.randn(k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, w, a, b


def check_against_reference(x, w, a, b, tol, dy=None):
    """Run both ops on the same values and compare the output and every gradient that
    autograd produces; the reference runs in fp64 on upcast copies."""
    inputs = [t for t in (x, w, a, b) if t is not None and t.requires_grad]
    with poison_outputs():
        y = gated_linear_triton(x, w, a, b)
        if dy is None:
            dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, inputs, dy) if inputs else ()

    up = torch.float64
    ref_in = [None if t is None else t.detach().to(up).requires_grad_(t.requires_grad) for t in (x, w, a, b)]
    y_ref = reference.gated_linear(*ref_in)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_in if t is not None and t.requires_grad],
                                    dy.to(up)) if inputs else ()
    assert y.dtype == x.dtype
    assert_matches(y, y_ref, tol, "y")
    names = [n for n, t in zip(("dx", "dweight", "dgate", "dbias"), (x, w, a, b))
             if t is not None and t.requires_grad]
    for name, g, g_ref, t in zip(names, grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_matches(g, g_ref, tol, name)


# ---------------------------------------------------------------------------------------
# Forward and gradients on every size and layout


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape, n", [
    ((3, 37, 40), 24),     # every dim ragged
    ((2, 150, 200), 140),  # several tiles of the N x K kernels, ragged last tiles
    ((5, 7), 13),          # odd widths
    ((1, 1), 1),           # width 1 everywhere
    ((3, 3, 64), 72),      # multiples of 8: what round_to=8 plans produce
    ((0, 8), 16),          # no rows
    ((4, 0), 8),           # no input features: y is the bias
    ((4, 8), 0),           # no output features
], ids=["ragged", "many_tiles", "odd", "one", "multiple_of_8", "no_rows", "k0", "n0"])
def test_matches_reference(x_shape, n, dtype, bias):
    x, w, a, b = make_inputs(x_shape, n, dtype, bias)
    for t in (x, w, a, b):
        if t is not None:
            t.requires_grad_()
    check_against_reference(x, w, a, b, TOL[dtype])


def test_one_dimensional_input():
    x, w, a, b = make_inputs((70,), 9)
    for t in (x, w, a, b):
        t.requires_grad_()
    check_against_reference(x, w, a, b, TOL[torch.float32])


LAYOUT_CASES = [(name, layout) for name, rank in (("x", 3), ("weight", 2), ("gate", 1), ("bias", 1), ("dy", 3))
                for layout in layouts_for(rank) if layout != "contiguous"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, layout", LAYOUT_CASES, ids=[f"{n}-{lay}" for n, lay in LAYOUT_CASES])
def test_every_layout_of_every_input(name, layout, dtype):
    # One input at a time in a non-default layout, the others contiguous.
    x, w, a, b = make_inputs((2, 37, 40), 24, dtype)
    dy = torch.randn(2, 37, 24).to(dtype)
    given = dict(x=x, weight=w, gate=a, bias=b, dy=dy)
    given[name] = with_layout(given[name], layout)
    x, w, a, b, dy = (given[k] for k in ("x", "weight", "gate", "bias", "dy"))
    assert given[name].stride() != x.new_empty(given[name].shape).stride() or given[name].storage_offset(), \
        describe(given[name])
    for t in (x, w, a, b):
        t.requires_grad_()
    check_against_reference(x, w, a, b, TOL[dtype], dy=dy)


@pytest.mark.parametrize("layout", layouts_for(2))
@pytest.mark.parametrize("need_weight, need_gate", [(True, True), (True, False), (False, True)],
                         ids=["both", "dweight", "dgate"])
def test_weight_gradient_epilogue_reads_any_layout(layout, need_weight, need_gate):
    # The epilogue's G is whatever autograd's mm hands back; in every layout it must give
    # dW = G * a and da = sum_n G * W.
    n, k = 70, 300  # two K tiles, two N tiles of the interpreter's tile
    g = with_layout(torch.randn(n, k, dtype=torch.float64), layout)
    w = with_layout(torch.randn(n, k, dtype=torch.float64), "sliced")
    a = torch.randn(k, dtype=torch.float64)
    with poison_outputs():
        dw, dgate = kernels.scale_weight_backward_op(g, w, a, need_weight, need_gate)
    if need_weight:
        torch.testing.assert_close(dw, g * a, rtol=1e-12, atol=1e-12)
    else:
        assert dw.numel() == 0
    if need_gate:
        torch.testing.assert_close(dgate, (g * w).sum(0), rtol=1e-12, atol=1e-12)
    else:
        assert dgate.numel() == 0


@pytest.mark.parametrize("needs", [("weight", "gate", "bias"), ("gate",), ("weight",), ("x",), ()],
                         ids=lambda n: "+".join(n) or "nothing")
def test_gradients_only_for_inputs_that_require_them(needs, monkeypatch):
    x, w, a, b = make_inputs((3, 37, 40), 24)
    for name, t in zip(("x", "weight", "gate", "bias"), (x, w, a, b)):
        t.requires_grad_(name in needs)
    calls = []
    epilogue = kernels._scale_weight_backward

    def counted(grad, weight, gate, need_weight, need_gate):
        calls.append((need_weight, need_gate))
        return epilogue(grad, weight, gate, need_weight, need_gate)

    monkeypatch.setattr(kernels, "_scale_weight_backward", counted)
    if not needs:
        y = gated_linear_triton(x, w, a, b)
        assert not y.requires_grad
        assert_matches(y, reference.gated_linear(x, w, a, b), TOL[torch.float32], "y")
    else:
        check_against_reference(x, w, a, b, TOL[torch.float32])
    # The epilogue runs only for a weight or gate gradient, and computes only what was asked.
    wanted = ("weight" in needs, "gate" in needs)
    assert calls == ([wanted] if any(wanted) else [])


def test_dgate_is_deterministic():
    # 140 rows of W: several N tiles whose partial sums are reduced.
    x, w, a, b = make_inputs((2, 150, 200), 140)
    a.requires_grad_()
    dy = torch.randn(2, 150, 140)
    first = torch.autograd.grad(gated_linear_triton(x, w, a, b), a, dy)[0]
    second = torch.autograd.grad(gated_linear_triton(x, w, a, b), a, dy)[0]
    assert torch.equal(first, second)


def test_autocast_keeps_the_gate_in_fp32():
    x, w, a, b = make_inputs((3, 37, 40), 24)
    for t in (x, w, a, b):
        t.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y = gated_linear_triton(x, w, a, b)
        y_ref = reference.gated_linear(x, w, a, b)
    assert y.dtype == y_ref.dtype == torch.float16
    # Both round the fp32 product W * a once to fp16 and run the same fp16 F.linear.
    assert torch.equal(y, y_ref)
    grads = torch.autograd.grad(y.float().sum(), (x, w, a, b))
    assert [g.dtype for g in grads] == [torch.float32] * 4


def test_shape_and_dtype_errors():
    x, w, a, b = make_inputs((3, 5, 40), 24)
    with pytest.raises(ValueError, match="gate"):
        gated_linear_triton(x, w, a[:-1], b)
    with pytest.raises(ValueError, match="bias"):
        gated_linear_triton(x, w, a, b[:-1])
    with pytest.raises(TypeError, match="dtype"):
        gated_linear_triton(x.half(), w, a, b)


# ---------------------------------------------------------------------------------------
# gradcheck


def test_gradcheck_reference():
    inputs = [t.double().requires_grad_() for t in make_inputs((2, 3, 5), 4)]
    assert torch.autograd.gradcheck(reference.gated_linear, inputs)


def test_gradcheck_triton():
    # fp64 runs the same kernels with an fp64 accumulator; fast mode keeps it to a few calls.
    inputs = [t.double().requires_grad_() for t in make_inputs((2, 3, 5), 4)]
    assert torch.autograd.gradcheck(gated_linear_triton, inputs, fast_mode=True)


# ---------------------------------------------------------------------------------------
# Backend switch


def test_public_op_survives_kernel_import():
    # The kernel module is vtp_kernels/_gated_linear.py: importing it must leave the public
    # function (which GatedLinear calls) bound to the package's name.
    assert "vtp_kernels._gated_linear" in sys.modules
    assert callable(vtp_kernels.gated_linear), "vtp_kernels.gated_linear was replaced by its kernel module"


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    x, w, a, b = make_inputs((3, 5, 40), 24)
    with vtp_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gated_linear(x, w, a, b)
    # "auto" falls back to the reference on the CPU instead.
    with vtp_kernels.use_backend("auto"):
        assert_matches(gated_linear(x, w, a, b), reference.gated_linear(x, w, a, b), 0.0)


def test_invalid_backend_name_raises():
    with pytest.raises(ValueError, match="backend"):
        vtp_kernels.set_backend("cuda")


def test_backend_env_var_is_honoured(monkeypatch):
    vtp_kernels.set_backend(None)
    monkeypatch.setenv("VTP_BACKEND", "triton")
    assert vtp_kernels.get_backend() == "triton"
    x, w, a, b = make_inputs((3, 5, 40), 24)
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError):  # proves the env var routed the call to Triton
        gated_linear(x, w, a, b)
    monkeypatch.setenv("VTP_BACKEND", "torch")
    assert vtp_kernels.get_backend() == "torch"
    gated_linear(x, w, a, b)
    monkeypatch.setenv("VTP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="VTP_BACKEND"):
        vtp_kernels.get_backend()


# ---------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph():
    # aot_eager traces forward and backward through the custom ops' fake and autograd
    # registrations, which is what a graph break would show up in; inductor adds ~20 s
    # of C++ compilation on this CPU and nothing the custom op's contract depends on.
    torch._dynamo.reset()
    x, w, a, b = make_inputs((3, 37, 40), 24)
    params = [t.requires_grad_() for t in (x, w, a, b)]

    def loss_fn(x, w, a, b):
        return torch.nn.functional.gelu(gated_linear(x, w, a, b)).square().mean()

    with vtp_kernels.use_backend("triton"):
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        loss = compiled(*params)
        grads = torch.autograd.grad(loss, params)
        eager_loss = loss_fn(*params)
        eager_grads = torch.autograd.grad(eager_loss, params)
    assert torch.equal(loss, eager_loss)
    for g, g_eager in zip(grads, eager_grads):
        assert torch.equal(g, g_eager)


def test_custom_op_schema():
    # Checks the fake implementations and autograd registration against the real kernels.
    _, w, a, _ = make_inputs((3, 7, 40), 24)
    g = torch.randn_like(w)
    torch.library.opcheck(torch.ops.vtp.gated_linear_scale_weight.default, (w, a, torch.float16))
    torch.library.opcheck(torch.ops.vtp.gated_linear_scale_weight.default,
                          (w.requires_grad_(), a.requires_grad_(), torch.float32))
    for need in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.vtp.gated_linear_scale_weight_backward.default, (g, w.detach(), a.detach(), *need))


# ---------------------------------------------------------------------------------------
# Benchmark smoke run


def test_benchmark_smoke(tmp_path):
    bench = load_script("benchmarks/bench_gated_linear.py")
    bench.main(["--smoke", "--out", str(tmp_path), "--name", "smoke", "--repeats", "1",
                "--methods", "linear,folded,triton"])
    record = json.loads((tmp_path / "smoke.json").read_text())
    for key in ("device", "torch", "triton", "command", "dtype", "correctness", "results"):
        assert key in record, key
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert {r["method"] for r in record["results"]} == {"linear", "folded", "triton"}
    for r in record["results"]:
        assert r["times_ms"] and r["median_ms"] > 0 and r["mode"] in ("fwd", "fwd+bwd")
    for c in record["correctness"]:
        assert set(c["rel_err"]) == {"y", "dx", "dweight", "dgate", "dbias"}
        assert max(c["rel_err"].values()) < TOL[torch.float32]
