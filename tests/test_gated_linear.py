"""The Triton gated linear op against its PyTorch reference, under TRITON_INTERPRET=1.

Tolerances are ``max |out - ref| <= tol * max |ref|`` per tensor:
- fp32, 1e-5: the interpreter's dots are exact fp32, so only summation order differs (~1e-7).
- fp16, 1e-3: fp16 inputs and outputs with fp32 accumulation; the output rounding alone is
  up to 2**-11 ~ 4.9e-4 of the largest value. The reference runs in fp32 on the same values.
"""
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import vtp_kernels
import vtp_kernels.backend as backend
from vtp_kernels import reference

# The public op, held before its kernel module is imported: see
# test_public_op_survives_kernel_import.
gated_linear = vtp_kernels.gated_linear
kernels = importlib.import_module("vtp_kernels.gated_linear")

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def gated_linear_triton(*args):
    with vtp_kernels.use_backend("triton"):
        return gated_linear(*args)


def assert_matches(out, ref, tol, what=""):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol} * max |ref| {scale:.3e}"


def make_inputs(x_shape, n, dtype=torch.float32, bias=True):
    k = x_shape[-1]
    x = torch.randn(*x_shape, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) * k ** -0.5
    a = torch.randn(k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, w, a, b


def check_against_reference(x, w, a, b, tol, dy=None):
    """Run both ops on the same values and compare the output and every gradient that
    autograd produces; the reference runs in fp32 (or fp64) on upcast copies."""
    inputs = [t for t in (x, w, a, b) if t is not None and t.requires_grad]
    y = gated_linear_triton(x, w, a, b)
    if dy is None:
        dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy) if inputs else ()

    up = torch.promote_types(y.dtype, torch.float32)
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
# Forward and gradients


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape, n", [
    ((3, 37, 40), 24),    # one tile of every kernel, every dim ragged
    ((2, 150, 200), 140),  # several tiles per dim, ragged last tiles, two K and N steps
], ids=["one_tile", "many_tiles"])
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


@pytest.mark.parametrize("layout", ["sliced", "transposed_3d", "transposed_2d", "permuted_4d"])
def test_non_contiguous_x(layout):
    k, n = 40, 24
    if layout == "sliced":          # rows strided, columns offset: one strided level
        x = torch.randn(3, 37, 64)[:, :, 10:10 + k]
    elif layout == "transposed_3d":  # two strided levels of rows: no copy either
        x = torch.randn(37, 3, k).transpose(0, 1)
    elif layout == "transposed_2d":  # column stride != 1
        x = torch.randn(k, 111).t()
    else:                           # three levels: the op copies it
        x = torch.randn(5, 3, 7, k).permute(1, 0, 2, 3).transpose(1, 2)
    assert not x.is_contiguous()
    _, w, a, b = make_inputs((k,), n)
    for t in (x, w, a, b):
        t.requires_grad_()
    check_against_reference(x, w, a, b, TOL[torch.float32])


def test_non_contiguous_weight_gate_and_grad_output():
    x = torch.randn(3, 37, 40, requires_grad=True)
    w = torch.randn(40, 24).t().requires_grad_()
    a = torch.randn(80)[::2].requires_grad_()
    b = torch.randn(24, requires_grad=True)
    # The gradient of a sum is a stride-0 expanded tensor.
    check_against_reference(x, w, a, b, TOL[torch.float32], dy=torch.ones(1).expand(3, 37, 24))


@pytest.mark.parametrize("needs", [("weight", "gate", "bias"), ("gate",), ("x",), ()],
                         ids=lambda n: "+".join(n) or "nothing")
def test_gradients_only_for_inputs_that_require_them(needs, monkeypatch):
    x, w, a, b = make_inputs((3, 37, 40), 24)
    for name, t in zip(("x", "weight", "gate", "bias"), (x, w, a, b)):
        t.requires_grad_(name in needs)
    calls = {"input": 0, "weight": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(kernels, "_input_grad", counted("input", kernels._input_grad))
    monkeypatch.setattr(kernels, "_weight_grad", counted("weight", kernels._weight_grad))
    if not needs:
        y = gated_linear_triton(x, w, a, b)
        assert not y.requires_grad
        assert_matches(y, reference.gated_linear(x, w, a, b), TOL[torch.float32], "y")
    else:
        check_against_reference(x, w, a, b, TOL[torch.float32])
    # The kernel of a gradient nobody asked for never runs.
    assert calls["input"] == ("x" in needs)
    assert calls["weight"] == bool({"weight", "gate"} & set(needs))


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
    assert_matches(y, y_ref.float(), 2 * TOL[torch.float16], "y")  # two fp16 roundings of W*a
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


def test_every_dot_names_its_accumulator_dtype():
    # Triton 3.6 (what the GPUs run) defaults tl.dot's out_dtype to fp32 and asserts that
    # an accumulator passed in has that dtype, so the fp64 path fails to compile unless
    # out_dtype is given; newer Triton infers it from the accumulator, which hides this.
    import inspect
    import re
    source = inspect.getsource(kernels)
    dots = re.findall(r"tl\.dot\(([^\n]*)\)", source)
    assert len(dots) == 3
    assert all("out_dtype=ACC_DTYPE" in call for call in dots), dots


# Shared memory of the software pipeline, per kernel: (A tile, B tile) of one K step.
_PIPELINED_TILES = {
    "forward": lambda m, n, k: m * k + k * n,        # x [M, K] and W.T [K, N]
    "input_grad": lambda m, n, k: m * n + n * k,     # dy [M, N] and W [N, K]
    "weight_grad": lambda m, n, k: n * m + m * k,    # dy.T [N, M] and x [M, K]
}


@pytest.mark.parametrize("kernel", sorted(_PIPELINED_TILES))
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_some_cuda_config_fits_h100_shared_memory(kernel, itemsize):
    # The autotuner skips configs that run out of shared memory, but if none fits, the
    # launch fails. stages x tiles x itemsize matched sm_90 compiles to within 1 KB.
    configs = kernels._WEIGHT_CONFIGS if kernel == "weight_grad" else kernels._ROWS_CONFIGS
    tiles = _PIPELINED_TILES[kernel]
    h100_bytes = 227 * 1024
    fitting = [c for c in configs
               if c.num_stages * itemsize * tiles(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
               <= h100_bytes - 4096]
    assert fitting, f"{kernel}: no config fits {h100_bytes} B with {itemsize}-byte inputs"


# ---------------------------------------------------------------------------------------
# Backend switch


def test_public_op_survives_kernel_import():
    # Importing the submodule vtp_kernels/gated_linear.py binds the package attribute of
    # the same name to the module, replacing the public function (which GatedLinear calls).
    assert "vtp_kernels.gated_linear" in sys.modules
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
    x, w, a, b = make_inputs((3, 7, 40), 24)
    torch.library.opcheck(torch.ops.vtp.gated_linear.default, (x, w, a, b))
    torch.library.opcheck(torch.ops.vtp.gated_linear.default, (x, w.requires_grad_(), a.requires_grad_(), None))


# ---------------------------------------------------------------------------------------
# Benchmark smoke run


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gated_linear", ROOT / "benchmarks" / "bench_gated_linear.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
        assert set(c["max_rel_err"]) == {"y", "dx", "dweight", "dgate", "dbias"}
        assert max(c["max_rel_err"].values()) < TOL[torch.float32]
