"""Shared pieces of the command-line tests: a tiny ImageFolder and a tiny ViT."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# A 2-block ViT of width 32 on 32x32 images (16 patches): a training step costs milliseconds.
TINY_MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
              "--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
# Fast and quiet: no worker processes (exact resume), no bars, tiny benchmark.
FAST = ["--workers", "0", "--no-progress"]


def make_image_folder(root: Path, classes: int = 4, train_per_class: int = 8,
                      val_per_class: int = 4, size: int = 32) -> Path:
    """train/ and val/ with `classes` folders of random-ish PNGs whose mean colour tells the
    class apart, so a few steps can learn something."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 96, (size, size, 3)) + 40 * c
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_dense_checkpoint(path: Path, num_classes: int = 4) -> Path:
    """A timm checkpoint file of TINY_MODEL: what `vtp run` and `vtp sparse-train` start from
    when a test is about the pipeline's mechanics, not about accuracy."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                              img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": model.state_dict()}, path)
    return path


def state_dict_of(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k] - b[k]).abs().max())})"
        else:
            assert torch.allclose(a[k], b[k], rtol=0, atol=atol), \
                f"{k} differs by {float((a[k] - b[k]).abs().max())} > {atol}"


def subprocess_env() -> dict:
    """Environment for child processes: this checkout importable, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


def flags(*groups: List[str]) -> List[str]:
    return [f for g in groups for f in g]


def cli_error(capsys, argv: List[str], code: int = 1) -> str:
    """Runs a failing `vtp` command; returns its stderr after checking the exit code, that
    it printed an error and no traceback. argparse errors (code 2) exit through SystemExit."""
    from vtp.app import cli

    if code == 2:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    else:
        assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "error" in err
    assert "Traceback" not in err
    return err

