import pytest
import torch
import torch.nn as nn

import vtp
from vtp_kernels import reference


def test_gated_linear_is_a_drop_in_linear():
    linear = nn.Linear(10, 7)
    gated = vtp.GatedLinear.from_linear(linear)
    assert gated.weight is linear.weight and gated.bias is linear.bias
    assert set(gated.state_dict()) == {"weight", "bias", "gate"}
    x = torch.randn(2, 3, 5, 10)  # any leading dims
    torch.testing.assert_close(gated(x), linear(x))


def test_gated_linear_computes_gated_input_and_its_gradients():
    gated = vtp.GatedLinear(9, 4, bias=False).double()
    with torch.no_grad():
        gated.gate.copy_(torch.rand(9, dtype=torch.float64))
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    y = gated(x)
    torch.testing.assert_close(y, (x * gated.gate) @ gated.weight.T)
    dy = torch.randn_like(y)
    y.backward(dy)
    # dgate = sum over rows and outputs of dy * (x W^T) contributions: x^T dy W summed per column
    expected = ((dy @ gated.weight) * x).sum(0)
    torch.testing.assert_close(gated.gate.grad, expected)


def test_gated_linear_gradcheck_reference():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    a = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.gated_linear, (x, w, a, b))


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear"):
        vtp.GatedLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_kept_layer_norm_matches_full_layer_norm_then_select():
    norm = nn.LayerNorm(12, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    index = torch.tensor([0, 3, 4, 11])
    kept = vtp.KeptLayerNorm.from_layer_norm(norm, index)
    x = torch.randn(2, 5, 12) * 3 + 1
    torch.testing.assert_close(kept(x), norm(x)[..., index])
    with pytest.raises(ValueError, match="index"):
        vtp.KeptLayerNorm(12, torch.tensor([12]))


def test_pruned_attention_with_full_widths_is_timm_attention():
    from timm.models.vision_transformer import Attention

    attn = Attention(24, num_heads=3, qkv_bias=True).double().eval()
    pruned = vtp.PrunedAttention(24, 24, 8, [8, 8, 8]).double().eval()
    pruned.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(pruned(x), attn(x))
    with pytest.raises(ValueError, match="v_widths"):
        vtp.PrunedAttention(24, 24, 8, [8, 0])
