"""packed_attention: the Triton kernel (under TRITON_INTERPRET=1) against the reference.

Inputs are laid out as the pruned attention module produces them: one qkv projection
output ``[B, N, 2*H*D + sum(v_widths)]`` with q, k and v as strided views of it. The
reference runs in float32 on upcast copies of the same values; the reference itself is
checked against an explicit per-head softmax loop.
"""
import importlib
import json

import pytest
import torch

import vtp_kernels
from layouts import LAYOUTS, describe, with_layout
from vtp_kernels import reference
from vtp_kernels._utils import poison_outputs
from scripts import load_script

# (H, D, v_widths), D the q/k width: widths 0 (dropped head), 1, 7 and a full 64-wide head;
# H=3 with D=32; eight 8-wide heads, where every offset and stride of a packed qkv row is a
# multiple of 8 and the kernels promise 8-aligned strides to the compiler; a head dim that
# is not a power of two (D=20), so the kernels' head-dim masks cut a block; and pruned
# query/key widths under wider values (attn_qk): values 64 and 33 wide on 16-wide q/k
# (BLOCK_V 64 against BLOCK_D 16), and 12-wide q/k (masked in BLOCK_D 16) under 40.
CASES = [(4, 64, (0, 1, 7, 64)), (3, 32, (32, 0, 5)), (8, 16, (8,) * 8), (3, 20, (7, 0, 20)),
         (3, 16, (64, 0, 33)), (2, 12, (40, 3))]
CASE_IDS = ["H4D64", "H3D32", "H8D16", "H3D20", "H3D16V64", "H2D12V40"]

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
    with vtp_kernels.use_backend("triton"), poison_outputs():
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


def compare_separate_inputs(q, k, v, dout, widths, tol):
    """q, k, v, dout as given (any layout): output and all three gradients against the
    reference in fp32 on upcast copies, with every kernel buffer poisoned with NaN."""
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with vtp_kernels.use_backend("triton"), poison_outputs():
        out = vtp_kernels.packed_attention(*leaves, widths)
        grads = torch.autograd.grad(out, leaves, dout)
    up = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = reference.packed_attention(*up, widths)
    want_grads = torch.autograd.grad(want, up, dout.float())
    assert out.dtype == q.dtype
    assert_rel(out, want, tol, "out")
    for name, got, ref in zip("qkv", grads, want_grads):
        assert_rel(got, ref, tol, f"d{name}")


def test_unit_stride_outside_the_last_dim():
    """A [B, N, D, H] tensor viewed as [B, H, N, D] has head stride 1. With 8-wide heads
    everything else is 8-aligned; the unit stride must lower the alignment the kernels
    promise, not be rounded down to 0."""
    B, H, N, D, widths = 1, 8, 13, 16, (8,) * 8
    q = torch.randn(B, N, D, H).permute(0, 3, 1, 2)
    k = torch.randn(B, H, N, D)
    v = torch.randn(B, N, sum(widths))
    compare_separate_inputs(q, k, v, torch.randn(B, N, sum(widths)), widths, TOL[torch.float32])


LAYOUT_CASES = [(name, layout) for name in ("q", "k", "v", "dout") for layout in LAYOUTS if layout != "contiguous"]
# (D, v_widths): values no wider than q/k, and q/k 8 wide under values up to 32 wide.
LAYOUT_SHAPES = [(16, (8, 16, 0, 8)), (8, (16, 32, 0, 8))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D, widths", LAYOUT_SHAPES, ids=["D16", "D8V32"])
@pytest.mark.parametrize("name, layout", LAYOUT_CASES, ids=[f"{n}-{lay}" for n, lay in LAYOUT_CASES])
def test_every_layout_of_every_input(name, layout, D, widths, dtype):
    """One input at a time in a non-default layout, the others contiguous; widths in
    multiples of 8 (and a dropped head), so that contiguous inputs are 8-aligned and each
    layout has an alignment to break."""
    B, H, N = 2, 4, 13
    given = dict(q=torch.randn(B, H, N, D), k=torch.randn(B, H, N, D), v=torch.randn(B, N, sum(widths)),
                 dout=torch.randn(B, N, sum(widths)))
    given = {n: t.to(dtype) for n, t in given.items()}
    given[name] = with_layout(given[name], layout)
    assert given[name].stride() != torch.empty(given[name].shape).stride() or given[name].storage_offset(), \
        describe(given[name])
    compare_separate_inputs(given["q"], given["k"], given["v"], given["dout"], widths, TOL[dtype])


def test_alignments_the_kernels_are_promised():
    from vtp_kernels._packed_attention import _launch_args

    def aligns(q, k, v, widths):
        _, meta = _launch_args(q, k, v, None, widths)
        return meta["QK_ALIGN"], meta["V_ALIGN"]

    B, N, D = 2, 13, 16
    # round_to=8 widths in a packed qkv row: everything 8-aligned.
    widths8 = (8, 16, 0, 8)
    assert aligns(*split_qkv(torch.randn(B, N, 2 * 4 * D + 32), 4, D), widths8) == (16, 8)
    # Odd widths: V unaligned; so is the odd qkv row, unless the caller pads it to 8.
    odd = (7, 1, 0, 5)
    assert aligns(*split_qkv(torch.randn(B, N, 2 * 4 * D + 13), 4, D), odd) == (1, 1)
    padded = torch.randn(B, N, 2 * 4 * D + 16)[..., :2 * 4 * D + 13]
    qk_align, v_align = aligns(*split_qkv(padded, 4, D), odd)
    assert qk_align >= 8 and v_align == 1
    # A unit head stride lowers the q/k alignment to 1; a batch of one does not count.
    q = torch.randn(1, N, D, 4).permute(0, 3, 1, 2)
    assert aligns(q, torch.randn(1, 4, N, D), torch.randn(1, N, 32), widths8)[0] == 1
    assert aligns(torch.randn(1, 4, N, D)[:, :, :, :], torch.randn(1, 4, N, D), torch.randn(1, N, 32), widths8) == (16, 8)


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


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_torch_compile_fullgraph(gated):
    B, H, N, D, widths = 1, 3, 13, 32, (5, 0, 48)
    qkv = make_qkv(B, N, H, D, widths, torch.float32)
    gate = make_gate(H, D) if gated else None

    def f(qkv, gate):
        return vtp_kernels.packed_attention(*split_qkv(qkv, H, D), widths, qk_gate=gate).sin()

    with vtp_kernels.use_backend("triton"):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv, gate)
    leaves = [qkv] + ([gate] if gated else [])
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    want = reference.packed_attention(*split_qkv(ref_leaves[0], H, D), widths,
                                      qk_gate=ref_leaves[1] if gated else None).sin()
    want_grads = torch.autograd.grad(want.sum(), ref_leaves)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_custom_op_registrations():
    """Schema, fake tensor, autograd registration and AOT tracing of the forward op."""
    importlib.import_module("vtp_kernels._packed_attention")  # registers the vtp:: ops
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
    bench = load_script("benchmarks/bench_packed_attention.py")
    bench.main(["--smoke", "--models", "deit_s", "--qk-widths", "32", "--out", str(tmp_path)])

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
    # --qk-widths 32 of 64 is Dqk 8 at --smoke's head dim 16: checked, timed, SDPA kernels probed
    qk = record["qk"]
    assert qk["qk_widths"] == [8] and set(qk["cases"]) == {"deit_s/dqk8"}
    assert all(err <= qk["bound"] for err in qk["cases"]["deit_s/dqk8"]["rel_err"].values())
    assert {"triton_gated/dgate", "triton/dqkv"} <= set(qk["cases"]["deit_s/dqk8"]["rel_err"])
    assert set(qk["medians_ms"]) == {f"deit_s/dqk8/{m}/{v}" for m in ("fwd", "fwd+bwd") for v in bench.QK_VARIANTS}
    assert qk["sdpa_backends"]["dqk8_dv16"]["MATH"] == "runs"


# (D, v_head_width, v_widths): V padded to the q/k width (the default), V padded wider than
# q/k (pruned attn_qk: 16-wide q/k, 64 values per head), V padded narrower than q/k.
PADDED_SHAPES = [(16, None, (16, 0, 5, 9)), (16, 64, (64, 0, 5, 33)), (32, 16, (16, 0, 5, 9))]
PADDED_IDS = ["D16", "D16V64", "D32V16"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D, vw, widths", PADDED_SHAPES, ids=PADDED_IDS)
def test_padded_values_give_the_packed_result(D, vw, widths, dtype):
    """V padded to the head width (head h's values first in its vw columns, anything after)
    is the same attention as V packed, through the reference and the kernel alike."""
    B, H, N = 2, 4, 13
    width = D if vw is None else vw
    q, k = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(2))
    packed = torch.randn(B, N, sum(widths), dtype=dtype)
    padded = torch.randn(B, N, H * width, dtype=dtype)  # the columns past each width are noise
    cols = torch.tensor([h * width + j for h, w in enumerate(widths) for j in range(w)])
    padded[..., cols] = packed
    want = reference.packed_attention(q.float(), k.float(), packed.float(), widths)
    got = reference.packed_attention(q.float(), k.float(), padded.float(), widths, v_padded=True, v_head_width=vw)
    # the same arithmetic on the same values: only the summation order of SDPA may differ
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with vtp_kernels.use_backend("triton"):
        out = vtp_kernels.packed_attention(q, k, padded, widths, v_padded=True, v_head_width=vw)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: one rounding of the output
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=rf"v: expected shape \[2, 13, {H * width}\]"):
        reference.packed_attention(q, k, packed, widths, v_padded=True, v_head_width=vw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_padded_values_raise_on_every_backend(backend):
    """A padded V is checked before the Triton path gathers it: a head wider than D would
    read its neighbour's columns, a V of the wrong width would be read out of place."""
    B, H, N, D = 1, 2, 5, 16
    q = torch.randn(B, H, N, D)
    with vtp_kernels.use_backend(backend):
        with pytest.raises(ValueError, match="a padded V holds at most 16 values per head"):
            vtp_kernels.packed_attention(q, q, torch.randn(B, N, H * D), (20, 4), v_padded=True)
        with pytest.raises(ValueError, match=r"v: expected shape \[1, 5, 32\]"):
            vtp_kernels.packed_attention(q, q, torch.randn(B, N, 40), (8, 4), v_padded=True)
        with pytest.raises(ValueError, match="widths must be >= 0"):
            vtp_kernels.packed_attention(q, q, torch.randn(B, N, H * D), (8, -1), v_padded=True)
        with pytest.raises(ValueError, match=r"q: expected \[B, H, N, D\]"):
            vtp_kernels.packed_attention(q[0], q[0], torch.randn(B, N, H * D), (8, 4), v_padded=True)
        with pytest.raises(ValueError, match="a padded V holds at most 8 values per head"):
            vtp_kernels.packed_attention(q, q, torch.randn(B, N, H * 8), (9, 4), v_padded=True, v_head_width=8)
        for bad in (-1, 2.5, True):
            with pytest.raises(ValueError, match="v_head_width: expected an int >= 0"):
                vtp_kernels.packed_attention(q, q, torch.randn(B, N, H * D), (8, 4), v_padded=True, v_head_width=bad)
        with pytest.raises(ValueError, match=r"k: expected shape \[1, 2, 5, 16\] like q"):
            vtp_kernels.packed_attention(q, q[..., :8], torch.randn(B, N, 12), (8, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D, vw, widths", [(16, None, (16, 0, 5)), (16, 48, (48, 0, 21)), (32, 16, (16, 0, 5))],
                         ids=PADDED_IDS[:1] + ["D16V48", "D32V16"])
def test_padded_values_backward(D, vw, widths, dtype):
    """Through a padded V the gradients are the packed V's, scattered to the kept columns;
    the padding columns get none. q, k and v are views of one qkv row, as the pruned
    attention makes them, and the Triton path against the reference in fp32."""
    B, H, N = 2, 3, 13
    width = D if vw is None else vw
    qkv = make_qkv(B, N, H, D, (width,) * H, dtype)
    dout = torch.randn(B, N, sum(widths)).to(dtype)
    with vtp_kernels.use_backend("triton"), poison_outputs():
        out = vtp_kernels.packed_attention(*split_qkv(qkv, H, D), widths, v_padded=True, v_head_width=vw)
        (grad,) = torch.autograd.grad(out, qkv, dout)
    qkv32 = qkv.detach().float().requires_grad_()
    want = reference.packed_attention(*split_qkv(qkv32, H, D), widths, v_padded=True, v_head_width=vw)
    (want_grad,) = torch.autograd.grad(want, qkv32, dout.float())
    tol = TOL[dtype]
    assert_rel(out, want, tol, "out")
    for name, got, ref in zip("qkv", split_qkv(grad, H, D), split_qkv(want_grad, H, D)):
        assert_rel(got, ref, tol, f"d{name}")
    padding = torch.ones(H * width, dtype=torch.bool)
    padding[reference.padded_value_columns(widths, width, torch.device("cpu"))] = False
    for g in (grad, want_grad):
        assert torch.count_nonzero(split_qkv(g, H, D)[2][..., padding]) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,N,widths", [(0, 5, (3, 4)), (2, 0, (3, 4)), (2, 5, (0, 0))],
                         ids=["no-batch", "no-tokens", "no-values"])
def test_empty_inputs(backend, B, N, widths):
    """An empty batch, no tokens or no value kept anywhere: an empty output of the right
    shape and dtype, and zero gradients, on every backend."""
    H, D = 2, 8
    q, k = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(2))
    v = torch.randn(B, N, sum(widths), requires_grad=True)
    with vtp_kernels.use_backend(backend):
        out = vtp_kernels.packed_attention(q, k, v, widths)
    assert out.shape == (B, N, sum(widths)) and out.dtype == q.dtype
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for t, g in zip((q, k, v), grads):
        assert g is None or (g.shape == t.shape and torch.count_nonzero(g) == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_query_key_dims(backend):
    """Every q/k dim pruned (Dqk = 0): every score is 0, so each head averages its values
    over the tokens, whatever the scale; dq and dk are empty. Float32 against that closed
    form: a mean of 13 values, ~1e-7 apart from summation order, so 1e-6."""
    B, H, N, widths = 2, 3, 13, (5, 0, 16)
    q, k = (torch.randn(B, H, N, 0, requires_grad=True) for _ in range(2))
    v = torch.randn(B, N, sum(widths), requires_grad=True)
    dout = torch.randn(B, N, sum(widths))
    with vtp_kernels.use_backend(backend):
        out = vtp_kernels.packed_attention(q, k, v, widths)
        out_scaled = vtp_kernels.packed_attention(q, k, v, widths, scale=0.125)
    want = v.detach().mean(1, keepdim=True).expand(B, N, sum(widths))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_scaled, want, rtol=1e-6, atol=1e-6)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    torch.testing.assert_close(dv, dout.mean(1, keepdim=True).expand(B, N, sum(widths)), rtol=1e-6, atol=1e-6)
    for g in (dq, dk):
        assert g is None or g.shape == (B, H, N, 0)


# ---------------------------------------------------------------------------------------
# The query/key gate (attn_qk): s = scale · Σ_d a_d q_d k_d
# ---------------------------------------------------------------------------------------
def make_gate(H, D, zero_dims=()):
    """A gate [H, 1, D] as the gated model holds it: fp32, values around 1, some dims 0."""
    gate = torch.rand(H, 1, D) + 0.5
    for h, d in zero_dims:
        gate[h, 0, d] = 0.0
    return gate.requires_grad_()


@pytest.mark.parametrize("H,D,widths", CASES[:1] + CASES[4:], ids=CASE_IDS[:1] + CASE_IDS[4:])
def test_reference_gate_is_the_product_and_the_pruned_attention(H, D, widths):
    """float64: the gated reference is the per-head loop on q * gate; a gate of ones is no
    gate; and a gate that is 0 on some dims (head 0's first half) and 1 elsewhere is the
    attention with those q/k columns removed at the same scale: what pruning them leaves."""
    qkv = make_qkv(2, 13, H, D, widths, torch.float64)
    q, k, v = split_qkv(qkv, H, D)
    gate = make_gate(H, D).detach().double()
    want = loop_attention(q * gate, k, v, widths, D ** -0.5)
    torch.testing.assert_close(reference.packed_attention(q, k, v, widths, qk_gate=gate), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.packed_attention(q, k, v, widths, qk_gate=torch.ones(H, D).double()),
                               reference.packed_attention(q, k, v, widths), rtol=0, atol=0)
    keep = torch.arange(D) >= D // 2
    halves = torch.ones(H, D, dtype=torch.float64)
    halves[0, ~keep] = 0.0
    outs, off = [], 0
    for h, w in enumerate(widths):
        cols = keep if h == 0 else torch.ones(D, dtype=torch.bool)
        p = torch.softmax(q[:, h][..., cols] @ k[:, h][..., cols].transpose(-1, -2) * D ** -0.5, dim=-1)
        outs.append(p @ v[..., off:off + w])
        off += w
    torch.testing.assert_close(reference.packed_attention(q, k, v, widths, qk_gate=halves), torch.cat(outs, -1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N", [197, 13])
@pytest.mark.parametrize("H,D,widths", CASES[:1] + CASES[3:], ids=CASE_IDS[:1] + CASE_IDS[3:])
def test_gated_forward_backward_match_reference(H, D, widths, N, dtype):
    """The kernel with the gate applied to its q tiles against the reference's q * gate, in
    fp32 on upcast copies: output, the gradients of qkv and of the gate (reduced from the
    dQ kernel's per-block partials). Tolerances as for the ungated kernel: the gate adds
    one fp32 multiply per q element, rounded to q's dtype as the reference's product is.
    A head without values gets exactly zero gate gradient."""
    B = 2 if N == 13 else 1
    qkv = make_qkv(B, N, H, D, widths, dtype)
    gate = make_gate(H, D, zero_dims=[(H - 1, 0)])
    dout = torch.randn(B, N, sum(widths)).to(dtype)
    with vtp_kernels.use_backend("triton"), poison_outputs():
        out = vtp_kernels.packed_attention(*split_qkv(qkv, H, D), widths, qk_gate=gate)
        grad, dgate = torch.autograd.grad(out, (qkv, gate), dout)

    qkv32 = qkv.detach().float().requires_grad_()
    gate_ref = gate.detach().clone().requires_grad_()
    want = reference.packed_attention(*split_qkv(qkv32, H, D), widths, qk_gate=gate_ref)
    want_grad, want_dgate = torch.autograd.grad(want, (qkv32, gate_ref), dout.float())

    tol = TOL[dtype]
    assert out.dtype == dtype and dgate.dtype == gate.dtype and dgate.shape == gate.shape
    assert_rel(out, want, tol, "out")
    for name, got, ref in zip("qkv", split_qkv(grad, H, D), split_qkv(want_grad, H, D)):
        assert_rel(got, ref, tol, f"d{name}")
    assert_rel(dgate, want_dgate, tol, "dgate")
    for h in (h for h, w in enumerate(widths) if w == 0):
        assert torch.count_nonzero(dgate[h]) == 0


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
def test_gated_every_layout_of_q(layout):
    """The gate on a q in every layout (the kernels multiply the tile they loaded), and a
    gate given as [H, D]; q/k 8 wide under values up to 32 wide."""
    B, H, N, D, widths = 2, 4, 13, 8, (16, 32, 0, 8)
    q = with_layout(torch.randn(B, H, N, D), layout).requires_grad_()
    k, v = torch.randn(B, H, N, D, requires_grad=True), torch.randn(B, N, sum(widths), requires_grad=True)
    gate = (torch.rand(H, D) + 0.5).requires_grad_()
    dout = torch.randn(B, N, sum(widths))
    with vtp_kernels.use_backend("triton"), poison_outputs():
        out = vtp_kernels.packed_attention(q, k, v, widths, qk_gate=gate)
        grads = torch.autograd.grad(out, (q, k, v, gate), dout)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate)]
    want = reference.packed_attention(*leaves[:3], widths, qk_gate=leaves[3])
    want_grads = torch.autograd.grad(want, leaves, dout)
    assert_rel(out, want, TOL[torch.float32], "out")
    for name, got, ref in zip(("q", "k", "v", "gate"), grads, want_grads):
        assert_rel(got, ref, TOL[torch.float32], f"d{name}")


def test_gate_gradient_alone():
    """Only the gate trains (q, k, v frozen): the dQ kernel still runs for the gate's
    gradient, and nothing else is returned."""
    B, H, N, D, widths = 1, 3, 13, 16, (4, 32, 0)
    q, k = torch.randn(2, B, H, N, D).unbind(0)
    v = torch.randn(B, N, sum(widths))
    gate = make_gate(H, D)
    dout = torch.randn(B, N, sum(widths))
    with vtp_kernels.use_backend("triton"):
        vtp_kernels.packed_attention(q, k, v, widths, scale=0.3, qk_gate=gate).backward(dout)
    gate_ref = gate.detach().clone().requires_grad_()
    reference.packed_attention(q, k, v, widths, scale=0.3, qk_gate=gate_ref).backward(dout)
    assert q.grad is None and k.grad is None and v.grad is None
    torch.testing.assert_close(gate.grad, gate_ref.grad, rtol=1e-5, atol=1e-5)


def test_frozen_gate_still_gates_the_gradients():
    """A gate that does not train (pruning a frozen gated model, or a gate at a fixed value)
    still made the scores: dq and dk go through it, and nothing is computed for it."""
    B, H, N, D, widths = 2, 3, 13, 16, (4, 32, 0)
    leaves = [torch.randn(B, H, N, D, requires_grad=True), torch.randn(B, H, N, D, requires_grad=True),
              torch.randn(B, N, sum(widths), requires_grad=True)]
    gate = torch.rand(H, 1, D) + 0.5
    dout = torch.randn(B, N, sum(widths))
    with vtp_kernels.use_backend("triton"), poison_outputs():
        grads = torch.autograd.grad(vtp_kernels.packed_attention(*leaves, widths, qk_gate=gate), leaves, dout)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    want = torch.autograd.grad(reference.packed_attention(*ref_leaves, widths, qk_gate=gate), ref_leaves, dout)
    for name, got, ref in zip("qkv", grads, want):
        assert_rel(got, ref, TOL[torch.float32], f"d{name}")


def test_gated_custom_op_registrations():
    importlib.import_module("vtp_kernels._packed_attention")
    B, H, N, D, widths = 1, 2, 13, 8, [3, 0]
    q, k = torch.randn(2, B, H, N, D, requires_grad=True).unbind(0)
    v = torch.randn(B, N, 3, requires_grad=True)
    gate = torch.rand(H, D, requires_grad=True)
    torch.library.opcheck(torch.ops.vtp.packed_attention_fwd.default, (q, k, v, widths, 0.25, gate))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_gate_raises(backend):
    B, H, N, D = 1, 2, 5, 8
    q, v = torch.randn(B, H, N, D), torch.randn(B, N, 6)
    with vtp_kernels.use_backend(backend):
        for bad in (torch.ones(H, D + 1), torch.ones(H + 1, 1, D), torch.ones(H * D), [1.0] * D):
            with pytest.raises(ValueError, match=r"qk_gate: expected a tensor of shape \[2, 8\] or \[2, 1, 8\]"):
                vtp_kernels.packed_attention(q, q, v, (3, 3), qk_gate=bad)
        with pytest.raises(ValueError, match="qk_gate: expected a floating-point tensor"):
            vtp_kernels.packed_attention(q, q, v, (3, 3), qk_gate=torch.ones(H, D, dtype=torch.long))
