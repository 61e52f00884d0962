"""`vtp export` and `vtp eval --runtime onnxruntime` on a saved pruned model, their bad input,
and the command line on a family beyond the classic ViT."""
import json

import pytest
import timm
import torch

import vtp
from vtp.app import cli

from cli_helpers import FAST, cli_error, flags
from vit_variants import randomize_gates

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    model = vtp.add_gates(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval())
    randomize_gates(model)
    path = tmp_path_factory.mktemp("saved") / "pruned"
    vtp.save(vtp.prune(model, vtp.plan(model, ratio=0.5)), path)
    return path




@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_writes_a_checked_file(pruned_dir, fmt, tmp_path, capsys):
    out = tmp_path / f"model.{fmt}"
    assert cli.main(["export", str(pruned_dir), "--format", fmt, "--output", str(out)]) == 0
    assert out.is_file() and "checked at batch 2, 3" in capsys.readouterr().out
    x = torch.randn(3, 3, 32, 32)
    want = vtp.load(pruned_dir)(x)
    if fmt == "pt2":
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), want, rtol=1e-6, atol=1e-6)
    else:
        from vtp._export import onnx_session, run_onnx
        # ONNX Runtime sums in another order: float32 ulps, far inside 1e-4 of the output scale
        torch.testing.assert_close(run_onnx(onnx_session(out), x), want, rtol=0,
                                   atol=1e-4 * max(1.0, float(want.abs().max())))


def test_export_bad_input_is_a_clear_error_and_writes_nothing(pruned_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(pruned_dir), "--format", "tflite", "--output", str(tmp_path / "m")])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    (tmp_path / "photos").mkdir()
    err = cli_error(capsys, ["export", str(tmp_path / "photos"), "--output", str(tmp_path / "m.onnx")])
    assert "holds no model saved by vtp.save" in err
    err = cli_error(capsys, ["export", str(pruned_dir), "--output", str(tmp_path / "missing" / "m.onnx")])
    assert "does not exist" in err
    err = cli_error(capsys, ["export", str(pruned_dir), "--output", str(tmp_path)])
    assert "is a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_export_to_an_unwritable_folder_stops_before_any_work(pruned_dir, tmp_path, capsys, monkeypatch):
    import os

    from vtp.app import stages

    # a permission test by chmod would not hold when the tests run as root
    monkeypatch.setattr(stages.os, "access", lambda path, mode: not (mode & os.W_OK))
    monkeypatch.setattr(stages.models, "load_vtp_model", lambda *a: pytest.fail("loaded the model"))
    err = cli_error(capsys, ["export", str(pruned_dir), "--output", str(tmp_path / "m.onnx")])
    assert "is not writable" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_through_onnx_runtime(pruned_dir, data_dir, tmp_path):
    common = flags(["eval", str(pruned_dir), "--data", str(data_dir), "--bench-steps", "2",
                    "--bench-batch-size", "2"], FAST)
    assert cli.main(common + ["--output", str(tmp_path / "torch")]) == 0
    assert cli.main(common + ["--runtime", "onnxruntime", "--output", str(tmp_path / "ort")]) == 0
    torch_eval = json.loads((tmp_path / "torch" / "eval.json").read_text())
    ort_eval = json.loads((tmp_path / "ort" / "eval.json").read_text())
    assert ort_eval["runtime"] == "onnxruntime" and ort_eval["images_per_s"] > 0
    assert ort_eval["export_check"]["max_abs_error"] <= ort_eval["export_check"]["tolerance"]
    assert ort_eval["val_images"] == torch_eval["val_images"] == 16
    # the same predictions up to float32 ulps: the loss agrees to 1e-4
    assert ort_eval["val_loss"] == pytest.approx(torch_eval["val_loss"], rel=1e-4)


def test_the_command_takes_an_eva_model(data_dir, tmp_path):
    """`--model eva02_...` through sparse training, pruning, evaluation and export, with the
    same flags as a classic ViT."""
    model = ["--model", "eva02_tiny_patch14_224", "--img-size", "28", "--patch-size", "7",
             "--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
    dense = tmp_path / "dense.pth"
    torch.save(timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=7,
                                 embed_dim=32, depth=2, num_heads=2, num_classes=4).state_dict(), dense)
    assert cli.main(flags(["sparse-train", "--data", str(data_dir), "--checkpoint", str(dense),
                           "--epochs", "1", "-b", "8", "--save-every", "0", "-o", str(tmp_path / "s")],
                          model, FAST)) == 0
    assert cli.main(["prune", str(tmp_path / "s"), "--ratio", "0.5", "-o", str(tmp_path / "p")]) == 0
    pruned = vtp.load(tmp_path / "p" / "model")
    gated = vtp.load(tmp_path / "s" / "model")
    assert type(pruned).__name__ == "Eva" and vtp.profile(pruned).macs < vtp.profile(gated).macs
    assert cli.main(flags(["eval", str(tmp_path / "p"), "--data", str(data_dir), "--bench-steps", "0",
                           "-o", str(tmp_path / "e")], FAST)) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["macs"] == vtp.profile(pruned).macs
    assert cli.main(["export", str(tmp_path / "p"), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0


def test_a_model_that_could_not_be_saved_stops_before_training(data_dir, tmp_path, capsys):
    """An option save cannot describe (here an activation the architecture name does not
    fix) is found before the first step, not after the last."""
    from cli_helpers import TINY_MODEL

    err = cli_error(capsys, flags(["sparse-train", "--data", str(data_dir), "-b", "8", "-o", str(tmp_path / "s"),
                                "--model-kwargs", '{"act_layer": "gelu_tanh"}'], TINY_MODEL, FAST))
    assert "the trained model could not be saved" in err and "approximate" in err
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_bad_img_size_is_named_before_any_work(pruned_dir, tmp_path, capsys):
    err = cli_error(capsys, ["export", str(pruned_dir), "--img-size", "36", "-o", str(tmp_path / "m.onnx")])
    assert "--img-size 36: the model takes only (32, 32) images" in err
    gated = vtp.add_gates(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY))
    vtp.save(gated, tmp_path / "gated")
    err = cli_error(capsys, ["prune", str(tmp_path / "gated"), "--img-size", "36", "-o", str(tmp_path / "p")])
    assert "--img-size 36: the model takes only (32, 32) images" in err
    assert not (tmp_path / "m.onnx").exists()


def test_the_command_takes_a_parallel_block_model(data_dir, tmp_path):
    """A fused parallel block (one input projection for attention and MLP) through
    sparse-train, prune and finetune: drop path is set on its one branch slot."""
    model = ["--model", "vit_base_patch16_xp_224", "--img-size", "32", "--patch-size", "8",
             "--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
    dense = tmp_path / "dense.pth"
    torch.save(timm.create_model("vit_base_patch16_xp_224", pretrained=False, img_size=32, patch_size=8,
                                 embed_dim=32, depth=2, num_heads=2, num_classes=4).state_dict(), dense)
    train = ["--epochs", "1", "-b", "8", "--save-every", "0", "--drop-path", "0.2"]
    assert cli.main(flags(["sparse-train", "--data", str(data_dir), "--checkpoint", str(dense),
                           "-o", str(tmp_path / "s")], model, train, FAST)) == 0
    assert cli.main(["prune", str(tmp_path / "s"), "--ratio", "0.5", "-o", str(tmp_path / "p")]) == 0
    assert cli.main(flags(["finetune", str(tmp_path / "p"), "--data", str(data_dir), "-o", str(tmp_path / "f")],
                          train, FAST)) == 0
    assert isinstance(vtp.load(tmp_path / "f" / "model").blocks[0], vtp.modules.PrunedParallelBlock)
