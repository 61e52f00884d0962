"""packed_attention: the Triton kernel (under TRITON_INTERPRET=1) against the reference.

Inputs are laid out as the pruned attention module produces them: one qkv projection
output ``[B, N, 2*H*D + sum(v_widths)]`` with q, k and v as strided views of it. The
reference runs in float32 on upcast copies of the same values; the reference itself is
checked against an explicit per-head softmax loop.
"""
import importlib.util
import json
import os

import pytest
import torch

import vtp_kernels
from vtp_kernels import reference

# (H, D, v_widths): widths 0 (dropped head), 1, 7 and a full 64-wide head; and H=3 with D=32.
CASES = [(4, 64, (0, 1, 7, 64)), (3, 32, (32, 0, 5))]
CASE_IDS = ["H4D64", "H3D32"]

# fp32: exact fp32 dots; only the flash-style reordering of the softmax sums differs (~1e-7
#       seen), so 1e-5 relative (and 1e-5 absolute for values near 0) has ample margin.
# fp16: P and V go into tl.dot as fp16 with fp32 accumulation and the outputs are rounded
#       to fp16 (2**-11 ~ 5e-4 per element; ~3e-4 seen): 2e-3 of the reference norm.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def split_qkv(qkv, H, D):
    B, N, _ = qkv.shape
    q = qkv[..., :H * D].view(B, N, H, D).transpose(1, 2)
    k = qkv[..., H * D:2 * H * D].view(B, N, H, D).transpose(1, 2)
    return q, k, qkv[..., 2 * H * D:]


def make_qkv(B, N, H, D, widths, dtype):
    """qkv = x @ W like the pruned qkv projection, scaled so scores are O(1)."""
    C = 2 * H * D + sum(widths)
    x = torch.randn(B, N, 48)
    w = torch.randn(48, C) / 48 ** 0.5
    return (x @ w).to(dtype).requires_grad_()


def loop_attention(q, k, v, widths, scale):
    """softmax(q_h k_hᵀ · scale) v_h head by head, concatenated: the textbook definition."""
    outs, off = [], 0
    for h, w in enumerate(widths):
        p = torch.softmax(q[:, h] @ k[:, h].transpose(-1, -2) * scale, dim=-1)
        outs.append(p @ v[..., off:off + w])
        off += w
    return torch.cat(outs, dim=-1)


def assert_rel(got, want, tol, what):
    err = (got.float() - want).norm() / want.norm().clamp_min(1e-30)
    assert err <= tol, f"{what}: error norm / reference norm = {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("N", [197, 13])
@pytest.mark.parametrize("H,D,widths", CASES, ids=CASE_IDS)
def test_reference_matches_per_head_loop(H, D, widths, N):
    qkv = make_qkv(2, N, H, D, widths, torch.float64)
    q, k, v = split_qkv(qkv, H, D)
    want = loop_attention(q, k, v, widths, D ** -0.5)
    torch.testing.assert_close(reference.packed_attention(q, k, v, widths), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N", [197, 13])
@pytest.mark.parametrize("H,D,widths", CASES, ids=CASE_IDS)
def test_forward_backward_match_reference(H, D, widths, N, dtype):
    B = 2 if N == 13 else 1
    qkv = make_qkv(B, N, H, D, widths, dtype)
    dout = torch.randn(B, N, sum(widths)).to(dtype)
    with vtp_kernels.use_backend("triton"):
        out = vtp_kernels.packed_attention(*split_qkv(qkv, H, D), widths)
    (grad,) = torch.autograd.grad(out, qkv, dout)

    qkv32 = qkv.detach().float().requires_grad_()
    want = reference.packed_attention(*split_qkv(qkv32, H, D), widths)
    (want_grad,) = torch.autograd.grad(want, qkv32, dout.float())

    assert out.shape == want.shape and out.dtype == dtype
    tol = TOL[dtype]
    assert_rel(out, want, tol, "out")
    for name, got, ref in zip("qkv", split_qkv(grad, H, D), split_qkv(want_grad, H, D)):
        assert_rel(got, ref, tol, f"d{name}")
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol)
    # A head without values does not touch the output: exactly zero dq and dk.
    dq, dk, _ = split_qkv(grad, H, D)
    for h in (h for h, w in enumerate(widths) if w == 0):
        assert torch.count_nonzero(dq[:, h]) == 0 and torch.count_nonzero(dk[:, h]) == 0


def test_aligned_widths_and_odd_strides():
    """Widths in multiples of 8 make the kernels promise 8-aligned strides to the compiler;
    non-unit last-dim strides take the general path. Both must give the reference's result."""
    from vtp_kernels.packed_attention import _alignment, _head_table

    B, H, N, D, widths = 1, 3, 197, 32, (24, 0, 8)
    qkv = make_qkv(B, N, H, D, widths, torch.float32)
    q, k, v = split_qkv(qkv, H, D)
    assert _alignment(_head_table(widths, q.device)[1], sum(widths), q, k, v) == 8
    assert _alignment(_head_table((7, 1), q.device)[1], 8, q) == 1

    # q with its head dim strided (D-major storage), v every other column of a wider tensor.
    q2 = torch.randn(B, N, D, H).permute(0, 3, 1, 2).requires_grad_()
    v2 = torch.randn(B, N, 2 * sum(widths))[..., ::2].requires_grad_()
    dout = torch.randn(B, N, sum(widths))
    for q_, v_ in ((q, v), (q2, v2)):
        with vtp_kernels.use_backend("triton"):
            out = vtp_kernels.packed_attention(q_, k, v_, widths)
        grads = torch.autograd.grad(out, (q_, k, v_), dout)
        leaves = [t.detach().clone().requires_grad_() for t in (q_, k, v_)]
        want = reference.packed_attention(*leaves, widths)
        want_grads = torch.autograd.grad(want, leaves, dout)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_only_requested_gradients():
    """Separate contiguous tensors; q and k frozen: only dv is computed and returned."""
    B, H, N, D, widths = 1, 3, 13, 32, (4, 16, 0)
    q, k = torch.randn(2, B, H, N, D).unbind(0)
    v = torch.randn(B, N, sum(widths), requires_grad=True)
    dout = torch.randn(B, N, sum(widths))
    with vtp_kernels.use_backend("triton"):
        vtp_kernels.packed_attention(q, k, v, widths, scale=0.3).backward(dout)
    v_ref = v.detach().clone().requires_grad_()
    reference.packed_attention(q, k, v_ref, widths, scale=0.3).backward(dout)
    assert q.grad is None and k.grad is None
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-5, atol=1e-5)


def test_only_dq_requested():
    """k and v frozen: dk and dv come back as two distinct empty tensors (custom op outputs
    may not alias one another)."""
    B, H, N, D, widths = 1, 3, 13, 32, (4, 16, 0)
    q = torch.randn(B, H, N, D, requires_grad=True)
    k = torch.randn(B, H, N, D)
    v = torch.randn(B, N, sum(widths))
    dout = torch.randn(B, N, sum(widths))
    with vtp_kernels.use_backend("triton"):
        vtp_kernels.packed_attention(q, k, v, widths, scale=0.3).backward(dout)
    q_ref = q.detach().clone().requires_grad_()
    reference.packed_attention(q_ref, k, v, widths, scale=0.3).backward(dout)
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    B, H, N, D, widths = 1, 3, 13, 32, (5, 0, 32)
    qkv = make_qkv(B, N, H, D, widths, torch.float32)

    def f(qkv):
        return vtp_kernels.packed_attention(*split_qkv(qkv, H, D), widths).sin()

    with vtp_kernels.use_backend("triton"):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    qkv_ref = qkv.detach().clone().requires_grad_()
    want = reference.packed_attention(*split_qkv(qkv_ref, H, D), widths).sin()
    (want_grad,) = torch.autograd.grad(want.sum(), qkv_ref)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)


def test_custom_op_registrations():
    """Schema, fake tensor, autograd registration and AOT tracing of the forward op."""
    importlib.import_module("vtp_kernels.packed_attention")  # registers the vtp:: ops
    B, H, N, D, widths = 1, 2, 13, 16, [3, 0]
    q, k = torch.randn(2, B, H, N, D, requires_grad=True).unbind(0)
    v = torch.randn(B, N, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.vtp.packed_attention_fwd.default, (q, k, v, widths, 0.25))


def test_bad_shapes_raise():
    q = torch.randn(1, 2, 5, 16)
    with vtp_kernels.use_backend("triton"):
        with pytest.raises(ValueError, match="v: expected shape"):
            vtp_kernels.packed_attention(q, q, torch.randn(1, 5, 4), (1, 2))
        with pytest.raises(ValueError, match="v_widths"):
            vtp_kernels.packed_attention(q, q, torch.randn(1, 5, 3), (1, 1, 1))


def test_benchmark_smoke(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_packed_attention.py")
    spec = importlib.util.spec_from_file_location("bench_packed_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--models", "deit_s", "--out", str(tmp_path)])

    record = json.loads((tmp_path / "packed_attention_smoke.json").read_text())
    assert (tmp_path / "packed_attention_smoke.png").stat().st_size > 0
    for field in ("device", "versions", "command", "config", "models", "correctness", "results", "medians_ms"):
        assert field in record, field
    assert {"torch", "triton"} <= set(record["versions"])
    assert record["smoke"] and record["triton_interpret"] == "1"
    assert record["correctness"]["deit_s"]["rel_err"]["out"] <= record["correctness"]["deit_s"]["bound"]
    keys = {f"deit_s/{m}/{v}" for m in ("fwd", "fwd+bwd") for v in ("triton", "reference", "compiled", "dense")}
    assert set(record["medians_ms"]) == keys
    assert all(len(r["raw_ms"]) == record["config"]["rep"] and r["median_ms"] > 0 for r in record["results"])
