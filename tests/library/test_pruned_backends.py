"""A pruned tiny DeiT gives the same logits and gradients with the Triton and the torch backend."""
import copy

import torch

import vtp
import vtp_kernels
from vit_variants import make_vit, randomize_gates


def _pruned_model():
    model = vtp.add_gates(make_vit("deit", dtype=torch.float32))
    randomize_gates(model, seed=3)
    plan = vtp.plan(model, ratio=0.45)
    small = vtp.prune(model, plan)
    # the plan must exercise every pruned op: gathered LayerNorms and uneven heads
    assert any(isinstance(b.norm1, vtp.KeptLayerNorm) for b in small.blocks)
    assert any(isinstance(b.attn, vtp.PrunedAttention) for b in small.blocks)
    return small


def _logits_and_grads(model, x, backend):
    model = copy.deepcopy(model).train()
    with vtp_kernels.use_backend(backend):
        logits = model(x)
        logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_triton_and_torch_backends_agree_on_a_pruned_deit(monkeypatch):
    calls = []
    for op in ("layer_norm_gather_triton", "packed_attention_triton"):
        original = getattr(vtp_kernels, op)
        monkeypatch.setattr(vtp_kernels, op, lambda *a, _f=original, _n=op, **k: calls.append(_n) or _f(*a, **k))
    small = _pruned_model()
    x = torch.randn(2, 3, 32, 32)
    ref_logits, ref_grads = _logits_and_grads(small, x, "torch")
    assert not calls
    tri_logits, tri_grads = _logits_and_grads(small, x, "triton")
    assert {"layer_norm_gather_triton", "packed_attention_triton"} <= set(calls)
    # fp32 on the interpreter: exact fp32 dots, only summation order differs.
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(tri_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_pruned_model_compiles_without_graph_breaks():
    small = _pruned_model().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = small(x)
    compiled = torch.compile(small, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)


def test_loaded_model_uses_the_backend_switch(tmp_path, monkeypatch):
    small = _pruned_model().eval()
    vtp.save(small, tmp_path / "m")
    loaded = vtp.load(tmp_path / "m")
    calls = []
    original = vtp_kernels.packed_attention_triton
    monkeypatch.setattr(vtp_kernels, "packed_attention_triton", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(1, 3, 32, 32)
    with vtp_kernels.use_backend("triton"):
        out = loaded(x)
    assert calls
    torch.testing.assert_close(out, small(x), rtol=1e-4, atol=1e-5)
