"""Sparse training of a gated tiny ViT reaches the same losses with either backend.

Three SGD steps of ``CE + 1e-4 * l1_penalty`` from the same weights on the same batch,
once with the PyTorch reference and once with the Triton kernels (TRITON_INTERPRET=1).
"""
import copy
import importlib

import timm
import torch
import torch.nn.functional as F

import vtp
import vtp_kernels

# fp32 throughout: each op differs from the reference only in summation order (~1e-7
# relative); three steps of SGD carry that into the loss and the gates well below 1e-5.
LOSS_RTOL = 1e-5
GATE_ATOL = 1e-5
STEPS = 3


def tiny_vit():
    # DeiT's architecture at a size the interpreter runs in seconds: 4 patch tokens + class token.
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=5,
    )


def train(model, images, labels, backend):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    with vtp_kernels.use_backend(backend):
        for _ in range(STEPS):
            loss = F.cross_entropy(model(images), labels) + 1e-4 * vtp.l1_penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, torch.cat([g.detach().flatten() for g in vtp.gates(model).values()])


def test_gated_training_matches_across_backends(monkeypatch):
    torch.manual_seed(0)
    model = vtp.add_gates(tiny_vit()).train()
    assert len(vtp.gates(model)) == 2 * 4  # four sites per block
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))

    kernels = importlib.import_module("vtp_kernels._gated_linear")
    calls = {"n": 0}
    scale_weight = kernels._scale_weight

    def counted_scale_weight(*args):
        calls["n"] += 1
        return scale_weight(*args)

    monkeypatch.setattr(kernels, "_scale_weight", counted_scale_weight)

    torch_losses, torch_gates = train(copy.deepcopy(model), images, labels, "torch")
    assert calls["n"] == 0
    triton_losses, triton_gates = train(copy.deepcopy(model), images, labels, "triton")
    assert calls["n"] == STEPS * 8  # every gated linear ran its kernel in every step

    assert torch_losses[-1] < torch_losses[0]  # it trained
    assert not torch.allclose(torch_gates, torch.ones_like(torch_gates))  # the gates moved
    for step, (t, k) in enumerate(zip(torch_losses, triton_losses)):
        assert abs(t - k) <= LOSS_RTOL * abs(t), f"step {step}: torch {t!r} vs triton {k!r}"
    torch.testing.assert_close(triton_gates, torch_gates, rtol=0, atol=GATE_ATOL)
