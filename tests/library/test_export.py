"""Gated and pruned models leave PyTorch: ONNX (through ONNX Runtime), torch.export files,
torch.jit.trace and torch.compile give the eager model's outputs; torch.jit.script says what
to use instead."""
import pytest
import torch

import vtp

from vtp import _export as vtp_export
from vit_variants import make_vit, randomize_gates


@pytest.fixture(scope="module")
def models():
    gated = vtp.add_gates(make_vit("layer_scale", dtype=torch.float32))
    randomize_gates(gated)
    plan = vtp.plan(gated, ratio=0.5)
    pruned = vtp.prune(gated, plan).eval()
    # queries and keys pruned too: attention pads q/k and runs V at each block's own width
    gated_qk = vtp.add_gates(make_vit("layer_scale", dtype=torch.float32), sites=vtp.ALL_SITES)
    randomize_gates(gated_qk)
    pruned_qk = vtp.prune(gated_qk, vtp.plan(gated_qk, ratio=0.5, round_to=4)).eval()
    assert any(b.attn.v_head_width < b.attn.head_dim for b in pruned_qk.blocks)
    return {"gated": gated.eval(), "pruned": pruned, "pruned_qk": pruned_qk}


@pytest.mark.parametrize("kind", ["gated", "pruned", "pruned_qk"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_round_trips(models, kind, fmt, tmp_path):
    model = models[kind]
    path = tmp_path / f"m.{fmt}"
    check = vtp.export(model, path, format=fmt)
    assert path.is_file() and check.bytes == path.stat().st_size
    assert check.batch_sizes == (2, 3) and check.max_abs_error <= check.tolerance
    x = torch.randn(4, 3, 32, 32)
    want = model(x)
    if fmt == "onnx":
        got = vtp_export.run_onnx(vtp_export.onnx_session(path), x)
        # ONNX Runtime sums in another order: float32 ulps, far inside 1e-4 of the output scale
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))
    else:
        got = torch.export.load(str(path)).module()(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_failed_check_writes_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setattr(vtp_export, "_load_and_run", lambda fmt, tmp: (lambda x: torch.zeros(len(x), 5)))
    with pytest.raises(ValueError, match="differs from the eager model"):
        vtp.export(models["pruned"], tmp_path / "m.pt2", format="pt2")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="format: expected one of onnx, pt2"):
        vtp.export(models["pruned"], tmp_path / "m.x", format="tflite")


@pytest.mark.parametrize("kind", ["gated", "pruned"])
def test_trace_and_compile(models, kind):
    model = models[kind]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), want, rtol=0, atol=0)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, rtol=1e-6, atol=1e-6)


def test_script_names_what_works(models):
    with pytest.raises(RuntimeError, match="do not support torch.jit.script; use torch.export"):
        torch.jit.script(models["pruned"])
